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
    (images, labels) batches."""

    embed = _embedding_function(backbone)
    feats, labels = [], []
    for images, y in dataset:
        feats.append(np.asarray(embed(images), np.float32))
        labels.append(y.numpy())
    feats = np.concatenate(feats)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return feats, np.concatenate(labels)


def knn_predict(
    bank: tf.Tensor,
    bank_labels: tf.Tensor,
    queries: tf.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    batch: int = 256,
) -> np.ndarray:
    """Predicted class of every query. bank: NxC, queries: QxC, both L2-normalised.

    Queries are scored `batch` at a time, so memory stays at batch x N similarities (256 x
    50,000 floats = 51 MB for CIFAR-10).
    """
    bank = tf.convert_to_tensor(bank, tf.float32)
    bank_labels = tf.convert_to_tensor(bank_labels, tf.int64)
    k = min(k, int(bank.shape[0]))

    queries = tf.convert_to_tensor(queries, tf.float32)
    t = tf.constant(t, tf.float32)
    preds = [
        _vote(queries[i : i + batch], bank, bank_labels, t, k, num_classes).numpy()
        for i in range(0, int(queries.shape[0]), batch)
    ]
    return np.concatenate(preds) if preds else np.zeros((0,), np.int64)


@tf.function(reduce_retracing=True)
def _vote(q, bank, bank_labels, t, k: int, num_classes: int):
    """The class each query's k nearest bank entries vote for, weighted by exp(sim / t).

    One traced function for every call (k and num_classes are static), so evaluations during a
    run reuse its trace."""
    sim = tf.matmul(q, bank, transpose_b=True)  # BxN
    top_sim, top_idx = tf.math.top_k(sim, k=k)  # BxK
    votes = tf.one_hot(tf.gather(bank_labels, top_idx), num_classes)  # BxKxclasses
    weights = tf.exp(top_sim / t)[..., None]  # BxKx1
    return tf.argmax(tf.reduce_sum(votes * weights, axis=1), axis=-1)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k=200, t=0.1, batch=256):
    """Top-1 accuracy in [0, 1] of `knn_predict`."""
    preds = knn_predict(bank, bank_labels, queries, num_classes, k, t, batch)
    return float(np.mean(preds == np.asarray(query_labels)))
