"""Throughput of the input pipeline, of the training step, and of both together.

    # view pairs/s of the project's own pipeline, on an image folder, with N CPU threads
    python tools/benchmark.py pipeline --folder=DIR --image_size=224 --threads=1 \\
        --photometric=cpu|device [--recipe=imagenet|cifar] [--batch=64] [--limit=1024]
    # CPU ms per image of each stage of the pipeline (read, decode, each recipe layer, batching)
    python tools/benchmark.py stages --folder=DIR [--threads=1] [--limit=512]
    # the pipeline at 1, 2 and all of the machine's threads, each in a process of its own
    python tools/benchmark.py threads --folder=DIR [--photometric=cpu|device] [--rounds=1]
    # pairs/s of the training step on synthetic input
    python tools/benchmark.py step --config=configs/cifar10_resnet18.py --batch=128 \\
        [--jit_compile=true|false] [--threads=0]
    # end to end with model.fit, and the share of step time spent waiting for input
    python tools/benchmark.py fit --config=configs/cifar10_resnet18.py --folder=DIR --batch=64
    # seconds from start to the end of the first training step, and peak RSS, on a folder
    python tools/benchmark.py startup --folder=DIR [--config=...] [--cache_dir=DIR] \
        [--config.KEY=VALUE ...]
    # the kNN bank: build and search times and peak RSS, on synthetic L2-normalised features
    python tools/benchmark.py knn --bank_size=1281167 --dim=2048 --queries=1024 \
        [--bank_dtype=float16] [--chunk_rows=16384]
    # ms of one BatchNorm training step (forward and backward) at each ResNet-18 CIFAR stage's
    # shape, for each way to compute it: stock ops with float64 or float32 sums, fused, native
    python tools/benchmark.py bn [--batch=128] [--rounds=3] [--threads=0]
    # the project against the PyTorch reference scripts, alternating runs (A, B, A, B, ...)
    python tools/benchmark.py compare --what=pipeline --folder=DIR --threads=1 --rounds=3
    python tools/benchmark.py compare --what=step --batch=128 --rounds=3

`pipeline` times the training pipeline itself (`data.pretrain_dataset`), whose augmentations are
the recipe's keras-cv layers called through keras-cv. `--photometric=device` times only what the
CPU does in that mode (decode, crop, resize, flip and the sampling of the photometric
parameters); the colour and blur work then runs in the train step. `--threads=N` limits tf.data's
private pool and TensorFlow's inter-op pool to N threads, and the intra-op pool to
`--intra_op_threads` (pipeline modes: 1 by default, as training beside an accelerator sets it;
step and fit: N). Runs are warmed up, then timed; `cores_used` = process CPU time / wall time tells how
many cores a run really used. The last line printed is machine-readable `key=value` pairs and
includes `pairs_per_s=`. Absolute figures depend on the machine and its load: compare runs made
side by side (the `compare` mode), and read docs/PERFORMANCE.md.
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402,F401  (before TensorFlow: a quiet start-up)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ("pipeline", "stages", "threads", "step", "fit", "startup", "knn", "bn", "compare")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    "imagenet": os.path.join(REPO, "configs", "imagenet_resnet50.py"),
    "cifar": os.path.join(REPO, "configs", "cifar10_resnet18.py"),
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs", "cifar10_resnet18.py"), "Recipe (step, fit)."
)
_FOLDER = flags.DEFINE_string("folder", None, "Image folder (pipeline, fit, compare).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "View size in px (0: the recipe's).")
_THREADS = flags.DEFINE_integer("threads", 0, "CPU threads for TensorFlow and tf.data (0: all).")
_PHOTOMETRIC = flags.DEFINE_enum(
    "photometric", "cpu", ["cpu", "device"], "Where colour jitter/grayscale/blur run."
)
_RECIPE = flags.DEFINE_enum(
    "recipe", "imagenet", list(RECIPES), "Augmentation recipe (pipeline): its config's aug."
)
_INTRA_OP = flags.DEFINE_integer(
    "intra_op_threads",
    1,
    "pipeline, stages, threads: TensorFlow's intra-op threads (-1: as --threads; 0: all cores).",
)
_KERNELS = flags.DEFINE_enum(
    "kernels",
    "auto",
    ["auto", "native", "tf"],
    "pipeline, stages, threads, compare: the per-image kernels (config.aug.kernels).",
)
_BATCH = flags.DEFINE_integer("batch", 0, "Batch (0: 64 for pipeline, 128 for step and fit).")
_LIMIT = flags.DEFINE_integer("limit", 1024, "Use at most this many files of the folder.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches or steps first.")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed batches or steps (0: limit/batch; step: 5).")
_JIT = flags.DEFINE_enum(
    "jit_compile", "config", ["config", "true", "false"], "XLA for the train step."
)
_WHAT = flags.DEFINE_enum("what", "pipeline", ["pipeline", "step"], "compare: which benchmark.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "compare: rounds of (ours, reference).")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", ".venv-torchref/bin/python", "compare: Python with torch and torchvision."
)
_REFERENCE_DIR = flags.DEFINE_string(
    "reference_dir",
    os.path.join(REPO, "..", "shared", "bench"),
    "compare: folder of torch_reference_pipeline.py and torch_reference_step.py.",
)
_CHANNELS_LAST = flags.DEFINE_bool("channels_last", True, "compare step: reference layout.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", "", "startup: the cache of image-check verdicts (default: the project's)."
)
_WORKDIR = flags.DEFINE_string("workdir", "", "startup: run directory (default: a new one).")
_BANK_SIZE = flags.DEFINE_integer("bank_size", 50_000, "knn: bank rows.")
_DIM = flags.DEFINE_integer("dim", 2048, "knn: feature size.")
_QUERIES = flags.DEFINE_integer("queries", 1024, "knn: queries scored.")
_BANK_DTYPE = flags.DEFINE_enum("bank_dtype", "float32", ["float32", "float16"], "knn: bank dtype.")
_CHUNK_ROWS = flags.DEFINE_integer("chunk_rows", 16384, "knn: bank rows per chunk.")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _progress(label: str, done: int, total: int) -> None:
    if sys.stderr.isatty() or os.environ.get("BENCHMARK_PROGRESS"):
        sys.stderr.write(f"\r{label}: {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _report(**fields) -> None:
    """The machine-readable last line."""
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    )


def _limit_threads(n: int, intra_op: int | None = None) -> None:
    """n threads for tf.data's pool and TensorFlow's inter-op pool (0: TensorFlow's default);
    `intra_op` threads for the intra-op pool (default n)."""
    import tensorflow as tf

    intra_op = n if intra_op is None else intra_op
    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if n:
        tf.config.threading.set_inter_op_parallelism_threads(n)


def _recipe(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ------------------------------------------------------------------------------------------------
# pipeline


def run_pipeline() -> None:
    # As the pipeline runs beside an accelerator (`data.intra_op_threads`, auto) and as
    # torch's DataLoader workers run (one thread each): tf.data runs an example per thread,
    # and no op of an example splits over the cores (`--intra_op_threads=0`: over all).
    _limit_threads(_THREADS.value, _INTRA_OP.value if _INTRA_OP.value >= 0 else _THREADS.value)
    from simsiam_tf import data

    if not _FOLDER.value:
        raise app.UsageError("pipeline needs --folder")
    config = _recipe(RECIPES[_RECIPE.value])
    config.aug.kernels = _KERNELS.value
    d = config.data
    d.image_size = _IMAGE_SIZE.value or d.image_size
    d.photometric = _PHOTOMETRIC.value
    d.threads = _THREADS.value
    batch = _BATCH.value or 64
    source = data.load_source(f"folder:{_FOLDER.value}", "train", max_examples=_LIMIT.value)
    steps = _STEPS.value or max(1, source.num_examples // batch)
    rss0 = _rss_mb()
    dataset = data.pretrain_dataset(source, d, config.aug, batch, seed=0)
    it = iter(dataset)
    for i in range(_WARMUP.value):
        next(it)
        _progress("warm-up", i + 1, _WARMUP.value)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(steps):
        next(it)
        _progress("timed batches", i + 1, steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    pairs = steps * batch
    print(
        f"files={source.num_examples} batches={steps} seconds={wall:.2f} "
        f"load_avg={os.getloadavg()[0]:.1f}"
    )
    _report(
        mode="pipeline",
        recipe=_RECIPE.value,
        photometric=d.photometric,
        image_size=d.image_size,
        threads=_THREADS.value,
        batch=batch,
        cores_used=cpu / wall,
        cpu_ms_per_pair=1000.0 * cpu / pairs,
        peak_rss_mb=_peak_rss_mb(),
        rss_growth_mb=_peak_rss_mb() - rss0,
        pairs_per_s=pairs / wall,
    )


# ------------------------------------------------------------------------------------------------
# stages: what each stage of the pipeline costs per image


def _cpu_ms_per_image(dataset) -> float:
    """Process CPU ms per image of a pass over the batches of `dataset` after its first batch
    (a whole second pass when there is only one)."""
    import tensorflow as tf

    rows = lambda batch: int(tf.nest.flatten(batch)[0].shape[0])
    it = iter(dataset)
    next(it)
    cpu0, count = time.process_time(), 0
    for batch in it:
        count += rows(batch)
    if count == 0:
        cpu0 = time.process_time()
        for batch in dataset:
            count += rows(batch)
    return 1000.0 * (time.process_time() - cpu0) / count


def stage_costs(
    folder: str,
    threads: int = 1,
    limit: int = 512,
    image_size: int = 224,
    rounds: int = 3,
    kernels: str = "auto",
) -> list:
    """[(stage, CPU ms per image)]: the whole-recipe pipeline of configs/imagenet_resnet50.py
    built up one stage at a time on the files of `folder` (at most `limit`), each prefix timed
    as a tf.data pass on `threads` threads, and each stage's cost the difference from the
    prefix before it. Both views are made, so a recipe layer's cost is that of two views. The
    stages: reading the files, decoding (`decode.decode_rgb`), each layer of the recipe through
    its keras-cv call (crop, colour jitter, grayscale, blur, flip), and the rest of
    `data.pretrain_dataset` (the uint8 rounding, batching, its order, the replacement of
    undecodable files, prefetch). Each prefix's output is a corner of the views, so that every
    pass batches the same few bytes."""
    import tensorflow as tf

    from simsiam_tf import augment, data, decode

    config = _recipe(RECIPES["imagenet"])
    config.aug.kernels = kernels
    config.data.image_size = image_size
    config.data.photometric = "cpu"
    config.data.threads = threads
    recipe = augment.TwoViewRecipe(config.aug, image_size, "cpu")
    source = data.load_source(f"folder:{folder}", "train", max_examples=limit)
    paths = tf.constant(list(source.files))
    n = len(source.files)
    batch = min(64, n)
    encoded = tf.constant([tf.io.read_file(p).numpy() for p in source.files])
    options = data._options(threads)
    seed = tf.constant([0, 1], tf.int64)

    def views_after(k):
        """Both views after the first k recipe layers (k = -1: the decoded image only)."""

        def fn(i, encoded_):
            image = decode.decode_rgb(encoded_)
            if k < 0:
                return image[:1, :1]  # keeps the decode; a fixed shape to batch
            out = []
            for v in (1, 2):
                view, view_seed = image, augment.fold_seed(seed, i, v)
                for j, layer in recipe.cpu_layers[:k]:
                    view = augment._call(layer, view, augment.fold_seed(view_seed, j))
                out.append(view[:1, :1])  # the same small output whatever the stage
            return tf.stack(out)

        return fn

    def timed(fn):
        ds = tf.data.Dataset.from_tensor_slices((tf.range(n, dtype=tf.int64), encoded))
        ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(batch)
        return _cpu_ms_per_image(ds.with_options(options))

    read = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: tf.strings.length(tf.io.read_file(p)), num_parallel_calls=tf.data.AUTOTUNE
    )
    rows = [("read the file", _cpu_ms_per_image(read.batch(batch).with_options(options)))]
    stages = [("decode", views_after(-1))]
    for k, (_, layer) in enumerate(recipe.cpu_layers, 1):
        stages.append((f"{type(layer).__name__} (2 views)", views_after(k)))
    whole = data.pretrain_dataset(source, config.data, config.aug, batch, seed=0, num_epochs=1)
    passes = [lambda: timed(lambda i, e: tf.strings.length(e))]  # the loop itself
    passes += [lambda fn=fn: timed(fn) for _, fn in stages]
    passes += [lambda: _cpu_ms_per_image(whole)]
    # Every prefix `rounds` times, alternating, and the median of each: one pass's noise is
    # about as large as the cheapest stages.
    costs = [[] for _ in passes]
    for r in range(rounds):
        for j, run in enumerate(passes):
            costs[j].append(run())
            _progress("stage passes", r * len(passes) + j + 1, rounds * len(passes))
    cost = [statistics.median(c) for c in costs]
    names = [name for name, _ in stages] + ["finish: uint8, batching, order, replacement"]
    rows += [(name, cost[j + 1] - cost[j]) for j, name in enumerate(names)]
    # The whole pipeline reads its files too: that is the first row already.
    rows[-1] = (rows[-1][0], rows[-1][1] - rows[0][1])
    return rows


def run_stages() -> None:
    _limit_threads(_THREADS.value or 1, _INTRA_OP.value if _INTRA_OP.value >= 0 else None)
    if not _FOLDER.value:
        raise app.UsageError("stages needs --folder")
    threads = _THREADS.value or 1
    rows = stage_costs(
        _FOLDER.value,
        threads,
        _LIMIT.value,
        _IMAGE_SIZE.value or 224,
        max(1, _ROUNDS.value),
        _KERNELS.value,
    )
    print(f"| stage | CPU ms per image ({threads} thread(s)) |\n| --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} |")
    print(f"load_avg={os.getloadavg()[0]:.1f}")
    _report(
        mode="stages",
        threads=threads,
        **{
            re.sub(r"\W+", "_", name.split(" (")[0].split(":")[0]).strip("_").lower(): ms
            for name, ms in rows
        },
        cpu_ms_per_pair=sum(ms for _, ms in rows),
    )


# ------------------------------------------------------------------------------------------------
# threads: the pipeline's scaling over cores


def run_threads() -> None:
    if not _FOLDER.value:
        raise app.UsageError("threads needs --folder")
    counts = sorted({1, 2, os.cpu_count() or 1})
    me = [sys.executable, os.path.abspath(__file__), "pipeline", f"--folder={_FOLDER.value}"]
    me += [f"--photometric={_PHOTOMETRIC.value}", f"--recipe={_RECIPE.value}"]
    me += [f"--image_size={_IMAGE_SIZE.value or 224}", f"--batch={_BATCH.value or 64}"]
    me += [f"--limit={_LIMIT.value}", f"--intra_op_threads={_INTRA_OP.value}"]
    me += [f"--kernels={_KERNELS.value}"]
    rates = {n: [] for n in counts}
    for r in range(_ROUNDS.value):
        for n in counts:  # alternating, so that a change of load hits every count alike
            value, cpu, last = _run_child(me + [f"--threads={n}"], "pairs_per_s")
            rates[n].append(value)
            print(
                f"round {r + 1} threads={n}: load_avg={os.getloadavg()[0]:.1f} | {last}", flush=True
            )
    med = {n: statistics.median(v) for n, v in rates.items()}
    for n in counts:
        print(f"threads={n}: {med[n]:.1f} pairs/s, {med[n] / med[1]:.2f}x the 1-thread rate")
    _report(
        mode="threads",
        photometric=_PHOTOMETRIC.value,
        **{f"pairs_per_s_{n}": med[n] for n in counts},
        **{f"speedup_{n}": med[n] / med[1] for n in counts if n > 1},
    )


# ------------------------------------------------------------------------------------------------
# step and fit


def _build(config, batch: int, steps: int):
    import tensorflow as tf

    from simsiam_tf import train

    config.optim.batch_size = batch
    if _JIT.value != "config":
        config.train.jit_compile = _JIT.value == "true"
    if _IMAGE_SIZE.value:
        config.data.image_size = _IMAGE_SIZE.value
    if _PHOTOMETRIC.value != "cpu":
        config.data.photometric = _PHOTOMETRIC.value
    net, _ = train.build_model_and_optimizer(config, steps, tf.distribute.get_strategy())
    return net


def _synthetic(config, batch: int):
    """One batch as the pipeline delivers it (uint8 views, plus params in device mode), repeated."""
    import tensorflow as tf

    from simsiam_tf import augment

    size = config.data.image_size
    views = {
        f"view{v}": tf.cast(
            tf.random.stateless_uniform((batch, size, size, 3), (v, 0), maxval=256, dtype=tf.int32),
            tf.uint8,
        )
        for v in (1, 2)
    }
    if config.data.photometric == "device":
        recipe = augment.TwoViewRecipe(config.aug, size, "device")
        for v in (1, 2):
            views[f"params{v}"] = recipe.device_params(tf.constant([v, 1], tf.int64), batch)
    return tf.data.Dataset.from_tensors(views).repeat()


class _StepTimer:
    """Keras callback: the time of every train batch end."""

    def __init__(self, total: int):
        import keras

        times = self.times = []

        class Timer(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                times.append(time.perf_counter())
                _progress("steps", len(times), total)

        self.callback = Timer()

    def seconds_per_step(self, warmup: int) -> float:
        t = self.times[warmup - 1 :] if warmup else self.times
        return (t[-1] - t[0]) / (len(t) - 1)


def _fit_seconds_per_step(net, dataset, warmup: int, steps: int):
    timer = _StepTimer(warmup + steps)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    net.fit(
        dataset, epochs=1, steps_per_epoch=warmup + steps, callbacks=[timer.callback], verbose=0
    )
    cores = (time.process_time() - cpu0) / (time.perf_counter() - t0)
    return timer.seconds_per_step(warmup), cores


def run_step() -> None:
    _limit_threads(_THREADS.value)
    config = _CONFIG.value
    batch = _BATCH.value or 128
    steps = _STEPS.value or 5
    warmup = max(1, _WARMUP.value)
    rss0 = _rss_mb()
    net = _build(config, batch, warmup + steps)
    per_step, cores = _fit_seconds_per_step(net, _synthetic(config, batch), warmup, steps)
    print(
        f"backbone={config.model.backbone} image_size={config.data.image_size} "
        f"step_s={per_step:.3f} load_avg={os.getloadavg()[0]:.1f}"
    )
    _report(
        mode="step",
        backbone=config.model.backbone,
        proj_layers=config.model.proj_layers,
        batch=batch,
        jit_compile=bool(config.train.jit_compile),
        photometric=config.data.photometric,
        threads=_THREADS.value,
        cores_used=cores,
        peak_rss_mb=_peak_rss_mb(),
        rss_growth_mb=_peak_rss_mb() - rss0,
        pairs_per_s=batch / per_step,
    )


def run_fit() -> None:
    _limit_threads(_THREADS.value)
    import tensorflow as tf

    from simsiam_tf import data

    if not _FOLDER.value:
        raise app.UsageError("fit needs --folder")
    config = _CONFIG.value
    batch = _BATCH.value or 128
    steps = _STEPS.value or 5
    warmup = max(1, _WARMUP.value)
    net = _build(config, batch, warmup + steps)
    config.data.threads = _THREADS.value
    source = data.load_source(f"folder:{_FOLDER.value}", "train", max_examples=_LIMIT.value)
    pipeline = data.pretrain_dataset(source, config.data, config.aug, batch, seed=0)
    # The same step on the same batches, made by the pipeline beforehand and held in memory:
    # what the steps cost without any input wait.
    made = list(pipeline.take(warmup + steps))
    compute, _ = _fit_seconds_per_step(net, tf.data.experimental.from_list(made), warmup, steps)
    del made
    end_to_end, cores = _fit_seconds_per_step(net, pipeline, warmup, steps)
    wait = max(0.0, 1.0 - compute / end_to_end)
    print(
        f"step_s_in_memory={compute:.3f} step_s_pipeline={end_to_end:.3f} "
        f"load_avg={os.getloadavg()[0]:.1f}"
    )
    _report(
        mode="fit",
        backbone=config.model.backbone,
        image_size=config.data.image_size,
        photometric=config.data.photometric,
        batch=batch,
        threads=_THREADS.value,
        cores_used=cores,
        step_s_in_memory=compute,
        step_s_pipeline=end_to_end,
        input_wait_share=wait,
        peak_rss_mb=_peak_rss_mb(),
        pairs_per_s=batch / end_to_end,
    )


# ------------------------------------------------------------------------------------------------
# startup: a real training run's start, to the end of its first step


class _FirstStepDone(Exception):
    pass


def run_startup() -> None:
    """tools/train.py's own start on --folder (listing, split, image check, kNN set-up, model,
    pipeline) in a new run directory, stopped at the end of the first step."""
    import tempfile

    import keras

    start = time.time()
    if not _FOLDER.value:
        raise app.UsageError("startup needs --folder")
    if _CACHE_DIR.value:
        os.environ["SIMSIAM_TF_CACHE"] = _CACHE_DIR.value
    from simsiam_tf import train

    config = _CONFIG.value
    config.data.source = f"folder:{_FOLDER.value}"
    config.train.verbose = 0
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="startup-run-")
    marks = {"input": 0.0}
    # The part of the start that grows with the files: the splits as training loads them
    # (listing, held-out split, image check), the kNN sets, the pipeline's construction.
    depth = [0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            depth[0] += 1
            begin = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    marks["input"] += time.time() - begin

        return wrapper

    train.holdout.load_split = timed(train.holdout.load_split)
    train.callbacks.make_knn_evaluator = timed(train.callbacks.make_knn_evaluator)
    train.data.pretrain_dataset = timed(train.data.pretrain_dataset)

    class FirstStep(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            marks["fit"] = time.time() - start

        def on_train_batch_end(self, batch, logs=None):
            marks["step1"] = time.time() - start
            raise _FirstStepDone

    try:
        train.train(config, workdir, extra_callbacks=(FirstStep(),))
    except _FirstStepDone:
        pass
    train_dir = os.path.join(_FOLDER.value, "train")
    train_dir = train_dir if os.path.isdir(train_dir) else _FOLDER.value
    files = sum(len(names) for _, _, names in os.walk(train_dir))  # training files
    print(f"workdir={workdir} seconds_to_fit={marks['fit']:.1f} load_avg={os.getloadavg()[0]:.1f}")
    _report(
        mode="startup",
        files=files,
        seconds_to_first_step=marks["step1"],
        input_setup_s=marks["input"],
        input_ms_per_file=1000 * marks["input"] / files,
        peak_rss_mb=_peak_rss_mb(),
    )


# ------------------------------------------------------------------------------------------------
# knn: the bank of the kNN monitor and tools/eval_knn.py at any size


def run_knn() -> None:
    """knn.build_bank on synthetic features (each batch made on the device, as a backbone's
    output would be), then knn.knn_predict of --queries queries, k=200."""
    import numpy as np
    import tensorflow as tf

    from simsiam_tf import knn

    _limit_threads(_THREADS.value)
    n, dim, batch = _BANK_SIZE.value, _DIM.value, 1024

    def features(i):
        rows = tf.minimum(tf.constant(batch, tf.int64), n - i * batch)
        seed = tf.stack([i, tf.constant(0, tf.int64)])
        return (
            tf.random.stateless_normal(tf.stack([rows, dim]), seed),
            tf.random.stateless_uniform([rows], seed + 1, 0, 1000, tf.int64),
        )

    batches = tf.data.Dataset.range((n + batch - 1) // batch).map(features)
    rss_before = _rss_mb()
    start = time.time()
    bank = knn.build_bank(
        lambda x, training=False: x, batches, _BANK_DTYPE.value, _CHUNK_ROWS.value
    )
    build_s = time.time() - start
    bank_mb = sum(int(np.prod(c.shape)) * c.dtype.size for c in bank.chunks) / 2**20
    queries = np.random.default_rng(0).normal(size=(_QUERIES.value, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    start = time.time()
    knn.knn_predict(bank, None, queries, 1000, k=200, t=0.1, batch=256)
    search_s = time.time() - start
    print(f"load_avg={os.getloadavg()[0]:.1f} chunks={len(bank.chunks)}")
    _report(
        mode="knn",
        bank_size=n,
        dim=dim,
        bank_dtype=_BANK_DTYPE.value,
        bank_mb=bank_mb,
        build_s=build_s,
        search_s=search_s,
        ms_per_query=1000 * search_s / _QUERIES.value,
        rss_before_mb=rss_before,
        peak_rss_mb=_peak_rss_mb(),
        peak_beyond_bank_mb=_peak_rss_mb() - rss_before - bank_mb,
    )


# ------------------------------------------------------------------------------------------------
# compare: ours and the reference, alternating


def _run_child(cmd: list, key: str) -> tuple[float, float, str]:
    """Runs cmd; returns (value of `key=` on its last line, CPU seconds it used, that line)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    last = out.stdout.strip().splitlines()[-1]
    match = re.search(rf"(?:^|\s){key}=([0-9.eE+-]+)", last)
    if not match:
        raise RuntimeError(f"no {key}= in the last line of {' '.join(cmd)}:\n{out.stdout}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(match.group(1)), cpu, last


def run_compare() -> None:
    threads = _THREADS.value
    me = [sys.executable, os.path.abspath(__file__)]
    if _WHAT.value == "pipeline":
        if not _FOLDER.value:
            raise app.UsageError("compare --what=pipeline needs --folder")
        n = threads or os.cpu_count()
        ours = me + [
            "pipeline",
            f"--folder={_FOLDER.value}",
            f"--threads={n}",
            f"--photometric={_PHOTOMETRIC.value}",
            f"--image_size={_IMAGE_SIZE.value or 224}",
            f"--batch={_BATCH.value or 64}",
            f"--limit={_LIMIT.value}",
            f"--intra_op_threads={_INTRA_OP.value}",
            f"--kernels={_KERNELS.value}",
        ]
        ref = [
            _TORCH_PYTHON.value,
            os.path.join(_REFERENCE_DIR.value, "torch_reference_pipeline.py"),
            f"--folder={_FOLDER.value}",
            f"--workers={n}",
            f"--batch={_BATCH.value or 64}",
            f"--limit={_LIMIT.value}",
        ]
        ref_key = "torch_pipeline_pairs_per_s"
    else:
        batch = _BATCH.value or 128
        ours = (
            me
            + [
                "step",
                f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}",
                f"--batch={batch}",
                f"--threads={threads}",
                f"--jit_compile={_JIT.value}",
                f"--steps={_STEPS.value or 5}",
            ]
            + [a for a in sys.argv if a.startswith("--config.")]
        )  # overrides, e.g. proj_layers
        ref = [
            _TORCH_PYTHON.value,
            os.path.join(_REFERENCE_DIR.value, "torch_reference_step.py"),
            f"--batch={batch}",
            f"--steps={_STEPS.value or 5}",
            f"--threads={threads}",
        ] + (["--channels-last"] if _CHANNELS_LAST.value else [])
        ref_key = "torch_step_pairs_per_s"
    rows = {"ours": [], "reference": []}
    load = [os.getloadavg()[0]]
    for r in range(_ROUNDS.value):
        for name, cmd, key in (("ours", ours, "pairs_per_s"), ("reference", ref, ref_key)):
            value, cpu, last = _run_child(cmd, key)
            rows[name].append((value, cpu))
            print(f"round {r + 1} {name}: process_cpu_s={cpu:.1f} | {last}", flush=True)
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(v for v, _ in rows[k]) for k in rows}
    ratios = [a[0] / b[0] for a, b in zip(rows["ours"], rows["reference"])]
    print(f"ours:      {' '.join(f'{v:.2f}' for v, _ in rows['ours'])}")
    print(f"reference: {' '.join(f'{v:.2f}' for v, _ in rows['reference'])}")
    print(f"per-round ratios: {' '.join(f'{r:.2f}' for r in ratios)}")
    _report(
        mode="compare",
        what=_WHAT.value,
        photometric=_PHOTOMETRIC.value,
        threads=threads,
        rounds=_ROUNDS.value,
        load_avg_min=min(load),
        load_avg_max=max(load),
        reference_pairs_per_s=med["reference"],
        ratio=med["ours"] / med["reference"],
        median_round_ratio=statistics.median(ratios),
        pairs_per_s=med["ours"],
    )


# ------------------------------------------------------------------------------------------------
# bn: model.BatchNorm's training step alone, each way to compute it

_BN_WAYS = {  # name: (sum_dtype, kernels)
    "float64 stock": ("float64", "tf"),
    "float32 stock": ("float32", "tf"),
    "fused": ("fused", "tf"),
    "float64 native": ("float64", "native"),
}


def run_bn() -> None:
    """ms per BatchNorm step (forward, backward and the moving statistics) at the four stage
    shapes of ResNet-18 CIFAR (one view of --batch), best of --rounds x 10 calls, the ways
    alternating; the native way where its kernels are built."""
    import numpy as np
    import tensorflow as tf

    from simsiam_tf import model, native

    _limit_threads(_THREADS.value)
    batch = _BATCH.value or 128
    ways = dict(_BN_WAYS)
    if native.library_path() is None:
        print("native kernels not built (make kernels): the native way is left out")
        del ways["float64 native"]
    rng = np.random.default_rng(0)
    totals = dict.fromkeys(ways, 0.0)
    for size, channels in ((32, 64), (16, 128), (8, 256), (4, 512)):
        shape = (batch, size, size, channels)
        x = tf.constant(rng.normal(1.0, 0.5, shape).astype(np.float32))
        dy = tf.constant(rng.normal(0.0, 1.0, shape).astype(np.float32))
        steps = {}
        for name, (sum_dtype, kernels) in ways.items():
            bn = model.BatchNorm(momentum=0.9, epsilon=1e-5, sum_dtype=sum_dtype, kernels=kernels)
            bn.build(shape)

            @tf.function
            def step(x, dy, bn=bn):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = bn(x, training=True)
                return tape.gradient(y, [x, bn.gamma, bn.beta], output_gradients=dy)

            step(x, dy)  # traced and warm
            steps[name] = step
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(max(1, _ROUNDS.value)):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(10):
                    out = step(x, dy)
                out[0].numpy()
                best[name] = min(best[name], (time.perf_counter() - start) / 10 * 1e3)
        print(
            f"{'x'.join(map(str, shape)):>16} "
            + "  ".join(f"{k} {v:.2f} ms" for k, v in best.items())
        )
        for name in ways:
            totals[name] += best[name]
    print(f"load_avg={os.getloadavg()[0]:.2f}")
    _report(mode="bn", batch=batch, **{k.replace(" ", "_") + "_ms": v for k, v in totals.items()})


def main(argv):
    if len(argv) != 2 or argv[1] not in MODES:
        raise app.UsageError(f"usage: benchmark.py {{{'|'.join(MODES)}}} [--flags]")
    modes = dict(
        pipeline=run_pipeline,
        stages=run_stages,
        threads=run_threads,
        step=run_step,
        fit=run_fit,
        startup=run_startup,
        knn=run_knn,
        bn=run_bn,
        compare=run_compare,
    )
    modes[argv[1]]()


if __name__ == "__main__":
    cli.run(main)
