"""Choosing a tf.distribute strategy.

TF_CONFIG set           MultiWorkerMirroredStrategy (one process per machine)
one or more GPUs        MirroredStrategy over all visible GPUs
cpu_devices > 1         MirroredStrategy over that many logical CPU devices (tests, laptops)
otherwise               the default strategy
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
from absl import logging

from simsiam_tf.errors import ConfigError


def split_cpu(n: int) -> None:
    """Splits the physical CPU into n logical devices. Must run before TensorFlow starts."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"train.cpu_devices={n}: TensorFlow was already initialised with "
            f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s); set it before any "
            "TensorFlow op runs"
        ) from err


def set_intra_op_threads(intra_op_threads: int = -1, tpu: str = "") -> int:
    """Sets TensorFlow's intra-op pool (`data.intra_op_threads`) before the runtime starts;
    returns the count set (0: TensorFlow's default, all cores).

    -1 (auto): 1 with GPUs or a TPU, where the step's ops run on the accelerator and the CPU
    cores feed it, tf.data running one example per core: an op of an example that splits over
    every core (TensorFlow's oneDNN kernels take the process's intra-op pool, not tf.data's
    own) then only adds synchronisation, 38% more CPU per pair on 2 cores. 0 without an
    accelerator, where the CPU step's convolutions need the pool."""
    if intra_op_threads < -1:
        raise ConfigError(
            f"data.intra_op_threads={intra_op_threads}: give -1 (auto), 0 (all cores) or N > 0"
        )
    if intra_op_threads == -1:
        intra_op_threads = 1 if tpu or tf.config.list_physical_devices("GPU") else 0
    if (
        intra_op_threads
        and intra_op_threads != tf.config.threading.get_intra_op_parallelism_threads()
    ):
        try:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        except RuntimeError:
            logging.warning(
                "data.intra_op_threads=%d not applied: TensorFlow had already started in this "
                "process",
                intra_op_threads,
            )
            return tf.config.threading.get_intra_op_parallelism_threads()
    return intra_op_threads


def make_strategy(cpu_devices: int = 0, tpu: str = "") -> tf.distribute.Strategy:
    if tpu:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        logging.info("TPUStrategy on %s", tpu)
        return tf.distribute.TPUStrategy(resolver)
    if os.environ.get("TF_CONFIG"):
        cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        logging.info("TF_CONFIG found: MultiWorkerMirroredStrategy over %s", cluster)
        return tf.distribute.MultiWorkerMirroredStrategy()
    # Physical devices: listing them does not start the runtime, so the CPU can still be split
    # below (listing logical devices would initialise TensorFlow with one CPU device).
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        logging.info("MirroredStrategy over %d GPU(s)", len(gpus))
        return tf.distribute.MirroredStrategy()
    if cpu_devices > 1:
        split_cpu(cpu_devices)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_devices]
        logging.info("MirroredStrategy over %d logical CPU devices", len(devices))
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def num_workers(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    jobs = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return max(1, len(jobs.get("worker", [])) + len(jobs.get("chief", [])))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one process that writes the run directory: the chief, else worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or num_workers(strategy) == 1:
        return True
    if resolver.task_type == "chief":
        return True
    return (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and ("chief" not in resolver.cluster_spec().as_dict())
    )


def distribute_batches(strategy, make_dataset, global_batch: int, per_worker: bool = False):
    """Input for `fit` under `strategy`, from `make_dataset(shard)` -> a tf.data.Dataset.

    One worker: the dataset of global batches itself (Keras splits each batch over the local
    replicas). Several workers (MultiWorkerMirroredStrategy): each worker reads only its share.
    With `per_worker`, `make_dataset((index, count))` yields that worker's batches of
    global_batch / count itself: its rows of every global batch for an image folder (only
    those files are read and decoded), its own shard files for TFRecords. Otherwise (in-memory
    and streamed TFDS sources) every worker builds the same global batch and keeps rows
    [index * B/W, (index + 1) * B/W) of it. Either way W workers see exactly the batch one
    process would (the per-image random draws included). Per-worker batches are then cut into
    per-replica ones.
    """
    workers = num_workers(strategy)
    if workers == 1:
        return make_dataset((0, 1))

    def per_worker_input(ctx: tf.distribute.InputContext):
        per_worker_batch = global_batch // ctx.num_input_pipelines
        index = ctx.input_pipeline_id
        if per_worker:
            ds = make_dataset((index, ctx.num_input_pipelines))
        else:
            lo, hi = index * per_worker_batch, (index + 1) * per_worker_batch
            ds = make_dataset((0, 1)).map(
                lambda batch: tf.nest.map_structure(lambda t: t[lo:hi], batch)
            )
        return ds.rebatch(ctx.get_per_replica_batch_size(global_batch))

    return strategy.distribute_datasets_from_function(per_worker_input)
