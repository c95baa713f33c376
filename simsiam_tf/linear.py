"""Linear evaluation: a linear classifier trained on the frozen backbone (paper appendix A/D).

The backbone is frozen and runs with BatchNorm in inference mode (moving statistics), as the
official `main_lincls.py` (`model.eval()`); only a Dense layer on the pooled features trains.
After training, the backbone's weights (BN moving statistics included) are compared with a
snapshot taken before: any change raises, so a reported accuracy is always that of the
pretrained representation.

Protocols (`PROTOCOLS`; every field can be overridden):
  cifar     SGD momentum 0.9, batch 256, lr 0.1 x batch/256 with cosine decay, weight decay 0,
            100 epochs, on features of the un-augmented images (computed once: minutes on a
            CPU). `augment=True` trains on random-resized-crop + flip views instead.
  imagenet  as the official main_lincls.py --lars: LARS (apex LARC, trust 0.001, no clipping,
            on the weight and on the bias; `lars_rule="mocov3"` exempts the bias), momentum
            0.9, batch 4096, lr 0.1 x batch/256 = 1.6 with cosine decay, weight decay 0, 90 epochs;
            RandomResizedCrop(224, scale 0.08-1) + flip for training, resize to 256 and centre
            crop 224 for evaluation; classifier initialised N(0, 0.01), bias 0. (The paper's
            appendix A quotes base lr 0.02; the released code's default, used here, is 0.1.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simsiam_tf import augment, data, holdout, optim

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    optimizer: str  # "sgd" (torch semantics) or "lars"
    batch_size: int
    base_lr: float  # lr = base_lr x batch_size / 256
    epochs: int
    weight_decay: float = 0.0
    momentum: float = 0.9
    augment: bool = False  # False: features of the un-augmented images, computed once
    crop_scale: tuple = (0.08, 1.0)  # RandomResizedCrop of the augmented training views
    eval_crop_fraction: Optional[float] = None  # None: the run's data.eval_crop_fraction
    # LARS only: "larc" is the official main_lincls.py --lars (apex LARC on every variable);
    # "mocov3" exempts biases from the trust ratio and decay as MoCo v3's LARS (optim.LARS).
    lars_rule: str = "larc"

    @property
    def lr(self) -> float:
        return optim.scaled_lr(self.base_lr, self.batch_size)


PROTOCOLS = {
    "cifar": Protocol("cifar", "sgd", batch_size=256, base_lr=0.1, epochs=100),
    "imagenet": Protocol(
        "imagenet",
        "lars",
        batch_size=4096,
        base_lr=0.1,
        epochs=90,
        augment=True,
        crop_scale=(0.08, 1.0),
        eval_crop_fraction=0.875,
    ),
}


def get_protocol(name: str, **overrides) -> Protocol:
    """A protocol by name with some fields replaced (None values are ignored)."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol={name!r} is not known; choose one of {tuple(PROTOCOLS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Protocol)}
    if unknown:
        raise ValueError(f"unknown protocol fields {sorted(unknown)}")
    proto = dataclasses.replace(PROTOCOLS[name], **overrides)
    if proto.optimizer not in ("sgd", "lars"):
        raise ValueError(f"optimizer={proto.optimizer!r}: choose 'sgd' or 'lars'")
    if proto.lars_rule not in optim.LARS_RULES:
        raise ValueError(f"lars_rule={proto.lars_rule!r}: choose one of {optim.LARS_RULES}")
    for key in ("batch_size", "epochs"):
        if getattr(proto, key) < 1:
            raise ValueError(f"{key}={getattr(proto, key)} must be a positive integer")
    if proto.base_lr <= 0:
        raise ValueError(f"base_lr={proto.base_lr} must be > 0")
    return proto


# ------------------------------------------------------------------------------------------------
# The frozen backbone.


def snapshot(model: keras.Model) -> list:
    """Copies of every weight of a model, trainable or not (BN moving statistics included)."""
    return [np.array(w) for w in model.get_weights()]


def changed_weights(model: keras.Model, before: list) -> list:
    """Names of the weights that differ from a `snapshot`."""
    return [
        w.path
        for w, old in zip(model.weights, before)
        if w.shape != old.shape or not np.array_equal(np.asarray(w), old)
    ]


def build_head(feat_dim: int, num_classes: int) -> keras.Model:
    """The linear classifier, initialised as main_lincls.py: weights N(0, 0.01), bias 0."""
    inputs = keras.Input((feat_dim,), name="features")
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer="zeros",
        name="fc",
    )(inputs)
    return keras.Model(inputs, logits, name="linear_head")


class LinearProbe(keras.Model):
    """Frozen backbone (BN in inference mode whatever `training` says) + linear head."""

    def __init__(self, backbone: keras.Model, head: keras.Model, **kwargs):
        super().__init__(**kwargs)
        backbone.trainable = False
        self.backbone = backbone
        self.head = head

    def call(self, images, training=False):
        features = self.backbone(images, training=False)  # NxC, never batch statistics
        return self.head(features, training=training)  # N x classes


def features(backbone: keras.Model, dataset) -> tuple:
    """Pooled backbone features (not normalised; BN in inference mode) and labels."""
    feats, labels = [], []
    for images, y in dataset:
        feats.append(np.asarray(backbone.predict_on_batch(images), np.float32))
        labels.append(np.asarray(y))
    return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Data.


def augmented_dataset(
    source: data.Source, size: int, batch: int, scale: tuple, seed: int
) -> tf.data.Dataset:
    """Endless batches (RandomResizedCrop(size, scale) + flip views in [0, 1], labels),
    reshuffled every epoch; each random draw keyed by (seed, example count)."""
    n = source.num_examples
    base_seed = tf.constant([seed, 0x11C5], tf.int64)
    order = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)
    order = order.repeat()
    if source.in_memory:
        images, labels = tf.constant(source.images), tf.constant(source.labels)
        ds = order.map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
    elif source.files is not None:
        files, labels = tf.constant(source.files), tf.constant(source.labels)
        ds = order.map(
            lambda i: (data.decode_rgb(tf.io.read_file(tf.gather(files, i))), tf.gather(labels, i))
        )
    else:  # streamed TFDS: a shuffle buffer
        ds = source.encoded().shuffle(min(n, 10_000), seed=seed).repeat()
        ds = ds.map(lambda x, y: (data.decode_rgb(x), y))

    def view(count, example):
        image, label = example
        s = augment.fold_seed(base_seed, count)
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        y, x, ch, cw = augment.sample_crop_windows(s, h, w, 1, scale)
        flip = augment.sample_flips(augment.fold_seed(s, 7), 1)[0]
        crop = augment.crop_resize_flip(image, (y[0], x[0], ch[0], cw[0]), flip, size)
        return tf.cast(crop, tf.float32) / 255.0, label

    ds = ds.enumerate().map(view, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch, drop_remainder=True).prefetch(AUTOTUNE)


def _feature_dataset(feats: np.ndarray, labels: np.ndarray, batch: int, seed: int):
    n = len(feats)
    ds = tf.data.Dataset.from_tensor_slices((feats, labels))
    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.batch(batch, drop_remainder=n >= batch).prefetch(AUTOTUNE)


# ------------------------------------------------------------------------------------------------
# Training and scoring.


def build_optimizer(proto: Protocol, total_steps: int):
    schedule = optim.WarmupCosine(proto.lr, total_steps=max(total_steps, 1))
    if proto.optimizer == "lars":
        return optim.LARS(
            schedule,
            momentum=proto.momentum,
            l2_weight_decay=proto.weight_decay,
            rule=proto.lars_rule,
        )
    return optim.TorchSGD(schedule, momentum=proto.momentum, l2_weight_decay=proto.weight_decay)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[-1])
    top = np.argsort(-logits, axis=-1)[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=-1)))


def linear_eval(
    backbone: keras.Model,
    train_source: data.Source,
    test_source: data.Source,
    image_size: int,
    proto: Protocol,
    crop_fraction: float = 1.0,
    seed: int = 0,
    eval_batch: int = 256,
    verbose: int = 0,
) -> dict:
    """Trains a linear head on the frozen backbone; returns top-1 (and top-5, with more than 5
    classes) on `test_source`. `verbose`: Keras verbosity while the head trains (0: quiet).

    Raises RuntimeError if any backbone weight changed while the head trained.
    """
    start = time.time()
    num_classes = int(max(train_source.num_classes, test_source.num_classes))
    if num_classes < 2:
        raise ValueError(f"linear evaluation needs labels; {train_source.name} has none")
    before = snapshot(backbone)
    backbone.trainable = False
    keras.utils.set_random_seed(seed)
    feat_dim = int(backbone.output.shape[-1])
    head = build_head(feat_dim, num_classes)
    eval_crop = proto.eval_crop_fraction if proto.eval_crop_fraction is not None else crop_fraction
    steps = max(train_source.num_examples // proto.batch_size, 1)
    opt = build_optimizer(proto, steps * proto.epochs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if proto.augment:
        trainee = LinearProbe(backbone, head)
        train_ds = augmented_dataset(
            train_source, image_size, proto.batch_size, proto.crop_scale, seed
        )
    else:
        train_feats, train_labels = features(
            backbone, data.eval_dataset(train_source, image_size, eval_batch, eval_crop)
        )
        trainee = head
        train_ds = _feature_dataset(train_feats, train_labels, proto.batch_size, seed)
    trainee.compile(optimizer=opt, loss=loss)
    logging.info(
        "linear %s: %s, %d examples, %d steps x %d epochs, batch %d, lr %g",
        proto.name,
        proto.optimizer,
        train_source.num_examples,
        steps,
        proto.epochs,
        proto.batch_size,
        proto.lr,
    )
    history = trainee.fit(
        train_ds, epochs=proto.epochs, steps_per_epoch=steps, verbose=verbose, shuffle=False
    ).history

    test_feats, test_labels = features(
        backbone, data.eval_dataset(test_source, image_size, eval_batch, eval_crop)
    )
    logits = np.asarray(head.predict(test_feats, batch_size=4096, verbose=0))
    changed = changed_weights(backbone, before)
    if changed:
        raise RuntimeError(
            f"the backbone changed while the linear head trained ({len(changed)} weights, "
            f"e.g. {changed[:3]}): the evaluation is void"
        )
    result = {"top1": topk_accuracy(logits, test_labels, 1)}
    if num_classes > 5:  # with 5 classes or fewer the top 5 always holds the answer
        result["top5"] = topk_accuracy(logits, test_labels, 5)
    return result | {
        "train_loss_last": float(history["loss"][-1]),
        "backbone_unchanged": True,
        "protocol": dataclasses.asdict(proto) | {"lr": proto.lr},
        "num_train": train_source.num_examples,
        "num_test": test_source.num_examples,
        "num_classes": num_classes,
        "train_data": train_source.name,
        "test_data": test_source.name,
        "wall_seconds": time.time() - start,
    }


# ------------------------------------------------------------------------------------------------
# Run directories.


def weights_info(workdir: str, random_init: bool = False, weights: str = "") -> dict:
    """Which weights `load_run_backbone` loads: {"kind": random_init, file, checkpoint or final,
    "path", "epoch", "step"}. The epoch is that of the checkpoint (checkpoints are numbered by
    step; fractional for a mid-epoch backup), None when unknown (a --weights file)."""
    if random_init:
        return dict(kind="random_init", path=None, epoch=0, step=0)
    if weights:
        return dict(kind="file", path=weights, epoch=None, step=None)
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    if latest:
        step = int(latest.rsplit("-", 1)[1])
        epoch = None
        spe_path = os.path.join(workdir, "checkpoints", "steps_per_epoch.json")
        if os.path.exists(spe_path):
            with open(spe_path) as f:
                steps_per_epoch = json.load(f)["steps_per_epoch"]
            whole, part = divmod(step, steps_per_epoch)
            epoch = whole if part == 0 else round(step / steps_per_epoch, 3)
        return dict(kind="checkpoint", path=latest, epoch=epoch, step=step)
    path = os.path.join(workdir, "backbone.weights.h5")
    if os.path.exists(path):
        from simsiam_tf import callbacks

        rows = callbacks.read_history(os.path.join(workdir, "history.jsonl"))
        last = rows[-1] if rows else {}
        return dict(kind="final", path=path, epoch=last.get("epoch"), step=last.get("step"))
    raise FileNotFoundError(f"{workdir} has neither checkpoints/ nor backbone.weights.h5")


def describe(info: dict, seed: int = 0) -> str:
    """`weights_info` in words: where the weights come from and their epoch."""
    if info["kind"] == "random_init":
        return f"random initialisation (seed {seed}, epoch 0)"
    if info["epoch"] is None:
        return info["path"]
    return f"{info['path']} (epoch {info['epoch']}, step {info['step']})"


def load_run_backbone(workdir: str, random_init: bool = False, weights: str = "") -> tuple:
    """(backbone, config, where the weights came from) of a pretraining run directory.

    The backbone is rebuilt from WORKDIR/config.json; its weights come from `weights` (a
    `.weights.h5` file) when given, else the latest checkpoint (the run may still be going),
    else WORKDIR/backbone.weights.h5. `random_init=True` returns the same network at the
    initialisation the run started from (same seed), the baseline every number is compared to.
    `weights_info` tells the epoch.
    """
    from simsiam_tf import model, train  # train imports this module's siblings only

    config = train.load_config(workdir)
    info = weights_info(workdir, random_init, weights)
    keras.utils.set_random_seed(config.seed)
    net = model.build_simsiam(config.model)
    if info["kind"] == "checkpoint":
        tf.train.Checkpoint(model=net).restore(info["path"]).expect_partial()
    elif info["kind"] in ("file", "final"):
        net.backbone.load_weights(info["path"])
    return net.backbone, config, describe(info, config.seed)


def eval_sources(
    config,
    workdir: Optional[str],
    spec: str = "",
    train_split: str = "train",
    test_split: str = "test",
    max_train: int = 0,
    max_test: int = 0,
) -> tuple:
    """(train, test, held-out record or None): labelled Sources read as training reads them
    (`holdout.load_split`): the run's recorded held-out split of a source without a test split,
    its image check (broken files skipped and named, or refused under data.strict)."""
    spec = spec or config.data.source
    train_src, _ = holdout.load_split(config, train_split, workdir, spec, max_train)
    if train_src is None:
        raise ValueError(f"{spec} has no {train_split!r} split")
    if train_src.num_classes == 1:
        raise ValueError(
            f"{train_src.name} has one class ({train_src.class_names[0]}): evaluation needs "
            "at least 2 class subfolders"
        )
    if train_src.num_classes < 2:
        raise ValueError(f"{train_src.name} is unlabelled: evaluation needs class subfolders")
    test_src, info = holdout.load_split(config, test_split, workdir, spec, max_test)
    if test_src is None:
        raise ValueError(
            f"{spec} has no {test_split!r} split"
            + (
                ""
                if config.eval.holdout_fraction
                else " and eval.holdout_fraction=0 holds none out"
            )
        )
    return train_src, test_src, info
