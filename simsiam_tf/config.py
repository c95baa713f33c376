"""The configuration schema: defaults shared by every recipe in configs/, and validation.

Every recipe file in configs/ starts from `default_config()` and overrides what it changes.
`validate` runs before any data is read, so a bad value fails in seconds with a message that
names the key and the allowed values.
"""

from __future__ import annotations

import os

import ml_collections

from simsiam_tf import augment, data, imagecheck, model, native
from simsiam_tf.errors import ConfigError

PHOTOMETRIC = ("cpu", "device")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# Smallest input each backbone accepts (its total stride, so the last stage is at least 1x1).
MIN_IMAGE_SIZE = {"cnn_small": 8, "resnet18_cifar": 8, "resnet18": 32, "resnet50": 32}


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = dict(
        backbone="resnet18_cifar",
        width=32,  # base width of cnn_small only
        zero_init_residual=True,
        sync_bn=False,
        # The type BatchNorm adds its batch sums in: "auto" = float64 for a float32 model
        # (torch's CPU kernels sum in double; make parity bounds float32 by the official
        # float32), float32 under mixed precision and on TPUs; "float32" is cuDNN's choice
        # and a faster BN step; "fused" is TensorFlow's fused BN kernel, the fastest step and
        # the fewest digits (docs/FIDELITY.md, docs/PERFORMANCE.md).
        bn_sums="auto",
        # BatchNorm's training step with float64 sums: "auto" = the native kernels
        # (kernels/batchnorm_ops.cc: the sums in double, four passes over the activations,
        # 4.5x faster than stock ops on the CPU) where built and no GPU is visible, else stock
        # ops; "native" insists; "tf" = stock TensorFlow ops always. Both steps pass the float32
        # parity at seeds 0-3 against the floor over four official runs (docs/FIDELITY.md).
        bn_kernels="auto",
        proj_dim=2048,
        proj_hidden=2048,
        proj_layers=2,
        pred_hidden=512,
        pred_hidden_bn=True,
        predictor="mlp",  # ablations: "identity", "fixed_random"
        stop_gradient=True,  # ablation: False collapses (paper Figure 2)
        symmetric=True,
    )

    c.data = dict(
        source="builtin:digits",
        max_examples=0,  # 0: every example; otherwise a seeded random subset
        image_size=32,
        photometric="cpu",  # "device": colour/blur run in the train step on the accelerator
        threads=0,  # tf.data threads; 0: one per core
        # TensorFlow's intra-op threads for the whole process. -1 (auto): 1 when training on
        # GPUs or a TPU, so that no op of one example (the oneDNN matmuls of the crop and the
        # blur) splits over the cores on which tf.data already runs an example each; it did,
        # and 2 cores gave 1.27x the pairs of 1 (docs/PERFORMANCE.md). On the CPU alone the
        # step's convolutions need the pool: TensorFlow's default (all cores). N > 0: N.
        intra_op_threads=-1,
        # Streamed sources (TFDS sets too large for memory, TFRecords) only: examples mix through
        # a buffer this wide, seeded per epoch, after a per-epoch shard order. Others are fully
        # permuted every epoch.
        shuffle_buffer=10_000,
        tfds_data_dir="",
        tfds_download=True,
        eval_crop_fraction=1.0,  # 1: resize; 0.875: resize to size/0.875 and centre-crop
        # Image folders: check every file once up front and skip broken ones (verdicts cached per
        # folder). image_check="header": read each file's first and last bytes, decode only what
        # they leave in doubt, and replace a file that still fails in training by its neighbour
        # (counted); "decode": decode every file up front (reads the whole data set).
        check_images=True,
        image_check="header",
        strict=False,  # with check_images: fail on a broken file instead of skipping it
    )

    # The CIFAR recipe (paper appendix D): MoCo v2 augmentations without blur.
    c.aug = dict(
        crop_scale=(0.2, 1.0),
        crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
        flip_prob=0.5,
        jitter_prob=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        grayscale_prob=0.2,
        blur_prob=0.0,
        blur_sigma=(0.1, 2.0),
        # Layers by name, ";"-separated, e.g. "RandomSharpness(factor=0.5, value_range=(0, 1))":
        # `extra` runs after the recipe, `recipe` replaces it (see simsiam_tf/augment.py).
        recipe="",
        extra="",
        # The per-image crop and colour jitter in tf.data: "auto" runs the C++ kernels of
        # simsiam_tf/native.py where built (make install builds them), else stock TensorFlow
        # ops; "native" requires them; "tf" never uses them. Same results to float rounding.
        kernels="auto",
    )

    c.optim = dict(
        batch_size=512,  # global, over all replicas
        base_lr=0.03,  # lr = base_lr x batch_size / 256
        weight_decay=5e-4,
        momentum=0.9,
        epochs=800,
        warmup_epochs=0.0,
        # "per_step": cosine evaluated every step (warm-up allowed); "per_epoch": main_simsiam.py's
        # adjust_learning_rate, the lr set once per epoch (no warm-up), as the paper recipes
        lr_schedule="per_step",
        fix_pred_lr=False,
    )

    c.train = dict(
        steps_per_epoch=0,  # 0: one pass over the data; > 0: shorter epochs (smoke tests)
        cpu_devices=0,  # > 1: split the CPU into this many logical devices (multi-replica anywhere)
        tpu="",  # a TPU name or grpc:// address ("local" on a TPU VM): TPUStrategy
        precision="float32",
        jit_compile=False,
        keep_checkpoints=3,
        backup_every_steps=500,  # also checkpoint every N steps (0: only after each epoch)
        deterministic=False,  # op determinism: bit-identical reruns and resumes, slower
        verbose=1,  # Keras progress bar: 1 bar, 2 one line per epoch, 0 silent
        log_every_steps=100,  # TensorBoard step/* scalars every N steps (0: per epoch only)
    )

    c.eval = dict(
        knn_every_epochs=10,  # 0: kNN only at the end
        knn_k=200,
        knn_t=0.1,
        knn_batch=256,
        bank_split="train",
        query_split="test",
        max_bank=0,  # 0: the whole bank split
        max_queries=0,
        # The kNN monitor during training scores seeded class-stratified subsets of at most
        # this many bank and query images (0: all): CIFAR-10 whole, ImageNet in under 5% of an
        # epoch's images. tools/eval_knn.py uses max_bank / max_queries.
        monitor_max_bank=50_000,
        monitor_max_queries=10_000,
        knn_bank_dtype="float32",  # "float16" halves the bank (1.28M x 2048: 5.2 GB)
        random_init_knn=True,  # also score the network at initialisation, for comparison
        # A labelled source without a test split (a folder of class subfolders, no test/):
        # this seeded fraction of every class is held out of pretraining and scored by kNN
        # and the linear probe (simsiam_tf/holdout.py); 0: pretrain on all, no evaluation.
        holdout_fraction=0.2,
        holdout_seed=0,
        # Collapse monitor (simsiam_tf/collapse.py): std x sqrt(d) of z and p below the
        # threshold (healthy: about 1) for `patience` epochs in a row warns, or stops the run.
        collapse_threshold=0.5,
        collapse_patience=3,
        collapse_stop=False,
    )
    return c


def _fail(key, value, expected):
    raise ConfigError(f"config.{key}={value!r} is invalid: {expected}")


def validate(c: ml_collections.ConfigDict, num_replicas: int = 1) -> None:
    """Raises ConfigError naming the first bad key. Reads no data."""
    m, d, a, o, t, e = c.model, c.data, c.aug, c.optim, c.train, c.eval
    backbone_error = model.backbone_error(m.backbone)
    if backbone_error:
        raise ConfigError(backbone_error)
    if m.get("bn_sums", "auto") not in model.BatchNorm.SUM_DTYPES:
        _fail("model.bn_sums", m.bn_sums, f"choose one of {model.BatchNorm.SUM_DTYPES}")
    if m.get("bn_kernels", "auto") not in native.KERNELS:
        _fail("model.bn_kernels", m.bn_kernels, f"choose one of {native.KERNELS}")
    if m.get("bn_kernels", "auto") == "native":
        native.ops("native", setting="model.bn_kernels")  # not built: named now
    if m.predictor not in model.PREDICTORS:
        _fail("model.predictor", m.predictor, f"choose one of {model.PREDICTORS}")
    for key in ("proj_dim", "proj_hidden", "proj_layers", "pred_hidden", "width"):
        if m[key] < 1:
            _fail(f"model.{key}", m[key], "must be a positive integer")
    kind, arg = data.parse_source(d.source)
    if kind == "folder" and not os.path.isdir(arg):
        _fail("data.source", d.source, f"folder {arg} does not exist")
    if kind == "archive" and not os.path.isfile(arg):
        _fail(
            "data.source",
            d.source,
            f"archive {arg} does not exist (paths are relative to the current directory; "
            "without the archive, data.source=tfds:NAME downloads a data set)",
        )
    if d.photometric not in PHOTOMETRIC:
        _fail("data.photometric", d.photometric, f"choose one of {PHOTOMETRIC}")
    min_size = MIN_IMAGE_SIZE.get(m.backbone, 32)  # keras.applications / keras-cv: stride 32
    if d.image_size < min_size:
        _fail(
            "data.image_size", d.image_size, f"{m.backbone} needs images of at least {min_size} px"
        )
    if d.image_check not in imagecheck.MODES:
        _fail("data.image_check", d.image_check, f"choose one of {imagecheck.MODES}")
    if m.backbone not in MIN_IMAGE_SIZE:  # built once, in seconds: its stem's own minimum
        size_error = model.input_size_error(m.backbone, d.image_size)
        if size_error:
            raise ConfigError(size_error)
    if d.max_examples < 0:
        _fail("data.max_examples", d.max_examples, "must be >= 0 (0: all)")
    if not 0 < d.eval_crop_fraction <= 1:
        _fail("data.eval_crop_fraction", d.eval_crop_fraction, "must be in (0, 1]")
    lo, hi = a.crop_scale
    if not 0 < lo <= hi <= 1:
        _fail("aug.crop_scale", a.crop_scale, "needs 0 < min <= max <= 1")
    if not 0 < a.crop_ratio[0] <= a.crop_ratio[1]:
        _fail("aug.crop_ratio", a.crop_ratio, "needs 0 < min <= max")
    for key in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
        if not 0 <= a[key] <= 1:
            _fail(f"aug.{key}", a[key], "is a probability in [0, 1]")
    for key in ("brightness", "contrast", "saturation"):
        if a[key] < 0:
            _fail(f"aug.{key}", a[key], "must be >= 0")
    if not 0 <= a.hue <= 0.5:
        _fail("aug.hue", a.hue, "must be in [0, 0.5] (torchvision ColorJitter)")
    if not 0 < a.blur_sigma[0] <= a.blur_sigma[1]:
        _fail("aug.blur_sigma", a.blur_sigma, "needs 0 < min <= max")
    if a.get("kernels", "auto") not in native.KERNELS:
        _fail("aug.kernels", a.kernels, f"choose one of {native.KERNELS}")
    augment.TwoViewRecipe(a, d.image_size, d.photometric)  # names, arguments, device split
    if o.batch_size < 1:
        _fail("optim.batch_size", o.batch_size, "must be a positive integer")
    if o.batch_size % num_replicas:
        _fail(
            "optim.batch_size",
            o.batch_size,
            f"the global batch must divide evenly over the {num_replicas} replicas",
        )
    if o.base_lr <= 0:
        _fail("optim.base_lr", o.base_lr, "must be > 0")
    if o.epochs < 1:
        _fail("optim.epochs", o.epochs, "must be a positive integer")
    if o.warmup_epochs < 0:
        _fail("optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    if o.warmup_epochs >= o.epochs:
        _fail(
            "optim.warmup_epochs",
            o.warmup_epochs,
            f"the warm-up must be shorter than the run (optim.epochs={o.epochs}); set "
            f"--config.optim.warmup_epochs below {o.epochs} or raise --config.optim.epochs",
        )
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, "must be >= 0")
    if not 0 <= o.momentum < 1:
        _fail("optim.momentum", o.momentum, "must be in [0, 1)")
    if t.steps_per_epoch < 0:
        _fail("train.steps_per_epoch", t.steps_per_epoch, "must be >= 0 (0: a full pass)")
    if t.backup_every_steps < 0:
        _fail("train.backup_every_steps", t.backup_every_steps, "must be >= 0 (0: epochs only)")
    if t.precision not in PRECISIONS:
        _fail("train.precision", t.precision, f"choose one of {PRECISIONS}")
    if t.log_every_steps < 0:
        _fail("train.log_every_steps", t.log_every_steps, "must be >= 0 (0: per epoch only)")
    if not 0 <= e.holdout_fraction < 1:
        _fail("eval.holdout_fraction", e.holdout_fraction, "must be in [0, 1) (0: hold none out)")
    if e.holdout_seed < 0:
        _fail("eval.holdout_seed", e.holdout_seed, "must be a non-negative integer")
    if e.knn_bank_dtype not in ("float32", "float16"):
        _fail("eval.knn_bank_dtype", e.knn_bank_dtype, "choose float32 or float16")
    for key in ("max_bank", "max_queries", "monitor_max_bank", "monitor_max_queries"):
        if e[key] < 0:
            _fail(f"eval.{key}", e[key], "must be >= 0 (0: all)")
    if e.knn_k < 1:
        _fail("eval.knn_k", e.knn_k, "must be a positive integer")
    if e.knn_t <= 0:
        _fail("eval.knn_t", e.knn_t, "must be > 0")
    if not 0 < e.collapse_threshold <= 1:
        _fail("eval.collapse_threshold", e.collapse_threshold, "must be in (0, 1] (healthy: ~1)")
    if e.collapse_patience < 1:
        _fail("eval.collapse_patience", e.collapse_patience, "must be a positive integer (epochs)")
