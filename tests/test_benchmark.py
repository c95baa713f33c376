"""tools/benchmark.py runs each mode and ends with a machine-readable line. No timing is asserted:
throughput depends on the machine and its load (docs/PERFORMANCE.md)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_images

TOOL = os.path.join(REPO, "tools", "benchmark.py")


def _last_line_fields(args):
    out = subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    return dict(item.split("=", 1) for item in last.split())


@pytest.mark.slow  # two benchmark processes: make test-slow
def test_pipeline_mode_cpu_and_device(tmp_path):
    write_images(tmp_path, 16, size=(64, 48), ext=".jpg")
    for photometric in ("cpu", "device"):
        fields = _last_line_fields(
            [
                "pipeline",
                f"--folder={tmp_path}",
                "--image_size=32",
                "--threads=1",
                f"--photometric={photometric}",
                "--batch=8",
                "--warmup=1",
                "--steps=2",
            ]
        )
        assert fields["mode"] == "pipeline" and fields["photometric"] == photometric
        assert fields["threads"] == "1" and fields["image_size"] == "32"
        assert float(fields["pairs_per_s"]) > 0 and float(fields["peak_rss_mb"]) > 0


def test_step_mode_on_a_tiny_config():
    fields = _last_line_fields(
        [
            "step",
            f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}",
            "--batch=16",
            "--warmup=1",
            "--steps=2",
            "--jit_compile=false",
        ]
    )
    assert fields["mode"] == "step" and fields["batch"] == "16"
    assert fields["jit_compile"] == "False" and float(fields["pairs_per_s"]) > 0


@pytest.mark.slow  # a benchmark process of 9 timed passes: make test-slow
def test_stages_mode_names_every_stage_and_adds_up(tmp_path):
    write_images(tmp_path, 16, size=(64, 48), ext=".jpg")
    fields = _last_line_fields(
        ["stages", f"--folder={tmp_path}", "--image_size=32", "--limit=16", "--rounds=1"]
    )
    stages = [
        "read_the_file",
        "decode",
        "randomresizedcrop",
        "colorjitter",
        "randomgrayscale",
        "gaussianblur",
        "horizontalflip",
        "finish",
    ]
    assert fields["mode"] == "stages" and fields["threads"] == "1"
    assert [k for k in fields if k not in ("mode", "threads", "cpu_ms_per_pair")] == stages
    total = sum(float(fields[k]) for k in stages)
    # Each field is printed to 4 significant digits.
    assert abs(total - float(fields["cpu_ms_per_pair"])) <= 0.01 + 0.002 * abs(total)
    assert float(fields["decode"]) > 0


@pytest.mark.slow  # model.fit twice in a benchmark process: make test-slow
def test_fit_mode_times_the_same_batches_in_memory_and_through_the_pipeline(tmp_path):
    write_images(tmp_path, 32, size=(64, 48), ext=".jpg")
    fields = _last_line_fields(
        [
            "fit",
            f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}",
            f"--folder={tmp_path}",
            "--batch=8",
            "--warmup=1",
            "--steps=2",
            "--limit=32",
        ]
    )
    assert fields["mode"] == "fit" and fields["batch"] == "8"
    in_memory, pipeline = float(fields["step_s_in_memory"]), float(fields["step_s_pipeline"])
    wait = float(fields["input_wait_share"])
    assert in_memory > 0 and pipeline > 0 and 0 <= wait < 1
    assert abs(wait - max(0.0, 1 - in_memory / pipeline)) < 0.01
    assert abs(float(fields["pairs_per_s"]) - 8 / pipeline) <= 0.01 * 8 / pipeline


def test_bn_mode_times_each_way_at_each_stage_shape():
    out = subprocess.run(
        [sys.executable, TOOL, "bn", "--batch=4", "--rounds=1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    fields = dict(item.split("=", 1) for item in lines[-1].split())
    assert fields["mode"] == "bn" and fields["batch"] == "4"
    ways = [k for k in fields if k.endswith("_ms")]
    assert {"float64_stock_ms", "float32_stock_ms", "fused_ms"} <= set(ways)
    assert all(float(fields[k]) > 0 for k in ways)
    shapes = [line.split()[0] for line in lines if line.split()[0].startswith("4x")]
    assert shapes == ["4x32x32x64", "4x16x16x128", "4x8x8x256", "4x4x4x512"]
