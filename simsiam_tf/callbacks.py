"""Keras callbacks of a pretraining run: checkpoints, the kNN monitor, the epoch history,
TensorBoard scalars."""

from __future__ import annotations

import dataclasses
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

from simsiam_tf import data, holdout, knn

STEPS_PER_EPOCH_FILE = "steps_per_epoch.json"

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
        # Checkpoints are numbered by step; this tells the evaluation tools which epoch it is.
        os.makedirs(self.manager.directory, exist_ok=True)
        with open(os.path.join(self.manager.directory, STEPS_PER_EPOCH_FILE), "w") as f:
            json.dump({"steps_per_epoch": self.steps_per_epoch}, f)
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
    `knn_top1` (so it reaches the progress bar, TensorBoard and the history).

    `random_init`: (weights file, result file). The network at initialisation is scored at the
    first evaluation, from the weights saved before step 1, rather than before step 1 (where a
    pass over the bank would delay the first step), and its top-1 written to the result file;
    the weights file is then removed. The run's own weights are put back before training goes
    on, so the monitor leaves training untouched.
    """

    def __init__(self, evaluator: "KnnEvaluator", every: int, epochs: int, random_init=None):
        super().__init__()
        self.evaluator = evaluator
        self.every = every
        self.epochs = epochs
        self.random_init = random_init

    def _score_random_init(self):
        weights_path, result_path = self.random_init or ("", "")
        if not weights_path or not os.path.exists(weights_path) or os.path.exists(result_path):
            return
        backbone = self.model.backbone
        trained = backbone.get_weights()
        backbone.load_weights(weights_path)
        try:
            top1 = self.evaluator(backbone)
        finally:
            backbone.set_weights(trained)
        logging.info("kNN top-1 at initialisation: %.4f", top1)
        with open(result_path + ".tmp", "w") as f:
            json.dump({"knn_top1": top1}, f)
        os.replace(result_path + ".tmp", result_path)
        os.remove(weights_path)

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == self.epochs
        if logs is not None and (last or (self.every and (epoch + 1) % self.every == 0)):
            self._score_random_init()
            logs["knn_top1"] = self.evaluator(self.model.backbone)


def make_knn_evaluator(
    config, workdir=None, train_source=None, monitor: bool = False
) -> Optional["KnnEvaluator"]:
    """A kNN evaluator of the configured source, or None when it has no labelled splits to
    score. Bank and queries are read by `holdout.load_split`, as tools/eval_knn.py reads them,
    so the monitor's numbers and the tool's agree.

    `train_source`, the already loaded (and checked) training split, is reused as the bank when
    the bank is that very split and subset, so it is not read and decoded a second time.
    `monitor`: the evaluator of the monitor during training, whose bank and queries are capped
    at eval.monitor_max_bank and eval.monitor_max_queries (seeded, class-stratified subsets:
    CIFAR-10's 50,000 and 10,000 whole; on ImageNet a pass is 60,000 images, under 5% of an
    epoch's images and about 1% of its compute).
    """
    d, e = config.data, config.eval
    if train_source is not None and e.bank_split == "train" and e.max_bank == d.max_examples:
        bank = train_source
    else:
        bank, _ = holdout.load_split(config, e.bank_split, workdir, max_examples=e.max_bank)
    queries, _ = holdout.load_split(config, e.query_split, workdir, max_examples=e.max_queries)
    why = None
    if bank is None or bank.num_classes == 0:
        why = f"its {e.bank_split!r} split is unlabelled (kNN needs class subfolders)"
    elif bank.num_classes == 1:
        name = bank.class_names[0] if bank.class_names else "one class"
        why = f"its {e.bank_split!r} split has one class ({name}); kNN needs two or more"
    elif queries is None:
        why = f"it has no {e.query_split!r} split" + (
            " and eval.holdout_fraction=0 holds none out" if e.holdout_fraction == 0 else ""
        )
    if why:
        logging.warning("No kNN evaluation of %s: %s", d.source, why)
        return None
    evaluation = f"{queries.num_examples} evaluation images {_origin(queries)}"
    if monitor:
        bank = capped(bank, e.monitor_max_bank, config.seed)
        queries = capped(queries, e.monitor_max_queries, config.seed)
    evaluator = KnnEvaluator(bank, queries, d.image_size, e, d.eval_crop_fraction)
    evaluator.evaluation = evaluation
    return evaluator


def _origin(source: data.Source) -> str:
    """Where an evaluation split comes from, in words: "from val/", "held out of train/"."""
    if source.name.endswith("[held-out]"):
        return "held out of the training images (holdout.json)"
    if source.root is not None:
        return f"from {os.path.basename(source.root)}/"
    return f"from {source.name}"


def capped(source: data.Source, n: int, seed: int) -> data.Source:
    """`source` cut to a seeded class-stratified subset of n examples (0: all of it); a
    streamed source, whose labels are not known up front, keeps its first n."""
    if not n or source.num_examples <= n:
        return source
    if source.files is None and not source.in_memory:
        return dataclasses.replace(
            source,
            num_examples=n,
            tfds_dataset=source.tfds_dataset.take(n),
            labels=source.labels[:n],
            stream=None,
        )
    keep = holdout.stratified_subset(source.labels, n, seed)
    logging.info("kNN monitor: %d of the %d images of %s", n, source.num_examples, source.name)
    return dataclasses.replace(
        source,
        num_examples=len(keep),
        labels=source.labels[keep],
        images=None if source.images is None else source.images[keep],
        files=None if source.files is None else [source.files[i] for i in keep],
    )


class KnnEvaluator:
    """Scores a backbone by weighted kNN: bank = one split, queries = another. The bank is
    built in chunks on the device (`knn.build_bank`, in eval.knn_bank_dtype)."""

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
        self.evaluation = f"{queries.num_examples} evaluation images"  # for the log

    def _dataset(self, source):
        return data.eval_dataset(source, self.size, self.cfg.knn_batch, self.crop_fraction)

    def __call__(self, backbone) -> float:
        bank = knn.build_bank(backbone, self._dataset(self.bank), self.cfg.knn_bank_dtype)
        queries, query_labels = knn.extract_features(backbone, self._dataset(self.queries))
        return knn.knn_accuracy(
            bank,
            None,
            queries,
            query_labels,
            max(self.bank.num_classes, self.queries.num_classes),
            self.cfg.knn_k,
            self.cfg.knn_t,
            self.cfg.knn_batch,
        )


class SkippedRecordsLog(keras.callbacks.Callback):
    """Adds `skipped_records` (damaged TFRecords skipped so far, by every pass: training,
    kNN bank and queries) to the epoch logs when there are any."""

    def __init__(self, counters):
        super().__init__()
        self.counters = [c for c in counters if c is not None]

    def on_epoch_end(self, epoch, logs=None):
        skipped = sum(c.count for c in self.counters)
        if logs is not None and skipped:
            logs["skipped_records"] = skipped


class HistoryWriter(keras.callbacks.Callback):
    """Appends each epoch's logs to WORKDIR/history.jsonl, which survives restarts: `epoch`
    (1, 2, ...), `step` (optimizer steps done, over all epochs), `time` and every metric."""

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
        row = {
            "epoch": epoch + 1,
            "step": _global_step(self.model),
            "time": time.time() - self.start,
        }
        row.update({k: float(np.asarray(v)) for k, v in (logs or {}).items()})
        replaced = len(data.replaced_images())
        if replaced:  # images that failed to decode in training, each replaced by a neighbour
            row["replaced_images"] = replaced
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _global_step(model) -> int:
    return int(np.asarray(model.optimizer.iterations))


class TensorBoardScalars(keras.callbacks.Callback):
    """Scalars for TensorBoard, counted as history.jsonl counts them.

    LOGDIR/train:
      epoch/<metric>  every epoch's logs at step = the epoch number (history.jsonl's `epoch`:
                      1, 2, ...); epoch/knn_top1 also at 0, the network at initialisation, as
                      curves.png draws it.
      step/<metric>   every `every_steps` optimizer steps, at step = the optimizer step
                      (history.jsonl's `step`, counted over resumes): loss, z_std and p_std
                      averaged over the steps since the previous point of the same epoch, and
                      lr at that step. A long epoch is then not blank.
    LOGDIR/random_init:
      epoch/knn_top1  kNN top-1 of the network at initialisation, at every epoch kNN ran: a flat
                      reference line on the kNN chart.
    The learning rate is logged once per point, as `lr`.
    """

    def __init__(self, logdir: str, every_steps: int = 0, random_init_path: str = ""):
        super().__init__()
        self.logdir = logdir
        self.every_steps = every_steps
        self.random_init_path = random_init_path
        self._writers = None
        self._random_init = None
        self._since = (0, {})  # (batches, sums) of this epoch at the previous step point

    def _writer(self, name):
        if self._writers is None:
            self._writers = {
                n: tf.summary.create_file_writer(os.path.join(self.logdir, n))
                for n in ("train", "random_init")
            }
        return self._writers[name]

    def _write(self, name, scalars, step):
        with self._writer(name).as_default():
            for key, value in scalars.items():
                tf.summary.scalar(key, value, step=step)

    def on_train_begin(self, logs=None):
        if self.random_init_path and os.path.exists(self.random_init_path):
            with open(self.random_init_path) as f:
                self._random_init = json.load(f)["knn_top1"]
            if _global_step(self.model) == 0:
                self._write("train", {"epoch/knn_top1": self._random_init}, 0)
                self._write("random_init", {"epoch/knn_top1": self._random_init}, 0)

    def on_epoch_begin(self, epoch, logs=None):
        self._since = (0, {})

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_steps or not logs:
            return
        step = _global_step(self.model)
        if step % self.every_steps:
            return
        # The logs hold means since the epoch began (over batch + 1 batches): the mean over the
        # batches since the previous point is the difference of the sums.
        count = batch + 1
        before, sums_before = self._since
        sums = {k: float(np.asarray(v)) * count for k, v in logs.items() if k != "lr"}
        scalars = {
            f"step/{k}": (v - sums_before.get(k, 0.0)) / (count - before) for k, v in sums.items()
        }
        if "lr" in logs:
            scalars["step/lr"] = float(np.asarray(logs["lr"]))
        self._write("train", scalars, step)
        self._since = (count, sums)

    def on_epoch_end(self, epoch, logs=None):
        scalars = {f"epoch/{k}": float(np.asarray(v)) for k, v in (logs or {}).items()}
        if self._random_init is None and self.random_init_path:
            if os.path.exists(self.random_init_path):  # scored at this epoch's kNN pass
                with open(self.random_init_path) as f:
                    self._random_init = json.load(f)["knn_top1"]
                self._write("train", {"epoch/knn_top1": self._random_init}, 0)
                self._write("random_init", {"epoch/knn_top1": self._random_init}, 0)
        self._write("train", scalars, epoch + 1)
        if "epoch/knn_top1" in scalars and self._random_init is not None:
            self._write("random_init", {"epoch/knn_top1": self._random_init}, epoch + 1)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in (self._writers or {}).values():
            writer.flush()


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
