"""A small step-for-step parity check against the official PyTorch SimSiam (tools/parity.py).

Runs where torch and torchvision can be imported: by the Python SIMSIAM_PARITY_PYTHON names,
by .venv-parity/bin/python (what `make parity` installs), or by this interpreter; skips
otherwise.
"""

import importlib.util
import os
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


def test_resnet18_cifar_steps_match_the_official_pytorch_code(tmp_path):
    torch_python = _torch_python()
    if torch_python is None:
        pytest.skip("torch/torchvision not installed (make parity installs them)")
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "parity.py"),
        "--checks=resnet18_cifar",
        "--batch=8",
        "--steps=2",
        f"--workdir={tmp_path}",
        "--float64_checks=",
        f"--torch_python={torch_python}",
    ]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{last}\n{proc.stderr[-3000:]}"
    assert last.startswith("parity: resnet18_cifar float32 feat=")
    assert last.endswith("all within bounds")
    # Every compared quantity is there, each with its number.
    for group in ("feat", "z", "p", "loss", "grad", "step_loss", "weight", "bn", "mom"):
        assert f" {group}=" in last
