"""Step-for-step parity with the official PyTorch SimSiam (tools/parity/official.py).

  python tools/parity.py --torch_python=.venv-parity/bin/python       # what `make parity` runs
  python tools/parity.py --torch_python=.venv-parity/bin/python \
      --trajectory_data=archive:../shared/data/cifar10-jpeg.tar.gz --trajectory_batch=16 \
      --base_lr=0.8 --workdir=DIR \
      --trajectory_figure=docs/figures/parity_trajectory.png

Checks: simsiam_tf and the official model start from the same weights (the official state_dict
written by simsiam_tf.torch_weights) and see the same view pairs. The torch side runs in its own
process (tools/parity/worker.py, run by --torch_python), so the TensorFlow process never
imports torch. The weights are simsiam_tf's initialisation, the official one
(zero_init_residual: every block's last BN gamma is 0, so at the first step the residual
branches' convolutions have zero gradients on both sides; from the second step on they train
and the 10-step comparison covers them); the BN running statistics are randomised so that their
comparison is not one of constants. Compared, as the relative L2 error ||ours - torch|| /
||torch|| of each tensor (0 when both are 0), maximum over tensors:

  feat, z, p, loss   the first step's forward pass, BN in training mode         bound 1e-5
  grad               every gradient of that step                                 bound 1e-4
  weight, bn, mom    every weight, BN running statistic and momentum buffer
                     after --steps SGD steps (momentum 0.9, the case's weight
                     decay and parameter groups, adjust_learning_rate's per-epoch
                     cosine, an epoch being a fifth of the steps)                bound 1e-4

for `resnet18_cifar` at 32 px (batch 32, the CIFAR recipe: one param group), `resnet18_builder`
(builder.py's module layout: 3 projector layers of 512 reusing the ResNet's fc, --fix-pred-lr,
batch 16), `resnet50` at 224 px (batch 4, --fix-pred-lr), and `resnet18_cifar_x2`: the
2-replica MirroredStrategy step (CPU split into 2 logical devices, model.sync_bn=True, as
main_simsiam.py applies SyncBatchNorm to every distributed run) against one torch process on
the same global batch of 32. The torch side derives the lr (base lr x batch / 256), the groups
and the per-epoch lr itself, from the official rules, and the frozen projector bias is
non-zero.

Every case runs twice. In float64 on both sides (random BN gammas and betas, every path live
from the first step), where every tensor of every group is held to FLOAT64_BOUND (1e-10;
ResNet-50 at batch 4: 1e-8): this is the exact check. In float32, where the worker also runs
the official code in float64 on the same weights and views: "floor" is the official code's own
float32 error against that, and "vs f64" simsiam_tf's. Every float32 tensor, the first step's
and those after the steps alike, passes within max(bound, FLOOR_FACTOR x its floor) of the
official float64 result. After the steps, the floor is the largest error of --floor_runs
official float32 runs: the run on the views and runs on views moved 1 ulp per pixel at random.
Ten float32 steps can tip a ReLU input to the other side of 0 than in float64, and that moves
every gradient below it ~1e-3 (tools/relu_ties.py); whether it happens in one run is chance,
so one official run's error is one draw of it, and the floor is the spread of several draws.
The last line printed is `parity: ...` with every maximum; the exit status is 1 when a bound
fails.

With --trajectory_data, instead: --trajectory_steps steps of the CIFAR recipe on real photos,
the view pairs drawn once by simsiam_tf's pipeline and written to --workdir, fed to both; the
loss and z std of both are written to trajectory.json and plotted, once per
--trajectory_dtypes (float64: one computation; float32: how far rounding alone takes them).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

import numpy as np
from absl import flags, logging

_CHECKS = flags.DEFINE_list(
    "checks",
    ["resnet18_cifar", "resnet18_builder", "resnet50", "resnet18_cifar_x2"],
    "Cases run in float32 (beside the official code in float32 and in float64).",
)
_STEPS = flags.DEFINE_integer("steps", 10, "SGD steps of each case.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch of every case (0: the case's own).")
_LR = flags.DEFINE_float(
    "base_lr",
    0.05,
    "Base learning rate: the peak lr is base_lr x batch / 256, main_simsiam.py's rule (0.05 is "
    "the recipes' base lr).",
)
_FLOAT64_CHECKS = flags.DEFINE_list(
    "float64_checks",
    ["resnet18_cifar", "resnet18_builder", "resnet50", "resnet18_cifar_x2"],
    "Cases run once more in float64 on both sides, with random BN gammas and betas, so that "
    "every path carries gradient at the first step and no float32 rounding hides a difference.",
)
_F64_BATCH = flags.DEFINE_integer(
    "float64_batch", 0, "Global batch of the float64 cases (0: the case's own)."
)
_F64_STEPS = flags.DEFINE_integer(
    "float64_steps", 0, "SGD steps of the float64 cases (0: --steps)."
)
_CASE = flags.DEFINE_string(
    "case", "", "Internal: run one NAME:DTYPE case in this process and write its errors."
)
_F64_AFFINE = flags.DEFINE_list(
    "float64_random_affine",
    ["resnet18_cifar", "resnet18_builder", "resnet18_cifar_x2"],
    "float64 cases whose BN gammas and betas are drawn at random (every path live from the "
    "first step); the others keep the official initialisation.",
)
_OFFICIAL = flags.DEFINE_string(
    "official_repo",
    "",
    "A local checkout of facebookresearch/simsiam: the torch side then builds the model with "
    "its simsiam/builder.py (cases of builder.py's layout) and sets the lr with its "
    "main_simsiam.py's adjust_learning_rate, instead of tools/parity/official.py's transcription.",
)
_FLOOR_RUNS = flags.DEFINE_integer(
    "floor_runs",
    4,
    "Official float32 runs of the steps behind each float32 floor: the first on the views, "
    "the others on views moved 1 ulp per pixel at random; a tensor's floor is the largest of "
    "their errors against the official float64.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the views.")
_BN_KERNELS = flags.DEFINE_enum(
    "bn_kernels",
    None,
    ["auto", "native", "tf"],
    "simsiam_tf's BatchNorm step (model.bn_kernels; default: the config's). The native step "
    "takes float32 layers only, so it changes the float32 cases alone.",
)
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python",
    "",
    "Python of the torch worker (default: this one), e.g. .venv-parity/bin/python.",
)
_TORCH_PATH = flags.DEFINE_string(
    "torch_path", "", "A directory with torch and torchvision for the worker's PYTHONPATH."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Where request/result files go (default: a temp dir)."
)
_TRAJ_DATA = flags.DEFINE_string(
    "trajectory_data", "", "Data source of the trajectory run, e.g. folder:/path/to/cifar10."
)
_TRAJ_STEPS = flags.DEFINE_integer("trajectory_steps", 200, "Steps of the trajectory run.")
_TRAJ_BATCH = flags.DEFINE_integer("trajectory_batch", 16, "Batch of the trajectory run.")
_TRAJ_DTYPES = flags.DEFINE_list(
    "trajectory_dtypes",
    ["float64", "float32"],
    "Float types of the trajectory runs: float64 shows the two implementations are one "
    "computation, float32 how far rounding alone takes them apart over the run.",
)
_TRAJ_FIGURE = flags.DEFINE_string("trajectory_figure", "", "PNG of the trajectory curves.")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity", "worker.py")
# Each case: backbone, image size, global batch, replicas, projector layers and width, weight
# decay and --fix-pred-lr, as the recipe it stands for.
CASES = {
    # configs/cifar10_resnet18.py (appendix D): a 2-layer projector of 2048, one param group.
    "resnet18_cifar": dict(
        backbone="resnet18_cifar",
        size=32,
        batch=32,
        replicas=1,
        proj_layers=2,
        proj_hidden=2048,
        wd=5e-4,
        fix_pred_lr=False,
    ),
    # builder.py module for module: the ResNet-18 (its CIFAR stem: no max-pool, whose near-ties
    # flip in float32 at random) with builder.py's projector, 3 layers of prev_dim = 512 with
    # the ResNet's own fc as the last; the ImageNet recipe's weight decay and --fix-pred-lr.
    "resnet18_builder": dict(
        backbone="resnet18_cifar",
        size=32,
        batch=16,
        replicas=1,
        proj_layers=3,
        proj_hidden=512,
        wd=1e-4,
        fix_pred_lr=True,
    ),
    # configs/imagenet_resnet50.py: builder.py's projector (3 layers of 2048), --fix-pred-lr.
    "resnet50": dict(
        backbone="resnet50",
        size=224,
        batch=4,
        replicas=1,
        proj_layers=3,
        proj_hidden=2048,
        wd=1e-4,
        fix_pred_lr=True,
    ),
    # The CIFAR case on 2 replicas with synchronised BN over the global batch.
    "resnet18_cifar_x2": dict(
        backbone="resnet18_cifar",
        size=32,
        batch=32,
        replicas=2,
        proj_layers=2,
        proj_hidden=2048,
        wd=5e-4,
        fix_pred_lr=False,
    ),
}
DEFAULT_CASES = ["resnet18_cifar", "resnet18_builder", "resnet50", "resnet18_cifar_x2"]
# The float64 cases are held to FLOAT64_BOUND (ResNet-50 at batch 4 to FLOAT64_BOUND_R50: its
# BN over 4 values per channel amplifies float64 rounding: its momentum buffers ended 4.0e-10,
# 6.0e-10, 6.3e-10 and 1.1e-9 from the official ones under four orders of summation in our BN,
# each exact in real arithmetic, so the bound is 10x the largest of those). Every
# float32 tensor is held to max(BOUNDS[group], FLOOR_FACTOR x floor), its floor being how far
# the official code's own float32 result for that tensor is from its float64 result on the
# same weights and views (after the steps: the farthest of --floor_runs official float32 runs,
# the others on views moved 1 ulp per pixel): simsiam_tf's float32 may be at most 10 times as
# far from exact arithmetic as the official float32, tensor by tensor, forward, gradients and
# after the steps.
FLOOR_FACTOR = 10.0
AFTER_STEPS = ("step_loss", "weight", "bn", "mom")
BOUNDS = dict(
    feat=1e-5, z=1e-5, p=1e-5, loss=1e-5, grad=1e-4, step_loss=1e-4, weight=1e-4, bn=1e-4, mom=1e-4
)
FLOAT64_BOUND = 1e-10
FLOAT64_BOUND_R50 = 1e-8


def schedule(steps: int) -> tuple:
    """(steps_per_epoch, epochs) of a case: the lr is set once per epoch (main_simsiam.py's
    adjust_learning_rate), so an epoch is a fifth of the steps and the run the first half of
    the cosine: the lr changes several times within the steps."""
    steps_per_epoch = max(1, steps // 5)
    return steps_per_epoch, 2 * math.ceil(steps / steps_per_epoch)


def rel_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: {ours.shape} vs {theirs.shape}")
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30))


def smooth_images(rng, n: int, size: int) -> np.ndarray:
    """n float32 images in [0, 1], NHWC: random colour fields at 4x4 resolution, bilinearly
    enlarged, times a random contrast, plus a little noise. Pure noise would make every image's
    pooled features nearly the same, and the projector's BatchNorm would then divide float
    rounding by a near-zero spread: a test of conditioning, not of parity."""
    import tensorflow as tf

    base = rng.uniform(0.0, 1.0, (n, 4, 4, 3)).astype(np.float32)
    x = tf.image.resize(base, (size, size), "bilinear").numpy()
    contrast = rng.uniform(0.3, 1.0, (n, 1, 1, 1)).astype(np.float32)
    x = 0.5 + contrast * (x - 0.5) + rng.normal(0.0, 0.03, x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def build(case: dict, steps_per_epoch: int, epochs: int, seed: int):
    """(model, strategy) of the case, built as training builds it (TorchSGD, the per-epoch
    cosine, the case's --fix-pred-lr)."""
    import keras
    import tensorflow as tf

    from simsiam_tf import train
    from simsiam_tf.config import default_config

    c = default_config()
    c.model.backbone = case["backbone"]
    c.model.proj_layers = case["proj_layers"]
    c.model.proj_hidden = case["proj_hidden"]
    c.model.sync_bn = case["replicas"] > 1
    c.optim.base_lr = _LR.value  # scaled by batch / 256 in train.build_model_and_optimizer
    c.optim.epochs = epochs
    c.optim.warmup_epochs = 0
    c.optim.lr_schedule = "per_epoch"
    c.optim.momentum = 0.9
    c.optim.weight_decay = case["wd"]
    c.optim.fix_pred_lr = case["fix_pred_lr"]
    c.optim.batch_size = case["batch"]
    c.data.image_size = case["size"]
    if _BN_KERNELS.value:
        c.model.bn_kernels = _BN_KERNELS.value
    if case["replicas"] > 1:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][: case["replicas"]]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(seed)
    net, _ = train.build_model_and_optimizer(c, steps_per_epoch, strategy)
    return net, strategy


def randomise_bn_statistics(net, seed: int, affine: bool) -> None:
    """Random BN running means and variances (the affine parameters keep their init: random
    gammas wake the residual branches at once, and float32 gradients of such a deep random
    network are then accurate to only ~1e-3 in either framework, float64 being the reference)."""
    import keras

    rng = np.random.default_rng(seed)
    for sub in (net.backbone, net.projector, net.predictor):
        for layer in sub.layers:
            if not isinstance(layer, keras.layers.BatchNormalization):
                continue
            n = int(layer.moving_mean.shape[0])
            if affine and layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            if affine and layer.center:
                layer.beta.assign(rng.uniform(-0.2, 0.2, n))
            layer.moving_mean.assign(rng.normal(0.0, 0.2, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))


def as_torch_names(net, values) -> dict:
    """Per-trainable-variable arrays (gradients, momentum buffers) under the official names:
    written into the variables for a moment and read back through torch_weights."""
    from simsiam_tf import torch_weights

    variables = net.trainable_variables
    saved = [v.numpy() for v in variables]
    for v, x in zip(variables, values):
        v.assign(np.asarray(x).astype(v.dtype))
    out = torch_weights.to_torch_state_dict(net)
    for v, x in zip(variables, saved):
        v.assign(x)
    return out


def run_worker(workdir: str, meta: dict, state_dict: dict) -> dict:
    return finish_worker(start_worker(workdir, meta, state_dict))


def start_worker(workdir: str, meta: dict, state_dict: dict):
    """Starts the torch worker on a request written to `workdir`; see finish_worker."""
    request = os.path.join(workdir, "request.npz")
    result = os.path.join(workdir, "result.npz")
    np.savez(request, meta=json.dumps(meta), **{f"sd/{k}": v for k, v in state_dict.items()})
    env = dict(os.environ)
    if _TORCH_PATH.value:
        path = os.path.abspath(_TORCH_PATH.value)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [_TORCH_PYTHON.value or sys.executable, WORKER, request, result],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, result, time.time()


def finish_worker(started) -> dict:
    """Waits for the worker of start_worker; its results."""
    proc, result, start = started
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"torch worker failed ({proc.returncode}):\n{stderr[-3000:]}")
    logging.info("torch side: %.1f s", time.time() - start)
    with np.load(result) as f:
        return {k: f[k] for k in f.files}


def _meta(case, net, steps, steps_per_epoch, epochs, views, probe, dtype, floor):
    """The worker's request. The torch side derives the lr itself, as main_simsiam.py does:
    init_lr = base_lr x batch / 256, the param groups of the --fix-pred-lr given, and
    adjust_learning_rate at the start of every epoch."""
    return dict(
        arch=case["backbone"],
        dim=net.proj_dim,
        pred_dim=int(net.predictor.get_layer("fc1").units),
        proj_layers=case["proj_layers"],
        proj_hidden=case["proj_hidden"],
        base_lr=_LR.value,
        batch_size=case["batch"],
        fix_pred_lr=case["fix_pred_lr"],
        momentum=0.9,
        wd=case["wd"],
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        view1=views[0],
        view2=views[1],
        probe=probe,
        dtype=dtype,
        floor=floor,
        floor_runs=_FLOOR_RUNS.value if floor else 1,
        official_repo=os.path.abspath(_OFFICIAL.value) if _OFFICIAL.value else "",
    )


def train_steps(net, views1, views2, steps: int, batch: int):
    """`steps` calls of the model's own fit, one batch each; (losses, z stds) per step."""
    import tensorflow as tf

    losses, z_stds = [], []
    for t in range(steps):
        ds = tf.data.Dataset.from_tensor_slices(
            {"view1": np.asarray(views1[t]), "view2": np.asarray(views2[t])}
        ).batch(batch)
        hist = net.fit(ds, epochs=1, verbose=0, shuffle=False)  # the batches are given
        losses.append(hist.history["loss"][-1])
        z_stds.append(hist.history["z_std"][-1])
    return np.array(losses), np.array(z_stds)


def set_dtype(dtype: str) -> None:
    import keras

    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)


def frozen_bias_keys(net) -> tuple:
    """(the projector's frozen bias, the running mean of the BN after it), official names."""
    from simsiam_tf import torch_weights

    names = [t.name for t in torch_weights.projector_tensors(net.projector)]
    bias = next(
        t.name for t in torch_weights.projector_tensors(net.projector) if t.kind == "frozen_bias"
    )
    bn = names[names.index(bias) + 1].rsplit(".", 1)[0]
    return bias, f"{bn}.running_mean"


def check_case(name: str, dtype: str, workdir: str) -> dict:
    """The maxima of the relative errors of one case, and the tensor of each maximum."""
    import tensorflow as tf

    set_dtype(dtype)
    from simsiam_tf import losses, torch_weights

    case = dict(CASES[name])
    case["batch"] = _BATCH.value or case["batch"]
    steps = _STEPS.value
    if dtype == "float64":
        case["batch"], steps = _F64_BATCH.value or case["batch"], _F64_STEPS.value or steps
    batch, size, replicas = case["batch"], case["size"], case["replicas"]
    steps_per_epoch, epochs = schedule(steps)
    start = time.time()
    net, strategy = build(case, steps_per_epoch, epochs, _SEED.value)
    randomise_bn_statistics(net, _SEED.value, dtype == "float64" and name in _F64_AFFINE.value)
    rng = np.random.default_rng(_SEED.value + 1)
    views = []
    for i in (1, 2):
        x = smooth_images(rng, steps * batch, size).reshape(steps, batch, size, size, 3)
        x = x.astype(dtype)
        path = os.path.join(workdir, f"{name}_{dtype}_view{i}.npy")
        np.save(path, x)
        views.append(path)
    v1, v2 = np.load(views[0]), np.load(views[1])
    # The frozen projector bias is not 0 (as in a trained checkpoint): torch's last BN running
    # mean includes it, simsiam_tf's has it folded out on import (simsiam_tf.torch_weights).
    state0 = torch_weights.to_torch_state_dict(net)
    bias_key, mean_key = frozen_bias_keys(net)
    state0[bias_key] = rng.normal(0.0, 0.5, state0[bias_key].shape).astype(dtype)
    torch_weights.assign_from_torch(net, state0)
    probe = replicas == 1
    floor = dtype == "float32"
    meta = _meta(case, net, steps, steps_per_epoch, epochs, views, probe, dtype, floor)
    theirs = run_worker(workdir, meta, state0)
    if meta["official_repo"]:
        model = "builder.py's" if theirs["official_builder"] else "the transcribed"
        logging.info("%s: %s model, main_simsiam.py's schedule and epoch loop", name, model)

    errors, every = {}, {}
    if meta["official_repo"]:
        every["official_repo builder.py"] = float(theirs["official_builder"])

    def keep_max(group, key, err):
        every[f"{group} {key}"] = err
        if err > errors.get(group, (-1.0, ""))[0]:
            errors[group] = (err, key)

    def record(group, key, ours, theirs_key):
        keep_max(group, key, rel_error(ours, theirs[theirs_key]))
        if "f64" + theirs_key in theirs:  # the official code's float32 against its float64
            exact = theirs["f64" + theirs_key]
            floor = rel_error(theirs[theirs_key], exact)
            floor = max(floor, float(theirs.get("spread/" + theirs_key, 0.0)))
            keep_max(f"{group}_floor", key, floor)
            keep_max(f"{group}_vs_f64", key, rel_error(ours, exact))

    if probe:
        snapshot = [v.numpy() for v in net.variables]
        x1, x2 = tf.constant(v1[0]), tf.constant(v2[0])
        feats = (net.backbone(x1, training=True), net.backbone(x2, training=True))
        z1, z2, p1, p2 = net.forward_views(x1, x2, training=True)
        loss = losses.simsiam_loss(p1, p2, z1, z2)
        ours = dict(feat1=feats[0], feat2=feats[1], z1=z1, z2=z2, p1=p1, p2=p2, loss=loss)
        for key, value in ours.items():
            record(key.rstrip("12"), key, value.numpy(), key)
        for v, s in zip(net.variables, snapshot):
            v.assign(s)
        with tf.GradientTape() as tape:
            loss, _, _ = net.compute_simsiam_loss({"view1": x1, "view2": x2})
        grads = tape.gradient(loss, net.trainable_variables)
        named = as_torch_names(net, [g.numpy() for g in grads])
        grad_keys = [k for k in theirs if k.startswith("grad/")]
        if len(grad_keys) != len(grads):
            raise RuntimeError(f"{len(grads)} gradients here, {len(grad_keys)} in torch")
        for key in grad_keys:
            record("grad", key[5:], named[key[5:]], key)
        for v, s in zip(net.variables, snapshot):
            v.assign(s)

    ours_losses, ours_z = train_steps(net, v1, v2, steps, batch)
    logging.info("%s losses: ours %s, torch %s", name, ours_losses, theirs["losses"])
    record("step_loss", "losses", ours_losses, "losses")
    final = torch_weights.to_torch_state_dict(net)
    final[bias_key] = state0[bias_key]  # frozen: never updated, as on the torch side
    final[mean_key] = final[mean_key] + state0[bias_key]  # the folded bias back in
    for key, value in final.items():
        if key.endswith("num_batches_tracked"):
            continue
        group = "bn" if key.endswith(("running_mean", "running_var")) else "weight"
        record(group, key, value, f"final/{key}")
    opt = net.optimizer
    moms = as_torch_names(
        net, [opt.momentums[opt._get_variable_index(v)] for v in net.trainable_variables]
    )
    mom_keys = [k for k in theirs if k.startswith("momentum/")]
    if len(mom_keys) != len(net.trainable_variables):
        raise RuntimeError(f"{len(net.trainable_variables)} buffers here, {len(mom_keys)} in torch")
    for key in mom_keys:
        record("mom", key[9:], moms[key[9:]], key)
    logging.info(
        "%s: %d replica(s), batch %d, %d steps, %.1f s",
        name,
        replicas,
        batch,
        steps,
        time.time() - start,
    )
    del strategy
    with open(os.path.join(workdir, f"{name}_{dtype}_errors.json"), "w") as f:
        json.dump(every, f, indent=1)
    with open(os.path.join(workdir, f"{name}_{dtype}_maxima.json"), "w") as f:
        json.dump(errors, f, indent=1)
    set_dtype("float32")
    return errors


def float_32_against_floor(every: dict, group: str, bound: float) -> tuple:
    """((ratio, tensor) of the largest vs-f64 / floor over the group's tensors where the floor
    sets the bound, the tensors over their bound as (ratio, tensor, error, bound))."""
    worst, over = (0.0, ""), []
    for label, floor in every.items():
        prefix, _, tensor = label.partition(" ")
        if prefix != f"{group}_floor":
            continue
        vs = every[f"{group}_vs_f64 {tensor}"]
        limit = max(bound, FLOOR_FACTOR * floor)
        ratio = vs / max(floor, 1e-30)
        if FLOOR_FACTOR * floor > bound and ratio > worst[0]:
            worst = (ratio, tensor)
        if vs > limit:
            over.append((ratio, tensor, vs, limit))
    return worst, over


def check_case_in_child(name: str, dtype: str, workdir: str) -> tuple:
    """check_case in a process of its own: each case gets a fresh TensorFlow (a float32 and a
    float64 MirroredStrategy in one process would share collective instance keys)."""
    argv = [a for a in sys.argv[1:] if not a.startswith(("--workdir", "--case"))]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--workdir={workdir}"]
    subprocess.run(cmd + [f"--case={name}:{dtype}"], check=True)
    with open(os.path.join(workdir, f"{name}_{dtype}_maxima.json")) as f:
        maxima = {group: tuple(value) for group, value in json.load(f).items()}
    with open(os.path.join(workdir, f"{name}_{dtype}_errors.json")) as f:
        return maxima, json.load(f)


def trajectory(workdir: str) -> None:
    """The trajectory run (see the module docstring), once per --trajectory_dtypes."""
    from simsiam_tf import data
    from simsiam_tf.config import default_config

    # The CIFAR recipe (configs/cifar10_resnet18.py): the default augmentations at 32 px,
    # a 2-layer projector of width 2048, weight decay 5e-4.
    c = default_config()
    c.model.proj_layers, c.model.proj_hidden, c.optim.weight_decay = 2, 2048, 5e-4
    steps, batch = _TRAJ_STEPS.value, _TRAJ_BATCH.value
    source = data.load_source(_TRAJ_DATA.value, "train", steps * batch, _SEED.value)
    if source is None:
        raise ValueError(f"--trajectory_data={_TRAJ_DATA.value!r} has no train split")
    c.data.image_size = 32
    c.data.source = _TRAJ_DATA.value
    ds = data.pretrain_dataset(source, c.data, c.aug, batch, _SEED.value, num_epochs=1)
    v1, v2 = [], []
    for b in ds.take(steps):
        v1.append(b["view1"].numpy())
        v2.append(b["view2"].numpy())
    if len(v1) < steps:
        raise ValueError(f"{_TRAJ_DATA.value} gave {len(v1)} batches of {batch}, not {steps}")
    results = {}
    for dtype in _TRAJ_DTYPES.value:
        # float32 as training feeds it (uint8 views, divided by 255 on each side); float64 as
        # float64 values of the same pixels, so that nothing on either side rounds to float32.
        views = [os.path.join(workdir, f"trajectory_{dtype}_view{i}.npy") for i in (1, 2)]
        for path, v in zip(views, (v1, v2)):
            v = np.stack(v)
            np.save(path, v if dtype == "float32" else v.astype(np.float64) / 255.0)
        results[dtype] = _trajectory_run(c, steps, batch, views, dtype, workdir)
    with open(os.path.join(workdir, "trajectory.json"), "w") as f:
        json.dump(results, f)
    if _TRAJ_FIGURE.value:
        plot_trajectory(results, _TRAJ_FIGURE.value)
    for dtype, r in results.items():
        print(
            f"trajectory {dtype}: {steps} steps batch {batch}: loss {r['loss_tf'][0]:.4f} -> "
            f"{r['loss_tf'][-1]:.4f}, max |loss gap| {r['max_loss_gap']:.2e}, "
            f"max |z std gap| {r['max_z_std_gap']:.2e}"
        )


def _trajectory_run(c, steps, batch, views, dtype, workdir) -> dict:
    from simsiam_tf import torch_weights

    set_dtype(dtype)
    # One step per epoch over `steps` epochs: the lr falls on the cosine at every step.
    case = dict(
        backbone="resnet18_cifar",
        size=32,
        batch=batch,
        replicas=1,
        proj_layers=c.model.proj_layers,
        proj_hidden=c.model.proj_hidden,
        wd=c.optim.weight_decay,
        fix_pred_lr=True,
    )
    net, _ = build(case, 1, steps, _SEED.value)
    meta = _meta(case, net, steps, 1, steps, views, probe=False, dtype=dtype, floor=False)
    v1, v2 = np.load(views[0], mmap_mode="r"), np.load(views[1], mmap_mode="r")
    # Both sides at once: the torch worker is another process.
    worker = start_worker(workdir, meta, torch_weights.to_torch_state_dict(net))
    start = time.time()
    ours_loss, ours_z = train_steps(net, v1, v2, steps, batch)
    tf_s = time.time() - start
    theirs = finish_worker(worker)
    torch_s = time.time() - worker[2]
    set_dtype("float32")
    loss_gap = np.abs(ours_loss - theirs["losses"])
    return dict(
        steps=steps,
        batch=batch,
        lr=_LR.value * batch / 256.0,
        dtype=dtype,
        loss_tf=ours_loss.tolist(),
        loss_torch=theirs["losses"].tolist(),
        z_std_tf=ours_z.tolist(),
        z_std_torch=theirs["z_std"].tolist(),
        max_loss_gap=float(np.max(loss_gap)),
        first_loss_gap_above_1e_3=(
            int(np.argmax(loss_gap > 1e-3)) + 1 if np.any(loss_gap > 1e-3) else None
        ),
        max_z_std_gap=float(np.max(np.abs(ours_z - theirs["z_std"]))),
        seconds_tf=tf_s,
        seconds_torch=torch_s,
    )


def plot_trajectory(results: dict, path: str) -> None:
    from simsiam_tf.plots import _figure

    fig = _figure(10, 3.4 * len(results))
    axes = fig.subplots(len(results), 2, squeeze=False)
    d = math.sqrt(2048)
    for row, (dtype, result) in zip(axes, results.items()):
        steps = np.arange(1, result["steps"] + 1)
        for ax, key, label in zip(row, ("loss", "z_std"), ("loss", "z std x sqrt(d)")):
            scale = 1.0 if key == "loss" else d
            ax.plot(
                steps,
                np.array(result[f"{key}_torch"]) * scale,
                lw=3,
                alpha=0.4,
                label="official (PyTorch)",
            )
            ax.plot(steps, np.array(result[f"{key}_tf"]) * scale, lw=1, label="simsiam_tf")
            gap = result[f"max_{key}_gap"] * scale
            ax.set_title(f"{dtype}, batch {result['batch']}: {label}, largest gap {gap:.1e}")
            ax.set_xlabel("step")
            ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)


def main(argv):
    del argv
    for flag in (_CHECKS, _FLOAT64_CHECKS):
        unknown = [c for c in flag.value if c not in CASES]
        if unknown:
            sys.exit(
                f"error: --{flag.name}={','.join(unknown)} unknown; choose from {sorted(CASES)}"
            )
    if _STEPS.value < 1:
        sys.exit(f"error: --steps={_STEPS.value} must be >= 1")
    from simsiam_tf import distribute

    distribute.split_cpu(2)  # before TensorFlow starts: the 2-replica case needs 2 devices
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="parity_")
    os.makedirs(workdir, exist_ok=True)
    if _TRAJ_DATA.value:
        trajectory(workdir)
        return
    if _CASE.value:
        check_case(*_CASE.value.split(":"), workdir)
        return
    failed, parts = [], []
    runs = [(n, "float64") for n in _FLOAT64_CHECKS.value] + [(n, "float32") for n in _CHECKS.value]
    for name, dtype in runs:
        errors, every = check_case_in_child(name, dtype, workdir)
        part = []
        for group, bound in BOUNDS.items():
            if group not in errors:
                continue
            err, key = errors[group]
            text = f"{group}={err:.1e}"
            if dtype == "float64":
                bound = (
                    FLOAT64_BOUND_R50 if CASES[name]["backbone"] == "resnet50" else FLOAT64_BOUND
                )
                if err > bound:
                    failed.append(f"{dtype} {name} {group} {err:.2e} > {bound:.0e} ({key})")
            else:
                # Per tensor: simsiam_tf's float32 against the official float64, within
                # max(bound, 10 x the official float32's own error for that tensor).
                worst, over = float_32_against_floor(every, group, bound)
                floor, vs = errors[f"{group}_floor"][0], errors[f"{group}_vs_f64"][0]
                ratio = f", {worst[0]:.1f}x" if worst[1] else ""
                text += f"(floor {floor:.0e}, vs f64 {vs:.0e}{ratio})"
                for _, tensor, vs_err, limit in over:
                    failed.append(
                        f"{dtype} {name} {group} {tensor}: {vs_err:.2e} from float64 > "
                        f"{limit:.1e} = max({bound:.0e}, {FLOOR_FACTOR:g} x official float32's)"
                    )
            logging.info("%s %s %s: max rel error %.2e (%s)", dtype, name, group, err, key)
            part.append(text)
        if "official_repo builder.py" in every:  # --official_repo: which model torch ran
            part.append("[builder.py]" if every["official_repo builder.py"] else "[transcribed]")
        parts.append(f"{name} {dtype} " + " ".join(part))
    for line in failed:
        print(f"FAILED: {line}")
    if _CHECKS.value:
        print(
            f"float32 (floor: the official float32's error against its float64, after the steps "
            f"the largest of {_FLOOR_RUNS.value} runs; vs f64: ours; "
            "Nx: the largest ratio of ours to the floor over the tensors whose bound is "
            f"{FLOOR_FACTOR:g} x floor, where there are such tensors)"
        )
    print("parity: " + "; ".join(parts) + ("; FAILED" if failed else "; all within bounds"))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
