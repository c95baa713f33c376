"""The Python API: SimSiam around any Keras backbone, its input pipeline, its optimiser and
its export, with keyword arguments and the paper's defaults.

    import keras, simsiam_tf
    backbone = keras.applications.ResNet50V2(include_top=False, pooling="avg", weights=None,
                                             input_shape=(64, 64, 3))
    model = simsiam_tf.SimSiam.from_backbone(backbone)
    ds = simsiam_tf.pretrain_dataset("folder:photos", image_size=64, batch_size=32)
    model.compile(optimizer=simsiam_tf.sgd(model, batch_size=32, epochs=10, steps_per_epoch=100))
    model.fit(ds, epochs=10, steps_per_epoch=100)
    model.save("simsiam.keras")
    simsiam_tf.export_saved_model(model, "exports/simsiam", image_size=64)

These wrap what the command line runs (`simsiam_tf.train`): the same recipe, lr rule and
serving signatures.
"""

from __future__ import annotations

import datetime
import difflib
import os
import shutil
import tempfile
from typing import Optional

import ml_collections
import tensorflow as tf

from simsiam_tf import augment, data, export, optim
from simsiam_tf import config as config_lib
from simsiam_tf.errors import ConfigError
from simsiam_tf.model import SimSiam


def _section(name: str, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of the default config's section `name` with keyword overrides, each checked."""
    section = config_lib.default_config()[name]
    for key, value in overrides.items():
        if key not in section:
            hint = difflib.get_close_matches(key, list(section), n=1)
            raise TypeError(
                f"unknown argument {key}"
                + (f"; did you mean {hint[0]}?" if hint else f"; choose from {sorted(section)}")
            )
        section[key] = tuple(value) if isinstance(value, list) else value
    return section


def pretrain_dataset(
    source,
    image_size: int = 224,
    batch_size: int = 512,
    seed: int = 0,
    max_examples: int = 0,
    photometric: str = "cpu",
    tfds_data_dir: str = "",
    tfds_download: bool = True,
    **aug,
) -> tf.data.Dataset:
    """Endless batches {"view1", "view2"} of two augmented uint8 views of each image, for
    `SimSiam.fit` (with `steps_per_epoch`).

    Args:
      source: a source spec as the command line takes it ("folder:PATH", "archive:FILE",
        "tfds:NAME", "tfrecord:DIR", "builtin:digits"; its train split), or a tf.data.Dataset
        of images (uint8 0-255 or float 0-1, HxWx3, any sizes; elements may also be
        (image, label) pairs or dicts with an "image" key, whose other parts are dropped).
      image_size: side of the square views.
      batch_size: images per batch (each batch holds both views of every image).
      seed: every view is a pure function of (seed, epoch, batch) for a source spec, of
        (seed, position in the stream) for a dataset.
      max_examples: a seeded random subset of this many examples of a source spec (0: all).
      photometric: "cpu"; "device" leaves colour and blur to the train step, which then needs
        a SimSiam built with the recipe's device stage (as the command line builds it).
      **aug: the augmentation recipe's settings (`config.aug`), e.g. blur_prob=0.5 for the
        ImageNet recipe; the defaults are the CIFAR recipe (paper appendix D, MoCo v2 without
        blur): crop_scale=(0.2, 1.0), flip_prob=0.5, jitter_prob=0.8, brightness, contrast and
        saturation 0.4, hue 0.1, grayscale_prob=0.2.
    """
    aug_config = _section("aug", aug)
    data_config = _section(
        "data",
        dict(
            source=source if isinstance(source, str) else "builtin:digits",
            image_size=image_size,
            photometric=photometric,
            max_examples=max_examples,
            tfds_data_dir=tfds_data_dir,
            tfds_download=tfds_download,
        ),
    )
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size={image_size} and batch_size={batch_size} must be >= 1")
    if photometric not in config_lib.PHOTOMETRIC:
        raise ValueError(f"photometric={photometric!r}: choose one of {config_lib.PHOTOMETRIC}")
    if isinstance(source, tf.data.Dataset):
        return _dataset_views(source, aug_config, image_size, batch_size, seed, photometric)
    if not isinstance(source, str):
        raise TypeError(f"source must be a source spec or a tf.data.Dataset, got {type(source)}")
    kind, arg = data.parse_source(source)
    if kind in ("folder", "archive") and not os.path.exists(arg):
        raise ConfigError(f"source={source!r}: {arg} does not exist")
    loaded = data.load_source(
        source, "train", max_examples, seed, tfds_data_dir or None, tfds_download
    )
    if loaded is None:
        raise ConfigError(f"source={source!r} has no train split")
    if loaded.num_examples < batch_size:
        raise ConfigError(
            f"batch_size={batch_size} is larger than {loaded.name} ({loaded.num_examples} "
            "examples); lower it"
        )
    return data.pretrain_dataset(loaded, data_config, aug_config, batch_size, seed)


def _image_of(element):
    if isinstance(element, dict):
        return element["image"]
    if isinstance(element, (tuple, list)):
        return element[0]
    return element


def _dataset_views(ds, aug_config, size, batch_size, seed, photometric) -> tf.data.Dataset:
    """The two-view recipe over a dataset of images, each image's views keyed by its position."""
    recipe = augment.TwoViewRecipe(aug_config, size, photometric)
    base_seed = tf.constant([seed, 0x5157], tf.int64)

    def views(i, element):
        image = _image_of(element)
        if image.dtype != tf.uint8:  # floats in [0, 1]
            image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
        image_seed = augment.fold_seed(base_seed, i)
        out = {}
        for v in (1, 2):
            view_seed = augment.fold_seed(image_seed, v)
            out[f"view{v}"] = recipe.cpu_stage(image, view_seed)
            if photometric == "device":
                first = lambda t: t[0]  # one image: scalars, which tf.data batches
                out[f"params{v}"] = tf.nest.map_structure(first, recipe.device_params(view_seed, 1))
        return out

    ds = ds.repeat().enumerate().map(views, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def sgd(
    model: SimSiam,
    *,
    batch_size: int,
    epochs: int,
    steps_per_epoch: int,
    base_lr: float = 0.05,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    fix_pred_lr: bool = False,
    warmup_epochs: float = 0.0,
) -> optim.TorchSGD:
    """The official optimiser (main_simsiam.py): SGD with momentum and L2 weight decay as
    torch.optim.SGD, lr = base_lr x batch_size / 256 with cosine decay to 0 over exactly
    `epochs` x `steps_per_epoch` steps (give what `fit` runs).

    Defaults are the paper's ImageNet recipe (section 4, appendix A); CIFAR (appendix D) uses
    base_lr=0.03, weight_decay=5e-4. `fix_pred_lr`: the predictor keeps the initial lr
    (section 4.4 note; on in the paper's ImageNet runs).
    """
    lengths = dict(batch_size=batch_size, epochs=epochs, steps_per_epoch=steps_per_epoch)
    for key, value in lengths.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer")
    section = _section(
        "optim",
        dict(
            batch_size=batch_size,
            base_lr=base_lr,
            weight_decay=weight_decay,
            momentum=momentum,
            epochs=epochs,
            warmup_epochs=warmup_epochs,
            fix_pred_lr=fix_pred_lr,
        ),
    )
    if base_lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(
            f"base_lr={base_lr} must be > 0, weight_decay={weight_decay} >= 0 and "
            f"momentum={momentum} in [0, 1)"
        )
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs={warmup_epochs} must be in [0, epochs={epochs})")
    return optim.build_optimizer(
        section, batch_size, steps_per_epoch, predictor_vars=model.predictor.trainable_variables
    )


def export_saved_model(
    model: SimSiam,
    export_dir: str,
    image_size: int,
    crop_fraction: float = 1.0,
    version: Optional[int] = None,
    projection: bool = False,
    max_pixels: Optional[int] = None,
    max_batch: Optional[int] = None,
    max_request_pixels: Optional[int] = None,
    max_png_bytes: Optional[int] = None,
    max_request_png_bytes: Optional[int] = None,
) -> str:
    """Exports the model's backbone (and, with `projection`, its projector) as a new version of
    a TF Serving model, as `tools/export.py` does for a run; returns the version's directory.

    Signatures serving_default (uint8 images), serving_float (0-255 floats) and serving_bytes
    (encoded JPEG/PNG), each resizing to `image_size` (after keeping the centre
    `crop_fraction`) as evaluation does; outputs embedding, embedding_normalized (and
    projection). The version is written to a hidden temporary directory, loaded back and
    compared with the model, then renamed: a server watching export_dir never sees half a
    version, and an existing version is never overwritten. docs/SERVING.md has the details.

    The request limits (`export.resolve_limits`; each None takes its default for image_size):
    max_pixels (one image's height x width), max_batch (images per request),
    max_request_pixels (pixels per request), max_png_bytes and max_request_png_bytes
    (compressed PNG data per image and per request, which bound what decoding a PNG costs).
    """
    if version is not None and version < 0:
        raise export.ExportError(f"version={version}: versions are non-negative integers")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1]")
    base = os.path.abspath(export_dir)
    existing = export.versions(base)
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    final = os.path.join(base, str(version))
    if os.path.exists(final):
        raise export.ExportError(f"{final} already exists: versions are never overwritten")
    config = config_lib.default_config()
    config.data.image_size = int(image_size)
    config.data.eval_crop_fraction = float(crop_fraction)
    encoder = export.Encoder(
        backbone=model.backbone,
        projector=model.projector if projection else None,
        image_size=int(image_size),
        crop_fraction=float(crop_fraction),
        source=f"in-memory model {model.name}",
        config=config,
    )
    functions = export.ServingFunctions(
        encoder, max_pixels, max_batch, max_request_pixels, max_png_bytes, max_request_png_bytes
    )
    outputs = [export.EMBEDDING, export.EMBEDDING_NORMALIZED]
    metadata = {
        "weights": encoder.source,
        "version": version,
        "image_size": encoder.image_size,
        "eval_crop_fraction": encoder.crop_fraction,
        **functions.limits(),
        "max_aspect_ratio": export.MAX_ASPECT_RATIO,
        "embedding_dim": int(encoder(export.probe_images(image_size, 1))[outputs[0]].shape[-1]),
        "outputs": outputs + ([export.PROJECTION] if projection else []),
        "signatures": {s: export.SIGNATURE_INPUTS[s] for s in export.SIGNATURES},
        "tensorflow": tf.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would hide it from a server's user
        export.save(functions, tmp, metadata)
        export.verify(tmp, encoder)
        if os.path.exists(final):
            raise export.ExportError(f"{final} appeared while exporting; nothing was overwritten")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
