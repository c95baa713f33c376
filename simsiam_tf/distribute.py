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


def make_strategy(cpu_devices: int = 0) -> tf.distribute.Strategy:
    if os.environ.get("TF_CONFIG"):
        cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        logging.info("TF_CONFIG found: MultiWorkerMirroredStrategy over %s", cluster)
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        logging.info("MirroredStrategy over %d GPU(s)", len(gpus))
        return tf.distribute.MirroredStrategy()
    if cpu_devices > 1:
        split_cpu(cpu_devices)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_devices]
        logging.info("MirroredStrategy over %d logical CPU devices", len(devices))
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()
