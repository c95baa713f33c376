"""A small step-for-step parity check against the official PyTorch SimSiam (tools/parity.py).

Runs where torch and torchvision can be imported: by the Python SIMSIAM_PARITY_PYTHON names,
by .venv-parity/bin/python (what `make parity` installs), or by this interpreter; skips
otherwise.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_python():
    for python in (
        os.environ.get("SIMSIAM_PARITY_PYTHON", ""),
        os.path.join(REPO, ".venv-parity", "bin", "python"),
    ):
        if python and os.access(python, os.X_OK):
            probe = subprocess.run([python, "-c", "import torch, torchvision"], capture_output=True)
            if probe.returncode == 0:
                return python
    if importlib.util.find_spec("torch") and importlib.util.find_spec("torchvision"):
        return sys.executable
    return None


def _parity(tmp_path, *flags):
    torch_python = _torch_python()
    if torch_python is None:
        pytest.skip("torch/torchvision not installed (make parity installs them)")
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "parity.py"),
        "--batch=8",
        "--steps=2",
        f"--workdir={tmp_path}",
        f"--torch_python={torch_python}",
        *flags,
    ]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{last}\n{proc.stderr[-3000:]}"
    assert last.endswith("all within bounds"), last
    # Every compared quantity is there, each with its number.
    values = dict(re.findall(r" (\w+)=([0-9.e+-]+)", last))
    groups = ("feat", "z", "p", "loss", "grad", "step_loss", "weight", "bn", "mom")
    assert set(groups) <= set(values), last
    return {k: float(values[k]) for k in groups}


@pytest.mark.slow  # make parity, which CI runs, runs every case of it
@pytest.mark.parametrize("case", ["resnet18_cifar", "resnet18_builder"])
def test_float64_steps_are_the_official_computation(tmp_path, case):
    """Both sides in float64 (every path live): every tensor within 1e-10 of the official
    code's, forward, gradients, and weights, BN statistics and momentum after the steps; the
    CIFAR recipe with one param group, builder.py's layout with --fix-pred-lr, both with a
    non-zero frozen projector bias."""
    errors = _parity(tmp_path, "--checks=", f"--float64_checks={case}")
    assert max(errors.values()) < 1e-10, errors


@pytest.mark.slow  # make parity, which CI runs, runs every case of it
def test_resnet18_cifar_float32_is_as_close_to_float64_as_the_official_float32(tmp_path):
    """The first step within 1e-5 (forward) and 1e-4 (gradients) of the official float32; every
    tensor, after the steps too, within max(bound, 10 x the official float32's own error)
    of the official float64 (the harness fails otherwise: "all within bounds")."""
    errors = _parity(tmp_path, "--checks=resnet18_cifar", "--float64_checks=")
    assert max(errors[g] for g in ("feat", "z", "p", "loss")) <= 1e-5, errors
    assert errors["grad"] <= 1e-4, errors


def test_ulp_nudge_moves_every_value_to_the_next_float_up_or_down():
    """The floor's extra official runs see views moved by exactly one float32 ulp per value,
    about half of them up, and uint8 views first become float32 / 255 as the worker feeds them."""
    torch_python = _torch_python()
    if torch_python is None:
        pytest.skip("torch/torchvision not installed (make parity installs them)")
    code = """
import json, sys
sys.path.insert(0, "tools/parity")
import numpy as np
import worker
x = np.random.default_rng(1).uniform(0.0, 1.0, (3, 8, 8, 3)).astype(np.float32)
u = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
y = worker.ulp_nudge(x, np.random.default_rng(0))
v = worker.ulp_nudge(u, np.random.default_rng(0))
w = u.astype(np.float32) / np.float32(255.0)
print(json.dumps(dict(
    dtypes=[str(y.dtype), str(v.dtype)],
    one_ulp=bool(np.all(
        (y == np.nextafter(x, np.float32(2))) | (y == np.nextafter(x, np.float32(-1))))),
    up=float(np.mean(y > x)),
    uint8_one_ulp=bool(np.all(
        (v == np.nextafter(w, np.float32(2))) | (v == np.nextafter(w, np.float32(-1))))),
    uint8_moved=float(np.mean(v != w)),
)))
"""
    proc = subprocess.run(
        [torch_python, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtypes"] == ["float32", "float32"], out
    assert out["one_ulp"] and out["uint8_one_ulp"], out
    assert 0.4 < out["up"] < 0.6, out  # 576 coin flips
    assert out["uint8_moved"] == 1.0, out
