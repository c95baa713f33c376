"""The pip package: pinned dependencies equal to the requirements files, the wheel's contents
(recipes, commands), the public names; `import simsiam_tf` starts neither TensorFlow nor torch."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import tomllib

import simsiam_tf
from tests.conftest import REPO
from tests.helpers import run_python


def _project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _pins(name: str) -> set:
    with open(os.path.join(REPO, name)) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return {line for line in lines if line and not line.startswith("-r")}


def test_dependencies_are_the_pinned_requirements():
    project = _project()
    extras = project["optional-dependencies"]
    assert set(project["dependencies"]) | set(extras["dev"]) == _pins("requirements-common.txt")
    assert set(extras["cpu"]) == _pins("requirements.txt")
    assert set(extras["gpu"]) == _pins("requirements-gpu.txt") | _pins("requirements-serving.txt")
    assert all(re.fullmatch(r"[\w\-\[\]]+==[\w.]+", p) for p in project["dependencies"])


def test_console_scripts_name_commands():
    scripts = _project()["scripts"]
    assert {"simsiam-train", "simsiam-eval-knn", "simsiam-export", "simsiam-embed"} <= set(scripts)
    for target in scripts.values():  # read, not imported: each command defines its own flags
        module, func = target.split(":")
        with open(importlib.util.find_spec(module).origin) as f:
            assert f"\ndef {func}() -> None:" in f.read(), target


def test_wheel_carries_the_recipes_and_the_command_line(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("simsiam_tf", "configs"):
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    configs = {os.path.basename(p) for p in os.listdir(os.path.join(REPO, "configs"))}
    assert {f"simsiam_tf/configs/{c}" for c in configs if c.endswith(".py")} <= names
    assert {"simsiam_tf/cli/__init__.py", "simsiam_tf/cli/train.py", "simsiam_tf/api.py"} <= names
    entry_points = zipfile.ZipFile(tmp_path / wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    )
    assert b"simsiam-train = simsiam_tf.cli.train:run_command" in entry_points


def test_import_starts_neither_tensorflow_nor_torch():
    code = (
        "import sys, simsiam_tf; print('tensorflow' in sys.modules); "
        "simsiam_tf.SimSiam; import simsiam_tf.cli.train, simsiam_tf.api; "
        "print('tensorflow' in sys.modules, 'torch' in sys.modules)"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True", "False"]


@pytest.mark.parametrize("name", simsiam_tf.__all__[:-1])
def test_public_names_are_documented(name):
    assert (getattr(simsiam_tf, name).__doc__ or "").strip(), name


def test_shipped_recipe_by_name_outside_a_clone(tmp_path):
    """`--config=quickstart` from a directory without configs/: the recipe the package ships."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train.py"), "--config=quickstrt"]
        + [f"--workdir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: config file quickstrt does not exist; did you mean "
        f"{os.path.join(REPO, 'configs', 'quickstart.py')}?"
    )
