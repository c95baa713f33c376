"""A pretraining run: config in, run directory out.

WORKDIR/
  config.json          the resolved config
  checkpoints/         model + optimizer + epoch, after every epoch (resume point)
  tb/                  TensorBoard logs (loss, z_std, p_std, lr, knn_top1)
  history.jsonl        one line of metrics per epoch
  random_init.json     kNN top-1 of the network at initialisation
  backbone.weights.h5  the trained backbone
  summary.json         the run's result
"""

from __future__ import annotations

import json
import math
import os
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
    imagecheck,
    model,
    optim,
)
from simsiam_tf import config as config_lib
from simsiam_tf.errors import ConfigError


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != new:
            logging.warning("%s differs from the config of this run; the new one is kept", path)
    with open(path, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)


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
        augmenter = (
            augment.PhotometricAugment(config.aug) if config.data.photometric == "device" else None
        )
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


def make_knn_evaluator(config, workdir=None, train_source=None):
    """A kNN evaluator for the configured source, or None when it has no labelled test split.

    `train_source`, the already loaded (and checked) training split, is reused as the bank when
    the bank is that very split and subset, so it is not read and decoded a second time.
    """
    d, e = config.data, config.eval
    kwargs = dict(
        max_examples=0,
        seed=config.seed,
        tfds_data_dir=d.tfds_data_dir or None,
        tfds_download=d.tfds_download,
    )

    def load(split, max_examples):
        source = data.load_source(d.source, split, **{**kwargs, "max_examples": max_examples})
        if source is not None and d.check_images:
            source = imagecheck.drop_undecodable(source, d.strict, workdir)
        return source

    if train_source is not None and e.bank_split == "train" and e.max_bank == d.max_examples:
        bank = train_source
    else:
        bank = load(e.bank_split, e.max_bank)
    queries = load(e.query_split, e.max_queries)
    if bank is None or queries is None or bank.num_classes < 2:
        logging.warning(
            "No kNN evaluation: %s has no labelled %r and %r splits",
            d.source,
            e.bank_split,
            e.query_split,
        )
        return None
    return callbacks.KnnEvaluator(bank, queries, d.image_size, e, d.eval_crop_fraction)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrains (or resumes) SimSiam as configured; returns the summary written to the run."""
    start = time.time()
    strategy = distribute.make_strategy(config.train.cpu_devices, config.train.tpu)
    config_lib.validate(config, strategy.num_replicas_in_sync)
    keras.mixed_precision.set_global_policy(config.train.precision)
    keras.utils.set_random_seed(config.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    workers = distribute.num_workers(strategy)
    if not distribute.is_chief(strategy):
        # Every worker takes part in every step and save; only the chief writes WORKDIR.
        workdir = os.path.join(workdir, ".workers", str(strategy.cluster_resolver.task_id))
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)

    d = config.data
    source = data.load_source(
        d.source, "train", d.max_examples, config.seed, d.tfds_data_dir or None, d.tfds_download
    )
    if d.check_images:
        source = imagecheck.drop_undecodable(source, d.strict, workdir)
    global_batch = config.optim.batch_size
    steps = source.num_examples // global_batch
    # Several workers on TFRecords: each reads its own shard files (per-worker batches).
    by_file = workers > 1 and data.parse_source(d.source)[0] == "tfrecord"
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
    evaluator = make_knn_evaluator(config, workdir, source) if workers == 1 else None
    if workers > 1:
        logging.info("%d workers: no kNN during training; run tools/eval_knn.py after", workers)

    random_init_path = os.path.join(workdir, "random_init.json")
    if evaluator and config.eval.random_init_knn and not os.path.exists(random_init_path):
        if checkpointer.step == 0:
            top1 = evaluator(net.backbone)
            logging.info("kNN top-1 at initialisation: %.4f", top1)
            with open(random_init_path, "w") as f:
                json.dump({"knn_top1": top1}, f)

    epochs = config.optim.epochs
    history_path = os.path.join(workdir, "history.jsonl")
    if initial_epoch < epochs:

        def dataset(first_epoch, num_epochs, first_batch=0):
            def make(shard):
                src, batch = source, global_batch
                if by_file:
                    src, batch = shares[shard[0]], global_batch // workers
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
                )

            return distribute.distribute_batches(strategy, make, global_batch, by_file)

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
            cbs.insert(1, callbacks.KnnMonitor(evaluator, config.eval.knn_every_epochs, epochs))
        cbs.append(keras.callbacks.TensorBoard(os.path.join(workdir, "tb"), update_freq="epoch"))
        fit_kwargs = dict(callbacks=cbs, verbose=config.train.verbose, shuffle=False)
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
        if initial_epoch < epochs and not checkpointer.preempted:
            net.fit(
                dataset(initial_epoch, epochs - initial_epoch),
                epochs=epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps,
                **fit_kwargs,
            )
        if checkpointer.preempted:
            raise Preempted(f"stopped by SIGTERM at step {checkpointer.step}; rerun to resume")
    else:
        logging.info("%s already holds all %d epochs", workdir, epochs)
    net.backbone.save_weights(os.path.join(workdir, "backbone.weights.h5"))
    return write_summary(workdir, net.proj_dim, time.time() - start)


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after saving a checkpoint."""


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
