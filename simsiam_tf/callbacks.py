"""Keras callbacks of a pretraining run: checkpoints, the kNN monitor, the epoch history."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simsiam_tf import data, knn


class Checkpointer(keras.callbacks.Callback):
    """Saves model, optimizer (momentum buffers, step count, hence the lr schedule position) and
    the epoch after every epoch under WORKDIR/checkpoints; `restore` resumes from the latest.

    Uses tf.train.CheckpointManager, whose writes are atomic: a run killed mid-save leaves the
    previous checkpoint intact.
    """

    def __init__(self, directory: str, model: keras.Model, optimizer, max_to_keep: int = 3):
        super().__init__()
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep)

    def restore(self) -> int:
        """Restores the latest checkpoint, if any; returns the number of epochs it completed."""
        latest = self.manager.latest_checkpoint
        if latest is None:
            return 0
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        logging.info("Resumed from %s (epoch %d)", latest, int(self.epoch.numpy()))
        return int(self.epoch.numpy())

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


class KnnMonitor(keras.callbacks.Callback):
    """Weighted kNN top-1 of the backbone every `every` epochs, added to the epoch logs as
    `knn_top1` (so it reaches the progress bar, TensorBoard and the history)."""

    def __init__(self, evaluator: "KnnEvaluator", every: int, epochs: int):
        super().__init__()
        self.evaluator = evaluator
        self.every = every
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == self.epochs
        if logs is not None and (last or (self.every and (epoch + 1) % self.every == 0)):
            logs["knn_top1"] = self.evaluator(self.model.backbone)


class KnnEvaluator:
    """Scores a backbone by weighted kNN: bank = one split, queries = another."""

    def __init__(
        self,
        bank: data.Source,
        queries: data.Source,
        image_size: int,
        eval_config,
        crop_fraction: float = 1.0,
    ):
        if bank.num_classes < 2:
            raise ValueError(f"kNN needs a labelled bank; {bank.name} has no classes")
        self.bank = bank
        self.queries = queries
        self.size = image_size
        self.cfg = eval_config
        self.crop_fraction = crop_fraction

    def features(self, backbone, source):
        ds = data.eval_dataset(source, self.size, self.cfg.knn_batch, self.crop_fraction)
        return knn.extract_features(backbone, ds)

    def __call__(self, backbone) -> float:
        bank, bank_labels = self.features(backbone, self.bank)
        queries, query_labels = self.features(backbone, self.queries)
        return knn.knn_accuracy(
            bank,
            bank_labels,
            queries,
            query_labels,
            self.bank.num_classes,
            self.cfg.knn_k,
            self.cfg.knn_t,
            self.cfg.knn_batch,
        )


class HistoryWriter(keras.callbacks.Callback):
    """Appends each epoch's logs to WORKDIR/history.jsonl, which survives restarts."""

    def __init__(self, path: str, start_time: Optional[float] = None):
        super().__init__()
        self.path = path
        self.start = start_time or time.time()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, "time": time.time() - self.start}
        row.update({k: float(np.asarray(v)) for k, v in (logs or {}).items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_history(path: str) -> list:
    """Rows of history.jsonl; a row repeated by a resume keeps its latest version."""
    if not os.path.exists(path):
        return []
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]
