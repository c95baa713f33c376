"""tools/relu_ties.py: where a float32 backbone step parts from float64 (docs/FIDELITY.md)."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_relu_ties_counts_every_relu_and_without_a_flip_every_gradient_keeps_float32_digits():
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "relu_ties.py"), "--size=16", "--batch=4"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    relus = re.findall(r"^\| (re_lu\S*) \(after (\S+)\) \| (\d+) \| (\d+) \|", out, re.M)
    # ResNet-18 (CIFAR stem): the stem's ReLU and two per basic block.
    assert len(relus) == 17
    assert int(relus[0][2]) == 4 * 16 * 16 * 64 and int(relus[-1][2]) == 4 * 2 * 2 * 512
    flips = sum(int(r[3]) for r in relus)
    assert f"sign differences: {flips}" in out
    grads = [float(e) for e in re.findall(r"^\| \S+/\w+ \| ([0-9.e+-]+) \|$", out, re.M)]
    assert len(grads) == 60  # 20 convolutions, 20 BNs x (gamma, beta)
    if flips == 0:  # no ReLU input on the other side of 0: float32 rounding alone
        assert max(grads) < 1e-4, max(grads)
    else:
        assert grads[0] < 1e-4  # the last BN's beta: only the final ReLU is above it
