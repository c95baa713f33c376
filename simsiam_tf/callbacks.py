"""Keras callbacks of a pretraining run: checkpoints, the kNN monitor, the epoch history."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simsiam_tf import data, knn

# Ctrl-C and a preemption notice both end a run cleanly: a checkpoint after the current step.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Checkpointer(keras.callbacks.Callback):
    """Saves model and optimizer (momentum buffers and step count, hence the lr schedule
    position and the position in the data) under WORKDIR/checkpoints: after every epoch, every
    `every_steps` steps, and on Ctrl-C or SIGTERM (a preemption notice), after which training
    stops cleanly (a second Ctrl-C exits at once). `restore` resumes from the latest, mid-epoch included: the pipeline is a pure
    function of (seed, epoch, batch), so (epoch, batch) = divmod(step, steps_per_epoch) is all
    a resume needs to feed the very batches an uninterrupted run would have seen.

    Writes go through tf.train.CheckpointManager, which is atomic: a run killed mid-save keeps
    the previous checkpoint.
    """

    def __init__(
        self,
        directory: str,
        model: keras.Model,
        optimizer,
        steps_per_epoch: int,
        max_to_keep: int = 3,
        every_steps: int = 0,
    ):
        super().__init__()
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep)
        self.every_steps = every_steps
        self._stop_signal = 0
        self._previous_handlers = {}

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def restore(self) -> tuple[int, int]:
        """Restores the latest checkpoint, if any; returns (completed epochs, batches done in
        the epoch after them)."""
        latest = self.manager.latest_checkpoint
        if latest is None:
            return 0, 0
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        logging.info(
            "Resumed from %s (step %d: epoch %d, batch %d)", latest, self.step, epoch, batch
        )
        return epoch, batch

    def save(self) -> str:
        """Writes a checkpoint, after checking that no weight or optimizer slot is NaN or inf: a
        step's loss is computed before its update, so the update can break the weights while
        the loss still looks fine."""
        for v in self.model.variables + self.optimizer.variables:
            value = np.asarray(v)
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise NonFiniteLossError(
                    f"{v.path} became non-finite by step {self.step}; training stopped before "
                    f"saving it. {_nan_advice(self.manager.latest_checkpoint)}"
                )
        return self.manager.save(checkpoint_number=self.step)

    @property
    def stopped_by(self) -> int:
        """The signal (SIGINT or SIGTERM) that stopped training after a checkpoint, else 0."""
        return self._stop_signal

    def on_train_begin(self, logs=None):
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_stop_signal)

    def on_train_end(self, logs=None):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_stop_signal(self, signum, frame):
        if signum == signal.SIGINT and self._stop_signal == signal.SIGINT:
            # A second Ctrl-C: the user will not wait for the step; the last checkpoint stays.
            sys.stderr.write("\nCtrl-C again: stopped at once; the last checkpoint is kept\n")
            sys.stderr.flush()
            os._exit(128 + signal.SIGINT)
        if signum == signal.SIGTERM:
            logging.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self._stop_signal = signum

    def on_train_batch_end(self, batch, logs=None):
        if self._stop_signal or (self.every_steps and self.step % self.every_steps == 0):
            path = self.save()
            if self._stop_signal:
                if self._stop_signal == signal.SIGTERM:
                    logging.warning("Saved %s; stopped for preemption, rerun to resume", path)
                self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.step % self.steps_per_epoch == 0:
            self.save()


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class NanGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss, before any checkpoint can store the broken
    weights (it must come before the Checkpointer in the callback list)."""

    def __init__(self, checkpoint_dir: str):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir

    def on_train_batch_end(self, batch, logs=None):
        loss = float(np.asarray((logs or {}).get("loss", 0.0)))
        if not math.isfinite(loss):
            step = int(self.model.optimizer.iterations.numpy())
            latest = tf.train.latest_checkpoint(self.checkpoint_dir)
            raise NonFiniteLossError(
                f"the loss became {loss} at step {step}; training stopped. {_nan_advice(latest)}"
            )


def _nan_advice(latest_checkpoint) -> str:
    return (
        f"The last good checkpoint is {latest_checkpoint or '(none yet)'}: rerunning the same "
        "command resumes from it. Likely causes: a learning rate too high for this batch size, "
        "corrupt input, or float16 overflow (try train.precision=mixed_bfloat16)."
    )


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
        self._batches = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1

    def on_epoch_end(self, epoch, logs=None):
        if self._batches < ((self.params or {}).get("steps") or 0):
            return  # cut short (Ctrl-C, SIGTERM): the resumed run writes the whole epoch
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
