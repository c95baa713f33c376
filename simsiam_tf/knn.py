"""Weighted k-nearest-neighbour classification of L2-normalised features: the monitor the
SimSiam authors used on CIFAR (as in Wu et al. 2018, InstDisc).

A query's k nearest bank entries by cosine similarity vote for their class with weight
exp(sim / T); the class with the largest total wins.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

_traced = {}  # the last backbone's traced call: reused by every evaluation of that backbone


def _embedding_function(backbone):
    """backbone(images, training=False) as one tf.function per backbone, not predict_on_batch:
    under MirroredStrategy, Keras 3's predict_on_batch returns one copy of the outputs per
    replica (2N rows for N images). Kept for the last backbone only, so each kNN evaluation of a
    run reuses one trace instead of tracing anew (and TensorFlow warning of retracing)."""
    if _traced.get("backbone") is not backbone:
        _traced["backbone"] = backbone
        _traced["fn"] = tf.function(
            lambda images: backbone(images, training=False), reduce_retracing=True
        )
    return _traced["fn"]


def extract_features(backbone, dataset) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised backbone features (BN in inference mode) and labels of a dataset of
    (images, labels) batches, as host arrays (small sets: queries, plots). A bank of any size
    is built with `build_bank` instead."""
    bank = build_bank(backbone, dataset, device="/cpu:0")
    return bank.numpy(), bank.labels


def default_device() -> str:
    """Where a bank is kept: the first GPU where there is one, else the CPU."""
    return "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"


class FeatureBank:
    """L2-normalised features in chunks of at most `chunk_rows` rows, in `dtype`, on one
    device, and their labels on the host.

    A bank of N x C features takes N x C x (2 or 4) bytes on its device, and building or
    searching it takes at most a few chunks beyond that: 1.28M x 2048 ImageNet features are
    5.2 GB in float16 (10.5 GB in float32), searched 16,384 rows at a time.
    """

    def __init__(self, chunks: list, labels: np.ndarray, dtype: str = "float32"):
        self.chunks = chunks
        self.labels = np.asarray(labels, np.int64)
        self.dtype = dtype

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @classmethod
    def from_array(cls, features, labels, dtype="float32", chunk_rows=16384, device=None):
        """A bank of already L2-normalised host features, converted one chunk at a time."""
        features = np.asarray(features)
        with tf.device(device or default_device()):
            chunks = [
                tf.convert_to_tensor(features[i : i + chunk_rows], dtype)
                for i in range(0, len(features), chunk_rows)
            ]
        return cls(chunks, labels, dtype)

    def numpy(self) -> np.ndarray:
        if not self.chunks:
            return np.zeros((0, 0), np.float32)
        return np.concatenate([np.asarray(c, np.float32) for c in self.chunks])


def build_bank(backbone, dataset, dtype="float32", chunk_rows=16384, device=None) -> FeatureBank:
    """The FeatureBank of a dataset of (images, labels) batches: each batch embedded (BN in
    inference mode), normalised and cast on the bank's device, and every `chunk_rows` rows
    joined into one chunk, so memory beyond the bank stays within about two chunks."""
    embed = _embedding_function(backbone)
    device = device or default_device()
    chunks, pending, rows, labels = [], [], 0, []

    def flush():
        if pending:
            with tf.device(device):
                chunks.append(tf.concat(pending, 0) if len(pending) > 1 else pending[0])
            pending.clear()

    for images, y in dataset:
        with tf.device(device):
            pending.append(_normalised(embed(images), dtype))
        labels.append(np.asarray(y))
        rows += len(labels[-1])
        if rows >= chunk_rows:  # a chunk of whole batches: about chunk_rows rows
            flush()
            rows = 0
    flush()
    return FeatureBank(chunks, np.concatenate(labels) if labels else np.zeros(0), dtype)


@tf.function(reduce_retracing=True)
def _normalised_traced(features, dtype):
    features = tf.cast(features, tf.float32)
    norm = tf.maximum(tf.norm(features, axis=1, keepdims=True), 1e-12)
    return tf.cast(features / norm, dtype)


def _normalised(features, dtype: str):
    return _normalised_traced(features, tf.as_dtype(dtype))


def knn_predict(
    bank,
    bank_labels,
    queries,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    batch: int = 256,
) -> np.ndarray:
    """Predicted class of every query. bank: an NxC array or a FeatureBank (then bank_labels
    may be None), queries: QxC, both L2-normalised.

    Queries are scored `batch` at a time against one bank chunk at a time, the k best of each
    chunk merged into the running k best (ties go to the lower bank index, as one top-k over
    the whole bank gives), so memory stays at batch x chunk similarities (256 x 16,384 floats =
    17 MB) whatever the bank's size.
    """
    if not isinstance(bank, FeatureBank):
        bank = FeatureBank.from_array(bank, bank_labels)
    labels = np.asarray(bank.labels if bank_labels is None else bank_labels, np.int64)
    k = min(k, bank.num_examples)
    queries = np.asarray(queries, np.float32)
    device = bank.chunks[0].device if bank.chunks else default_device()
    with tf.device(device):
        bank_labels_t = tf.constant(labels)
        t = tf.constant(t, tf.float32)
        preds = []
        for i in range(0, len(queries), batch):
            q = tf.constant(queries[i : i + batch])
            best_sim = tf.zeros((len(q), 0), tf.float32)
            best_idx = tf.zeros((len(q), 0), tf.int64)
            offset = 0
            for chunk in bank.chunks:
                best_sim, best_idx = _merge_top_k(q, chunk, offset, best_sim, best_idx, k)
                offset += int(chunk.shape[0])
            preds.append(_vote(best_sim, best_idx, bank_labels_t, t, num_classes).numpy())
    return np.concatenate(preds) if preds else np.zeros((0,), np.int64)


@tf.function(reduce_retracing=True)
def _merge_top_k(q, chunk, offset, best_sim, best_idx, k: int):
    """The k best (similarity, bank index) of the running best and one chunk's."""
    sim = tf.matmul(q, tf.cast(chunk, tf.float32), transpose_b=True)  # B x chunk rows
    top_sim, top_idx = tf.math.top_k(sim, k=tf.minimum(k, tf.shape(sim)[1]))
    sim = tf.concat([best_sim, top_sim], 1)  # the running best first: lower indices win ties
    idx = tf.concat([best_idx, tf.cast(top_idx, tf.int64) + tf.cast(offset, tf.int64)], 1)
    top_sim, pos = tf.math.top_k(sim, k=tf.minimum(k, tf.shape(sim)[1]))
    return top_sim, tf.gather(idx, pos, batch_dims=1)


@tf.function(reduce_retracing=True)
def _vote(top_sim, top_idx, bank_labels, t, num_classes: int):
    """The class each query's k nearest bank entries vote for, weighted by exp(sim / t).

    One traced function for every call (num_classes is static), so evaluations during a run
    reuse its trace."""
    votes = tf.one_hot(tf.gather(bank_labels, top_idx), num_classes)  # BxKxclasses
    weights = tf.exp(top_sim / t)[..., None]  # BxKx1
    return tf.argmax(tf.reduce_sum(votes * weights, axis=1), axis=-1)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k=200, t=0.1, batch=256):
    """Top-1 accuracy in [0, 1] of `knn_predict`."""
    preds = knn_predict(bank, bank_labels, queries, num_classes, k, t, batch)
    return float(np.mean(preds == np.asarray(query_labels)))
