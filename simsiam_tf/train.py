"""A pretraining run: config in, run directory out.

WORKDIR/
  config.json          the resolved config
  checkpoints/         model + optimizer + epoch, after every epoch (resume point)
  tb/                  TensorBoard: per epoch and every train.log_every_steps steps
  holdout.json         the held-out images of a labelled source without a test split
  history.jsonl        one line of metrics per epoch
  random_init.json     kNN top-1 of the network at initialisation (at the first kNN pass)
  backbone.weights.h5  the trained backbone
  summary.json         the run's result
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import socket
import sys
import time

import keras
import ml_collections
import tensorflow as tf
from absl import logging

from simsiam_tf import (
    augment,
    callbacks,
    collapse,
    data,
    distribute,
    holdout,
    model,
    optim,
    plots,
    quiet,
)
from simsiam_tf import config as config_lib
from simsiam_tf.errors import ConfigError

# The backbone at initialisation, kept until the first kNN pass scores it.
RANDOM_INIT_WEIGHTS = "random_init.weights.h5"
# Keys a rerun may change freely: they change how a run is shown, monitored or stored, not what
# it computes. Every other key (model, data, augmentation, optimiser, seed, precision, replicas,
# kNN settings whose numbers fill the history) changes the run's meaning.
COSMETIC_KEYS = frozenset(
    {
        "train.verbose",
        "train.log_every_steps",
        "train.keep_checkpoints",
        "train.backup_every_steps",
        "train.jit_compile",
        "train.deterministic",
        "train.tpu",
        "data.threads",
        "data.intra_op_threads",
        "data.check_images",
        "data.image_check",
        "data.strict",
        "data.tfds_data_dir",
        "data.tfds_download",
        "eval.knn_every_epochs",
        "eval.knn_batch",
        "eval.random_init_knn",  # scored only by a run that starts at step 0
        "eval.collapse_threshold",
        "eval.collapse_patience",
        "eval.collapse_stop",
    }
)
# Changed on purpose to train a run longer (or stop it sooner): allowed, and said.
LENGTH_KEY = "optim.epochs"


def config_changes(saved: dict, new: dict) -> list:
    """(key, saved value, new value) for every key of the saved config the new one changes.

    Keys the saved config lacks (added to the project after the run started) keep their
    defaults and are not counted as changes.
    """
    old_flat, new_flat = _flatten(saved), _flatten(new)
    return [
        (key, old_flat[key], new_flat.get(key))
        for key in sorted(old_flat)
        if key in new_flat and old_flat[key] != new_flat[key]
    ]


def write_config(
    config: ml_collections.ConfigDict, workdir: str, allow_change: bool = False, save: bool = True
) -> None:
    """Saves the resolved config (unless not `save`); on a rerun, first refuses a change of the
    run's meaning.

    Raises ConfigError naming every meaningful key the rerun changes (old and new values),
    unless `allow_change`.
    """
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changes = config_changes(saved, new)
        meaningful = [c for c in changes if c[0] not in COSMETIC_KEYS and c[0] != LENGTH_KEY]
        if meaningful and not allow_change:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in meaningful)
            raise ConfigError(
                f"{workdir} holds a run with another config ({listed}). Rerun with the saved "
                f"values to resume it, use a new --workdir for a new run, or pass "
                f"--allow_config_change to resume it with the new values"
            )
        for key, old, value in changes:
            if key == LENGTH_KEY:
                logging.info("optim.epochs %s -> %s: the schedule now spans %s", old, value, value)
            elif key in COSMETIC_KEYS or allow_change:
                logging.warning(
                    "%s changed from %r to %r for the rest of this run", key, old, value
                )
    if not save:
        return
    with open(path, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)


class RunLocked(RuntimeError):
    """Another process is training into the same run directory."""


def lock_workdir(workdir: str):
    """Takes the run directory's lock, or raises RunLocked naming the process that holds it.

    An flock: the OS releases it when its holder exits, however it dies, so a lock left by a
    killed run never blocks. Returns the open lock file; keep it open for the whole run.
    """
    path = os.path.join(workdir, ".lock")
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLocked(
            f"{workdir} is in use by {holder}; wait for it to finish or stop it, or train into "
            "another --workdir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(
        f"pid {os.getpid()} on {socket.gethostname()} since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)})"
    )
    handle.flush()
    return handle


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in its directory."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a run directory?")
    with open(path) as f:
        saved = json.load(f)
    config = config_lib.default_config()
    config.update_from_flattened_dict(_flatten(saved))
    return config


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def build_model_and_optimizer(config, steps_per_epoch: int, strategy=None):
    """SimSiam and its optimizer, built under the strategy's scope."""
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        recipe = augment.TwoViewRecipe(config.aug, config.data.image_size, config.data.photometric)
        augmenter = recipe.device_stage()
        net = model.build_simsiam(config.model, augmenter)
        size = config.data.image_size
        net(tf.zeros((1, size, size, 3)))  # builds every layer before fit
        opt = optim.build_optimizer(
            config.optim,
            config.optim.batch_size,
            steps_per_epoch,
            predictor_vars=net.predictor.trainable_variables,
        )
        if config.train.precision == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        net.compile(optimizer=opt, jit_compile=config.train.jit_compile)
        opt.build(net.trainable_variables)
    return net, opt


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: bool = False,
    extra_callbacks: tuple = (),
) -> dict:
    """Pretrains (or resumes) SimSiam as configured; returns the summary written to the run.

    `extra_callbacks`: Keras callbacks added to the run's own (after them).

    Raises ConfigError (a bad config, a rerun that would change the run's meaning), RunLocked
    (another process trains into `workdir`) and Stopped (Ctrl-C or SIGTERM, after a checkpoint).
    """
    start = time.time()
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file; give a directory (created if missing)")
    # The strategy first: validation builds the augmentation layers, which starts TensorFlow,
    # and the CPU can only be split (train.cpu_devices) before that.
    distribute.set_intra_op_threads(config.data.get("intra_op_threads", -1), config.train.tpu)
    strategy = distribute.make_strategy(config.train.cpu_devices, config.train.tpu)
    config_lib.validate(config, strategy.num_replicas_in_sync)
    keras.mixed_precision.set_global_policy(config.train.precision)
    keras.utils.set_random_seed(config.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    if not distribute.is_chief(strategy):
        # Every worker takes part in every step and save; only the chief writes WORKDIR.
        workdir = os.path.join(workdir, ".workers", str(strategy.cluster_resolver.task_id))
    os.makedirs(workdir, exist_ok=True)
    lock = lock_workdir(workdir)
    try:
        return _train(config, workdir, strategy, allow_config_change, start, extra_callbacks)
    finally:
        lock.close()


def _train(config, workdir, strategy, allow_config_change, start, extra_callbacks=()) -> dict:
    workers = distribute.num_workers(strategy)
    # A changed rerun is refused before any data is read; the config is saved once the data
    # accepts it, so a first attempt that fails there does not bind the corrected rerun.
    write_config(config, workdir, allow_config_change, save=False)

    d = config.data
    # A labelled source without a test split: its held-out images are not pretrained on.
    source, _ = holdout.load_split(
        config, "train", workdir, max_examples=d.max_examples, record=True
    )
    global_batch = config.optim.batch_size
    steps = source.num_examples // global_batch
    # Several workers on TFRecords: each reads its own shard files (per-worker batches).
    by_file = workers > 1 and data.parse_source(d.source)[0] == "tfrecord"
    # Several workers on an image folder: each reads and decodes its rows of every batch only.
    per_worker = by_file or (workers > 1 and source.files is not None)
    if by_file:
        shares = [
            data.load_source(d.source, "train", 0, config.seed, shard=(w, workers))
            for w in range(workers)
        ]
        steps = min(share.num_examples for share in shares) // (global_batch // workers)
    if config.train.steps_per_epoch:
        steps = min(steps, config.train.steps_per_epoch)
    if steps == 0:
        raise ConfigError(
            f"config.optim.batch_size={global_batch} is larger than {source.name} "
            f"({source.num_examples} examples)"
        )
    write_config(config, workdir, allow_config_change)
    logging.info(
        "%s: %d examples, %d steps of %d per epoch, %d replica(s)",
        source.name,
        source.num_examples,
        steps,
        global_batch,
        strategy.num_replicas_in_sync,
    )

    net, opt = build_model_and_optimizer(config, steps, strategy)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpointer = callbacks.Checkpointer(
        checkpoint_dir,
        net,
        opt,
        steps,
        config.train.keep_checkpoints,
        config.train.backup_every_steps,
    )
    initial_epoch, initial_batch = checkpointer.restore()
    evaluator = None
    if workers == 1:
        evaluator = callbacks.make_knn_evaluator(config, workdir, source, monitor=True)
        if evaluator:
            logging.info(
                "%s: %d train images, %s", d.source, source.num_examples, evaluator.evaluation
            )
    if workers > 1:
        logging.info("%d workers: no kNN during training; run tools/eval_knn.py after", workers)

    if checkpointer.step == 0 and distribute.is_chief(strategy):
        # The augmented views, the first thing to look at when a run collapses.
        plots.log_views(os.path.join(workdir, "tb"), source, config)

    random_init_path = os.path.join(workdir, "random_init.json")
    random_init_weights = os.path.join(workdir, RANDOM_INIT_WEIGHTS)
    if evaluator and config.eval.random_init_knn and not os.path.exists(random_init_path):
        if checkpointer.step == 0:
            # Scored at the first kNN pass (callbacks.KnnMonitor), not before step 1.
            net.backbone.save_weights(random_init_weights)

    epochs = config.optim.epochs
    history_path = os.path.join(workdir, "history.jsonl")
    if initial_epoch < epochs:

        def dataset(first_epoch, num_epochs, first_batch=0):
            def make(shard):
                if by_file:  # this worker's shard files, per-worker batches
                    src, batch, shard = shares[shard[0]], global_batch // workers, (0, 1)
                else:  # an image folder: this worker's rows of each batch; else the batch
                    src, batch = source, global_batch
                return data.pretrain_dataset(
                    src,
                    d,
                    config.aug,
                    batch,
                    config.seed,
                    first_epoch,
                    num_epochs,
                    steps,
                    first_batch,
                    shard=shard,
                )

            return distribute.distribute_batches(strategy, make, global_batch, per_worker)

        e = config.eval
        monitor = collapse.CollapseMonitor(
            net.proj_dim,
            e.collapse_threshold,
            e.collapse_patience,
            e.collapse_stop,
            collapse.likely_causes(config),
        )
        # The NaN guard comes before the checkpointer, so broken weights are never saved; the
        # monitors before the history writer and TensorBoard, so that they record their logs.
        cbs = [
            callbacks.NanGuard(checkpoint_dir),
            monitor,
            checkpointer,
            callbacks.HistoryWriter(history_path, start),
        ]
        if evaluator:
            monitor_knn = callbacks.KnnMonitor(
                evaluator,
                config.eval.knn_every_epochs,
                epochs,
                random_init=(random_init_weights, random_init_path),
            )
            cbs.insert(1, monitor_knn)
        cbs.append(
            callbacks.TensorBoardScalars(
                os.path.join(workdir, "tb"), config.train.log_every_steps, random_init_path
            )
        )
        counters = [src.skipped_records for src in (shares if by_file else [source])]
        if evaluator:
            counters += [evaluator.bank.skipped_records, evaluator.queries.skipped_records]
        if any(c is not None for c in counters):  # before the history and TensorBoard
            cbs.insert(1, callbacks.SkippedRecordsLog(set(filter(None, counters))))
        cbs.extend(extra_callbacks)
        verbose = config.train.verbose
        if verbose == 1:
            verbose = quiet.progress_verbosity()  # redirected: one line per epoch
        fit_kwargs = dict(callbacks=cbs, verbose=verbose, shuffle=False)
        if initial_batch:
            # Finish the interrupted epoch first: a fit over just its remaining batches.
            logging.info("Resuming epoch %d at batch %d", initial_epoch + 1, initial_batch)
            net.fit(
                dataset(initial_epoch, 1, initial_batch),
                epochs=initial_epoch + 1,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps - initial_batch,
                **fit_kwargs,
            )
            initial_epoch += 1
        if initial_epoch < epochs and not checkpointer.stopped_by:
            net.fit(
                dataset(initial_epoch, epochs - initial_epoch),
                epochs=epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps,
                **fit_kwargs,
            )
        if checkpointer.stopped_by:
            raise Stopped(checkpointer.stopped_by, checkpointer.step, steps)
    else:
        logging.info("%s already holds all %d epochs", workdir, epochs)
    net.backbone.save_weights(os.path.join(workdir, "backbone.weights.h5"))
    return write_summary(workdir, net.proj_dim, time.time() - start)


class Stopped(RuntimeError):
    """Training stopped on Ctrl-C (SIGINT) or SIGTERM after saving a checkpoint.

    `exit_code` is the shell's convention for the signal: 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, signum: int, step: int, steps_per_epoch: int):
        epoch, batch = divmod(step, steps_per_epoch)
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        super().__init__(
            f"stopped by {name} at step {step} (epoch {epoch + 1}, batch {batch}) with a "
            "checkpoint saved; rerunning the same command resumes"
        )
        self.exit_code = 128 + signum


def write_summary(workdir: str, proj_dim: int, wall_seconds: float) -> dict:
    history = callbacks.read_history(os.path.join(workdir, "history.jsonl"))
    if not history:
        raise RuntimeError(f"{workdir}/history.jsonl is empty: no epoch finished")
    # A run imported from an official checkpoint (tools/import_torch.py) starts with a row of
    # epochs whose metrics are unknown; the loss and std come from the rows trained here.
    trained = [r for r in history if "loss" in r]
    first, last = (trained[0], trained[-1]) if trained else ({}, {})
    z_std = last.get("z_std")
    summary = {
        "epochs": history[-1]["epoch"],
        "loss_first": first.get("loss"),
        "loss_last": last.get("loss"),
        "z_std": z_std,
        "z_std_ratio": None if z_std is None else z_std * math.sqrt(proj_dim),
        "knn_top1": next((r["knn_top1"] for r in reversed(history) if "knn_top1" in r), None),
        "random_init_knn_top1": None,
        "wall_seconds": wall_seconds,
    }
    random_init_path = os.path.join(workdir, "random_init.json")
    if os.path.exists(random_init_path):
        with open(random_init_path) as f:
            summary["random_init_knn_top1"] = json.load(f)["knn_top1"]
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
