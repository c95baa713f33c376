"""A small step-for-step parity check against the official PyTorch SimSiam (tools/parity.py).

Runs where torch and torchvision can be imported: by the Python SIMSIAM_PARITY_PYTHON names,
by .venv-parity/bin/python (what `make parity` installs), or by this interpreter; skips
otherwise.
"""

import importlib.util
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
def test_resnet18_cifar_float64_steps_are_the_official_computation(tmp_path):
    """Both sides in float64 (every path live): every tensor within 1e-10 of the official
    code's, forward, gradients, and weights, BN statistics and momentum after the steps."""
    errors = _parity(tmp_path, "--checks=", "--float64_checks=resnet18_cifar")
    assert max(errors.values()) < 1e-10, errors


@pytest.mark.slow  # make parity, which CI runs, runs every case of it
def test_resnet18_cifar_float32_first_step_matches(tmp_path):
    errors = _parity(tmp_path, "--checks=resnet18_cifar", "--float64_checks=")
    assert max(errors[g] for g in ("feat", "z", "p", "loss")) <= 1e-5, errors
    assert errors["grad"] <= 1e-4, errors
