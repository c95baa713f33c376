"""The torch side of the parity harness, run in its own process by tools/parity.py.

    python tools/parity/worker.py REQUEST.npz RESULT.npz

REQUEST.npz holds `meta` (JSON: arch, dims, optimiser settings, steps, the two view files) and
the initial official state_dict as `sd/<name>` arrays. The views are two .npy files of shape
(steps, N, H, W, 3), float in [0, 1] or uint8, NHWC as simsiam_tf takes them; here they are
normalised with the ImageNet mean/std (simsiam_tf's first layer) and made NCHW.

RESULT.npz: with `probe`, the first step's backbone features, z, p, loss (`feat1`, `z1`, ...)
and every gradient (`grad/<name>`), computed from the initial weights; then, after `steps`
SGD steps, the state_dict (`final/<name>`) and the momentum buffers (`momentum/<name>`), and
the per-step `losses` and `z_std`. With `floor`, the same steps once more in float64, under
keys prefixed `f64`: how far the official code's own float32 run is from exact arithmetic;
and, with meta["floor_runs"] = K > 1, K - 1 more float32 runs of the steps on views moved 1 ulp
per pixel: `spread/<key>`, the largest error of any of them against the float64 run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys

import numpy as np
import official
import torch

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def to_input(views: np.ndarray) -> torch.Tensor:
    """NCHW normalised images in the views' float type (uint8 views: float32 / 255)."""
    x = np.asarray(views)
    x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x
    x = (x - MEAN.astype(x.dtype)) / STD.astype(x.dtype)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


class Sources:
    """Where the official functions come from: tools/parity/official.py's transcription, or,
    with meta["official_repo"], a local checkout of facebookresearch/simsiam, imported at run
    time (nothing of it is copied into this repository): its simsiam/builder.py builds the model
    of the cases in builder.py's layout (3 projector layers of the backbone's width) around the
    torchvision ResNet, and its main_simsiam.py gives adjust_learning_rate and the epoch loop
    `train`. The param groups are main_worker's inline code, transcribed in official.py."""

    def __init__(self, meta):
        self.meta = meta
        self.builder = self.main = None
        if meta.get("official_repo"):
            sys.path.insert(0, meta["official_repo"])
            import main_simsiam
            import simsiam.builder

            self.builder, self.main = simsiam.builder, main_simsiam
        self.args = argparse.Namespace(epochs=meta["epochs"], gpu=None, print_freq=10**9)

    def uses_builder(self) -> bool:
        """builder.py's layout: 3 projector layers of the backbone's width (prev_dim)."""
        m = self.meta
        prev_dim = 2048 if m["arch"] == "resnet50" else 512
        builder_layout = m["proj_layers"] == 3 and m["proj_hidden"] == prev_dim
        return self.builder is not None and builder_layout

    def model(self, dtype) -> torch.nn.Module:
        m = self.meta
        if self.uses_builder():
            # builder.py calls base_encoder(num_classes=dim, zero_init_residual=True); the CIFAR
            # ResNet-18 is torchvision's with the CIFAR stem (official.resnet).
            def base_encoder(num_classes, zero_init_residual):
                assert zero_init_residual
                return official.resnet(m["arch"], num_classes)

            net = self.builder.SimSiam(base_encoder, m["dim"], m["pred_dim"])
        else:
            net = official.SimSiam(
                m["arch"], m["dim"], m["pred_dim"], m["proj_layers"], m["proj_hidden"]
            )
        return net.to(dtype)

    def adjust_learning_rate(self, optimizer, init_lr, epoch) -> None:
        source = self.main or official
        source.adjust_learning_rate(optimizer, init_lr, epoch, self.args)


def main(request_path: str, result_path: str) -> None:
    torch.manual_seed(0)
    req = np.load(request_path)
    meta = json.loads(str(req["meta"]))
    sources = Sources(meta)
    dtype = getattr(torch, meta.get("dtype", "float32"))
    model = sources.model(dtype)
    state = {k[3:]: torch.from_numpy(np.array(req[k])) for k in req.files if k.startswith("sd/")}
    model.load_state_dict(state, strict=True)
    model.train()
    state = copy.deepcopy(model.state_dict())
    views1 = np.load(meta["view1"], mmap_mode="r")
    views2 = np.load(meta["view2"], mmap_mode="r")
    out = probe(model, state, views1[0], views2[0], dtype) if meta["probe"] else {}
    out.update(train(model, sources, views1, views2, dtype))
    if meta.get("floor"):
        # The official code against itself: the same steps in float64 from the same weights.
        reference = sources.model(torch.float64)
        reference.load_state_dict(state, strict=True)
        reference.train()
        floor = (
            probe(reference, state, views1[0], views2[0], torch.float64) if meta["probe"] else {}
        )
        floor.update(train(reference, sources, views1, views2, torch.float64))
        out.update({f"f64{key}": value for key, value in floor.items()})
        out.update(rounding_spread(sources, state, views1, views2, dtype, floor))
    out["official_builder"] = np.array(sources.uses_builder())
    np.savez(result_path, **out)


def rounding_spread(sources, state, views1, views2, dtype, exact) -> dict:
    """meta["floor_runs"] - 1 more runs of the official steps in `dtype`, each on views whose
    every pixel is moved 1 ulp up or down at random (a rounding of the input, as float32 makes
    anyway): `spread/<key>`, the largest relative error of any of these runs' results against
    `exact`, the float64 run. After ten float32 steps, a ReLU input that lands on the other
    side of 0 than in float64 sends every gradient below it ~1e-3 from float64 (tools/
    relu_ties.py), and whether that happens in a given run is chance: one run's error is one
    draw, these runs give the spread of the draws."""
    out = {}
    for k in range(1, sources.meta.get("floor_runs", 1)):
        rng = np.random.default_rng(k)
        model = sources.model(dtype)
        model.load_state_dict(state, strict=True)
        model.train()
        run = train(model, sources, ulp_nudge(views1, rng), ulp_nudge(views2, rng), dtype)
        for key, value in run.items():
            if key == "z_std":
                continue
            err = rel_error(value, exact[key])
            out[f"spread/{key}"] = np.maximum(out.get(f"spread/{key}", 0.0), err)
    return out


def ulp_nudge(views, rng: np.random.Generator) -> np.ndarray:
    """`views` with every value moved to the next float of its type up or down, at random
    (uint8 views first become to_input's float32 / 255)."""
    views = np.asarray(views)
    if views.dtype == np.uint8:
        views = views.astype(np.float32) / np.float32(255.0)
    towards = np.where(rng.random(views.shape) < 0.5, -np.inf, np.inf).astype(views.dtype)
    return np.nextafter(views, towards)


def rel_error(ours, theirs) -> float:
    """||ours - theirs|| / ||theirs|| in float64 (0 when both are 0): tools/parity.py's."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30))


def probe(model, state, views1, views2, dtype) -> dict:
    """The first step's features, z, p, loss and gradients; the model is left in `state`."""
    out = {}
    x1, x2 = to_input(views1).to(dtype), to_input(views2).to(dtype)
    with torch.no_grad():
        f1, f2 = official.features(model, x1), official.features(model, x2)
        z1, z2 = model.encoder.fc(f1), model.encoder.fc(f2)
        p1, p2 = model.predictor(z1), model.predictor(z2)
        loss = official.loss_fn(p1, p2, z1, z2)
    for key, value in dict(feat1=f1, feat2=f2, z1=z1, z2=z2, p1=p1, p2=p2, loss=loss).items():
        out[key] = value.numpy()
    model.load_state_dict(state)
    loss = official.loss_fn(*model(x1=x1, x2=x2))
    loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            out[f"grad/{name}"] = param.grad.numpy().copy()
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return out


def train(model, sources, views1, views2, dtype) -> dict:
    """meta["steps"] steps of main_simsiam.py (init_lr = lr x batch / 256; the param groups of
    the --fix-pred-lr given; adjust_learning_rate at the start of every epoch of
    meta["steps_per_epoch"] steps); the state_dict, momentum buffers, losses and z stds after
    them."""
    meta = sources.meta
    init_lr = meta["base_lr"] * meta["batch_size"] / 256
    optimizer = official.make_optimizer(
        model, init_lr, meta["momentum"], meta["wd"], meta["fix_pred_lr"]
    )
    losses, z_stds = [], []
    steps, per_epoch = meta["steps"], meta["steps_per_epoch"]
    for epoch in range(-(-steps // per_epoch)):
        sources.adjust_learning_rate(optimizer, init_lr, epoch)
        batches = range(epoch * per_epoch, min((epoch + 1) * per_epoch, steps))
        inputs = [(to_input(views1[t]).to(dtype), to_input(views2[t]).to(dtype)) for t in batches]
        if sources.main is not None:
            losses += official_epoch(sources, model, optimizer, inputs, epoch)
            z_stds += [float("nan")] * len(inputs)
            continue
        for x1, x2 in inputs:
            loss, z_std = official.train_step(model, optimizer, x1, x2, monitor=True)
            losses.append(loss)
            z_stds.append(z_std)
    out = {f"final/{name}": value.numpy() for name, value in model.state_dict().items()}
    for name, param in model.named_parameters():
        buffers = optimizer.state.get(param, {})
        if "momentum_buffer" in buffers:
            out[f"momentum/{name}"] = buffers["momentum_buffer"].numpy()
    out["losses"] = np.array(losses)
    out["z_std"] = np.array(z_stds)
    return out


def official_epoch(sources, model, optimizer, inputs, epoch) -> list:
    """One epoch of the checkout's main_simsiam.train over the given view pairs; the loss of
    each step, recomputed from the outputs the model returned (train() logs, not returns, it)."""
    outputs = []
    handle = model.register_forward_hook(lambda m, i, out: outputs.append(out))
    criterion = torch.nn.CosineSimilarity(dim=1)
    loader = [([x1, x2], None) for x1, x2 in inputs]
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        sources.main.train(loader, model, criterion, optimizer, epoch, sources.args)
    handle.remove()
    return [float(official.loss_fn(*(t.detach() for t in out))) for out in outputs]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} REQUEST.npz RESULT.npz")
    main(sys.argv[1], sys.argv[2])
