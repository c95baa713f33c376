"""Bad configs fail before any data is read, naming the key and what is allowed."""

import os
import pathlib
import re

import pytest

from simsiam_tf import config as config_lib
from simsiam_tf import data
from tests.conftest import REPO

CONFIGS = pathlib.Path(REPO) / "configs"


def _bad(key, value, match):
    c = config_lib.default_config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("model.backbone", "vit_b16", r"model.backbone.*resnet18_cifar"),
        ("model.predictor", "transformer", r"model.predictor.*identity"),
        ("data.source", "s3:bucket/x", r"data.source='s3:bucket/x'.*folder:PATH"),
        ("data.source", "folder:/no/such/dir", r"data.source.*does not exist"),
        ("data.photometric", "gpu", r"data.photometric.*cpu"),
        ("data.image_size", 16, r"data.image_size=16.*at least 32"),
        ("optim.base_lr", 0.0, r"optim.base_lr=0.0.*> 0"),
        ("optim.base_lr", -0.1, r"optim.base_lr"),
        ("optim.epochs", 0, r"optim.epochs=0.*positive"),
        ("optim.batch_size", 0, r"optim.batch_size"),
        ("aug.crop_scale", (0.5, 0.2), r"aug.crop_scale"),
        ("aug.jitter_prob", 1.5, r"aug.jitter_prob.*probability"),
        ("aug.hue", 0.7, r"aug.hue"),
        ("optim.warmup_epochs", 900.0, r"warm-up must be shorter.*--config.optim.warmup_epochs"),
        ("data.source", "archive:no/such.tar.gz", r"archive no/such.tar.gz does not exist"),
        ("data.source", "archive:photos.rar", r"archive ends in one of"),
        ("train.precision", "fp8", r"train.precision.*mixed_bfloat16"),
    ],
)
def test_bad_values_name_the_key(key, value, match):
    if key == "data.image_size":
        c = config_lib.default_config()
        c.model.backbone = "resnet50"
        c.data.image_size = value
        with pytest.raises(ValueError, match=match):
            config_lib.validate(c)
        return
    _bad(key, value, match)


def _shipped_configs():
    import importlib.util

    for path in sorted(CONFIGS.glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield path, module.get_config()


def test_default_and_shipped_configs_are_valid(monkeypatch):
    config_lib.validate(config_lib.default_config())
    names = sorted(p.name for p in CONFIGS.glob("*.py"))
    assert {"quickstart.py", "cifar10_resnet18.py", "imagenet_resnet50.py"} <= set(names)
    # Paths in configs are relative to the repository root, where the tools run.
    monkeypatch.chdir(REPO)
    for _, config in _shipped_configs():
        kind, arg = data.parse_source(config.data.source)
        if kind == "archive" and not os.path.exists(arg):
            continue  # the CIFAR-10 JPEG archive beside the repository; absent on users' machines
        config_lib.validate(config)


def _strings(d, prefix=""):
    for k, v in d.items():
        if hasattr(v, "items"):
            yield from _strings(v, f"{prefix}{k}.")
        elif isinstance(v, str):
            yield f"{prefix}{k}", v


# An absolute path of one machine: /tmp/x, /home/me, ~/x, C:\x (placeholders like /path/to too).
ABSOLUTE = re.compile(
    r"(?<![\w.~/-])(/(?:tmp|home|root|work|mnt|data|Users|path|opt|srv|var)\b|~/)"
)


def test_no_shipped_config_names_an_absolute_path():
    for path, config in _shipped_configs():
        for key, value in _strings(config):
            arg = value.split(":", 1)[1] if key == "data.source" else value
            assert not os.path.isabs(arg) and not arg.startswith("~"), (path.name, key, value)
        text = path.read_text()
        found = ABSOLUTE.findall(text)
        assert not found, f"{path.name} names an absolute path: {found}"


def test_the_absolute_path_check_can_fail():
    assert ABSOLUTE.search("--config.data.source=folder:/tmp/cifar10")
    assert ABSOLUTE.search("tar -xzf x.tar.gz -C ~/data")
    assert not ABSOLUTE.search("archive:../shared/data/cifar10-jpeg.tar.gz runs/c10/tb")


def test_paper_recipes():
    import importlib.util

    root = CONFIGS

    def load(name):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()

    cifar = load("cifar10_resnet18")
    assert (cifar.optim.batch_size, cifar.optim.base_lr, cifar.optim.weight_decay) == (
        512,
        0.03,
        5e-4,
    )
    assert (cifar.optim.epochs, cifar.model.proj_layers, cifar.aug.blur_prob) == (800, 2, 0.0)
    imnet = load("imagenet_resnet50")
    assert (imnet.optim.batch_size, imnet.optim.base_lr, imnet.optim.weight_decay) == (
        512,
        0.05,
        1e-4,
    )
    assert imnet.optim.fix_pred_lr and imnet.model.proj_layers == 3 and imnet.aug.blur_prob == 0.5
    assert (imnet.model.proj_dim, imnet.model.pred_hidden) == (2048, 512)
