"""Evaluation: the kNN classifier, the stop-gradient switch, LARS, the linear probe, the tools."""

import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import data, holdout, knn, linear, model, optim
from tests.conftest import REPO
from tests.helpers import TINY_TRAIN_FLAGS, tiny_config

# ------------------------------------------------------------------------------------------------
# kNN


def _unit(a):
    a = np.asarray(a, np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_knn_on_constructed_features_gives_the_known_answer():
    # Three classes along three axes, two bank points each; queries near one axis each.
    bank = _unit([[1, 0.1, 0], [1, -0.1, 0], [0, 1, 0.1], [0.1, 1, 0], [0, 0, 1], [0, 0.1, 1]])
    bank_labels = np.array([0, 0, 1, 1, 2, 2])
    queries = _unit([[0.9, 0.2, 0.1], [0.1, 0.8, 0.0], [0.0, 0.2, 0.9], [1, 0, 0.05]])
    preds = knn.knn_predict(bank, bank_labels, queries, num_classes=3, k=2, t=0.1, batch=3)
    np.testing.assert_array_equal(preds, [0, 1, 2, 0])
    acc = knn.knn_accuracy(bank, bank_labels, queries, [0, 1, 2, 1], 3, k=2, t=0.1, batch=1)
    assert acc == pytest.approx(0.75)


def test_knn_votes_are_weighted_by_exp_similarity_over_t():
    # Two very close neighbours of class 0 outvote three distant ones of class 1 (a plain
    # majority of the 5 nearest would say 1); with a large T the weights flatten and 1 wins.
    q = _unit([[1.0, 0.0]])
    close = _unit([[1.0, 0.05], [1.0, -0.05]])
    far = _unit([[0.5, 0.87], [0.5, -0.87], [0.45, 0.89]])
    bank = np.concatenate([close, far])
    labels = np.array([0, 0, 1, 1, 1])
    assert knn.knn_predict(bank, labels, q, 2, k=5, t=0.1)[0] == 0
    assert knn.knn_predict(bank, labels, q, 2, k=5, t=100.0)[0] == 1
    # k larger than the bank is clamped, not an error.
    assert knn.knn_predict(bank, labels, q, 2, k=500, t=0.1)[0] == 0


def test_knn_batching_does_not_change_the_answer():
    rng = np.random.default_rng(0)
    bank, queries = _unit(rng.normal(size=(300, 8))), _unit(rng.normal(size=(70, 8)))
    labels = rng.integers(0, 4, 300)
    a = knn.knn_predict(bank, labels, queries, 4, k=20, t=0.1, batch=7)
    b = knn.knn_predict(bank, labels, queries, 4, k=20, t=0.1, batch=1000)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# The stop-gradient, through SimSiam itself


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_gradient_reaches_z_only_without_stop_gradient(stop_gradient):
    """Asymmetric loss D(p1, z2): view 2 reaches the loss only through z2, so the gradient with
    respect to view 2 is exactly zero with the stop-gradient and non-zero without it."""
    keras.utils.set_random_seed(0)
    net = model.build_simsiam(tiny_config(stop_gradient=stop_gradient, symmetric=False).model)
    x1 = tf.random.uniform((8, 16, 16, 3), seed=1)
    x2 = tf.random.uniform((8, 16, 16, 3), seed=2)
    with tf.GradientTape() as tape:
        tape.watch(x2)
        loss, _, _ = net.compute_simsiam_loss({"view1": x1, "view2": x2}, training=True)
    grad = tape.gradient(loss, x2)
    norm = 0.0 if grad is None else float(tf.norm(grad))
    if stop_gradient:
        assert norm == 0.0
    else:
        assert norm > 0.0


# ------------------------------------------------------------------------------------------------
# LARS


def _larc_sgd_reference(params, grads, lr, mom, wd, trust, eps=1e-8):
    """NumPy transcription of NVIDIA apex LARC(trust_coefficient=trust, clip=False).step()
    (apex/parallel/LARC.py) around torch.optim.SGD(momentum=mom, weight_decay=wd), as the
    official facebookresearch/simsiam main_lincls.py --lars builds it."""
    params = [p.copy() for p in params]
    bufs = [None] * len(params)
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            g = g.copy()
            p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
            if p_norm != 0 and g_norm != 0:
                adaptive_lr = trust * p_norm / (g_norm + p_norm * wd + eps)
                g += wd * p
                g *= adaptive_lr
            # LARC set the group's weight_decay to 0, so SGD adds no decay of its own.
            bufs[i] = g if bufs[i] is None else mom * bufs[i] + g
            params[i] = p - lr * bufs[i]
    return params


def test_lars_default_rule_is_the_official_apex_larc():
    """Three steps of weight and bias against the NumPy LARC: the bias starts at 0, so step 1
    skips its trust ratio and decay; from step 2 on it is scaled like the weight."""
    w0, b0 = np.array([[1.0, -2.0], [0.5, 3.0]]), np.zeros(2)
    grads = [
        (np.array([[0.3, 0.1], [-0.2, 0.4]]), np.array([0.5, -1.0])),
        (np.array([[-0.1, 0.2], [0.6, -0.3]]), np.array([0.2, 0.3])),
        (np.array([[0.05, -0.4], [0.1, 0.2]]), np.array([-0.7, 0.1])),
    ]
    lr, mom, wd, trust = 0.5, 0.9, 0.1, 1e-3
    w, b = tf.Variable(w0), tf.Variable(b0)
    opt = optim.LARS(lr, momentum=mom, l2_weight_decay=wd, trust_coefficient=trust)
    assert opt.rule == "larc"
    for gw, gb in grads:
        opt.apply([tf.constant(gw), tf.constant(gb)], [w, b])
    ref_w, ref_b = _larc_sgd_reference([w0, b0], grads, lr, mom, wd, trust)
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-7)
    np.testing.assert_allclose(b.numpy(), ref_b, rtol=1e-7)
    # Step 1 moves the zero bias by the plain gradient; steps 2 and 3 add gradients scaled by
    # ~trust, so the bias moves almost only by the momentum of step 1.
    (one_step,) = _larc_sgd_reference([b0], [grads[0][1:]], lr, mom, wd, trust)
    np.testing.assert_allclose(one_step, -lr * grads[0][1])
    np.testing.assert_allclose(ref_b, (1 + mom + mom**2) * one_step, rtol=2e-3)
    # The MoCo v3 rule would have left the bias unscaled: a different result.
    w2, b2 = tf.Variable(w0), tf.Variable(b0)
    moco = optim.LARS(lr, momentum=mom, l2_weight_decay=wd, trust_coefficient=trust, rule="mocov3")
    for gw, gb in grads:
        moco.apply([tf.constant(gw), tf.constant(gb)], [w2, b2])
    assert np.abs(b2.numpy() - ref_b).max() > 0.1
    assert np.abs(w2.numpy() - ref_w).max() > 1e-6  # wd enters the trust ratio differently


def test_lars_larc_rule_in_float32_and_a_zero_gradient():
    """float32 variables (as in training) and a zero gradient: no trust ratio, no decay."""
    w0 = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
    grads = [(np.array([[0.3, 0.1], [-0.2, 0.4]], np.float32),), (np.zeros((2, 2), np.float32),)]
    w = tf.Variable(w0)
    opt = optim.LARS(0.3, momentum=0.9, l2_weight_decay=0.05, trust_coefficient=0.02)
    for (g,) in grads:
        opt.apply([tf.constant(g)], [w])
    (ref,) = _larc_sgd_reference([w0.astype(np.float64)], grads, 0.3, 0.9, 0.05, 0.02)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-6)


def test_lars_mocov3_rule_matches_its_update():
    """Two steps against a NumPy transcription of facebookresearch/moco-v3 moco/optimizer.py."""
    w0, b0 = np.array([[1.0, -2.0], [0.5, 3.0]]), np.array([0.1, -0.2])
    grads = [(np.array([[0.3, 0.1], [-0.2, 0.4]]), np.array([0.5, -1.0]))] * 2
    lr, mom, wd, trust = 0.5, 0.9, 1e-2, 1e-3
    w, b = tf.Variable(w0), tf.Variable(b0)
    opt = optim.LARS(lr, momentum=mom, l2_weight_decay=wd, trust_coefficient=trust, rule="mocov3")
    ref_w, ref_b, mu_w, mu_b = w0.copy(), b0.copy(), 0.0, 0.0
    for gw, gb in grads:
        opt.apply([tf.constant(gw), tf.constant(gb)], [w, b])
        dp = gw + wd * ref_w  # 2-D: decay and trust ratio
        dp = dp * (trust * np.linalg.norm(ref_w) / np.linalg.norm(dp))
        mu_w = mom * mu_w + dp
        ref_w = ref_w - lr * mu_w
        mu_b = mom * mu_b + gb  # 1-D: plain momentum
        ref_b = ref_b - lr * mu_b
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-7)
    np.testing.assert_allclose(b.numpy(), ref_b, rtol=1e-7)


@pytest.mark.parametrize("rule", ["larc", "mocov3"])
def test_lars_leaves_zero_weights_to_plain_momentum(rule):
    w = tf.Variable(np.zeros((2, 2)))
    optim.LARS(1.0, momentum=0.0, l2_weight_decay=0.5, rule=rule).apply(
        [tf.ones((2, 2), tf.float64)], [w]
    )
    np.testing.assert_allclose(w.numpy(), -np.ones((2, 2)))


def test_lars_rule_is_a_protocol_option_and_bad_rules_fail():
    assert linear.get_protocol("imagenet").lars_rule == "larc"
    proto = linear.get_protocol("imagenet", lars_rule="mocov3", epochs=2)
    opt = linear.build_optimizer(proto, 10)
    assert isinstance(opt, optim.LARS) and opt.rule == "mocov3"
    assert optim.LARS.from_config(opt.get_config()).rule == "mocov3"
    with pytest.raises(ValueError, match="lars_rule='moco'"):
        linear.get_protocol("imagenet", lars_rule="moco")
    with pytest.raises(ValueError, match="rule='lamb'"):
        optim.LARS(0.1, rule="lamb")


# ------------------------------------------------------------------------------------------------
# Linear probe


def _tiny_source(n, seed, classes=3, size=12):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int64)
    # Class-dependent colour so that even a random CNN separates them.
    images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    images[np.arange(n), :, :, labels] += 150
    return data.Source(f"tiny{seed}", n, classes, labels, images=images)


def _tiny_backbone():
    keras.utils.set_random_seed(0)
    return model.build_backbone("cnn_small", width=4)


@pytest.mark.parametrize("augment", [False, True])
def test_linear_probe_leaves_the_backbone_unchanged(augment):
    backbone = _tiny_backbone()
    before = linear.snapshot(backbone)
    proto = linear.get_protocol("cifar", epochs=20, batch_size=16, base_lr=8.0, augment=augment)
    result = linear.linear_eval(
        backbone, _tiny_source(64, 0), _tiny_source(32, 1), 12, proto, seed=0
    )
    assert result["backbone_unchanged"] is True
    assert linear.changed_weights(backbone, before) == []  # BN moving statistics included
    assert "top5" not in result  # 3 classes: the top 5 always holds the answer
    assert result["top1"] > 0.6  # the colour cue is easy


def test_linear_probe_reports_top5_only_with_more_than_5_classes():
    backbone = _tiny_backbone()
    proto = linear.get_protocol("cifar", epochs=2, batch_size=16)
    train, test = _tiny_source(48, 0, classes=3), _tiny_source(24, 1, classes=3)
    train = dataclasses.replace(train, num_classes=6)  # 6 classes, 3 of them seen
    result = linear.linear_eval(backbone, train, test, 12, proto, seed=0)
    assert result["num_classes"] == 6 and 0.0 <= result["top1"] <= result["top5"] <= 1.0


def test_changed_weights_notices_a_moving_statistic():
    backbone = _tiny_backbone()
    before = linear.snapshot(backbone)
    bn = backbone.get_layer("bn1")
    bn.moving_mean.assign(bn.moving_mean + 1.0)
    assert linear.changed_weights(backbone, before) == [bn.moving_mean.path]


def test_linear_probe_runs_bn_in_inference_mode():
    backbone = _tiny_backbone()
    probe = linear.LinearProbe(backbone, linear.build_head(int(backbone.output.shape[-1]), 3))
    x = tf.random.uniform((4, 12, 12, 3), seed=3)
    np.testing.assert_allclose(
        probe(x, training=True).numpy(), probe(x, training=False).numpy(), atol=1e-6
    )
    assert [v.path for v in probe.trainable_variables] == [
        v.path for v in probe.head.trainable_variables
    ]


def test_protocols():
    p = linear.get_protocol("imagenet")
    assert (p.optimizer, p.batch_size, p.epochs, p.weight_decay) == ("lars", 4096, 90, 0.0)
    assert p.lr == pytest.approx(1.6) and p.augment and p.eval_crop_fraction == 0.875
    assert linear.get_protocol("cifar", epochs=5, base_lr=None).epochs == 5
    with pytest.raises(ValueError, match="protocol"):
        linear.get_protocol("mnist")
    with pytest.raises(ValueError, match="batch_size"):
        linear.get_protocol("cifar", batch_size=0)


def test_topk_accuracy():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert linear.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert linear.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)


def test_holdout_split_is_per_class_and_disjoint():
    src = _tiny_source(50, 0)
    train, test = holdout.holdout_split(src, 0.2, seed=0)
    assert train.num_examples + test.num_examples == 50
    assert set(np.unique(test.labels)) == set(np.unique(src.labels))
    both = np.concatenate([train.images, test.images]).reshape(50, -1)
    assert len(np.unique(both, axis=0)) == 50


# ------------------------------------------------------------------------------------------------
# The tools


@contextlib.contextmanager
def _tool_module(name):
    """A tool imported as a module; its absl flags are forgotten afterwards."""
    from absl import flags

    spec = importlib.util.spec_from_file_location(
        f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    saved = set(flags.FLAGS)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for f in list(flags.FLAGS):
            if f not in saved:
                delattr(flags.FLAGS, f)


@pytest.mark.parametrize("name", ["eval_knn", "eval_linear", "plot", "ablate"])
def test_tools_import(name):
    with _tool_module(name) as module:
        assert callable(module.main)


def test_ablation_report_from_arm_directories(tmp_path):
    """ablate.py's table, JSON and figure from finished arm directories (no training)."""
    dim = 64
    histories = {
        "simsiam": [(-0.5, 0.95, 0.9, 0.34), (-0.6, 0.94, 0.9, 0.35), (-0.62, 0.94, 0.9, 0.36)],
        "no_stopgrad": [(-0.8, 0.6, 0.4, 0.30), (-0.9, 0.4, 0.2, 0.29), (-0.95, 0.3, 0.1, 0.28)],
    }
    for name, rows in histories.items():
        arm = tmp_path / name
        arm.mkdir()
        config = {
            "model": {"proj_dim": dim, "backbone": "cnn_small"},
            "seed": 0,
            "data": {"source": "builtin:digits", "max_examples": 0},
            "optim": {"batch_size": 32},
            "eval": {"knn_k": 20, "knn_t": 0.1},
        }
        (arm / "config.json").write_text(json.dumps(config))
        (arm / "random_init.json").write_text(json.dumps({"knn_top1": 0.32}))
        (arm / "summary.json").write_text(json.dumps({"wall_seconds": 10.0}))
        lines = [
            json.dumps(dict(epoch=e + 1, loss=loss, z_std=z / 8, p_std=p / 8, knn_top1=k))
            for e, (loss, z, p, k) in enumerate(rows)
        ]
        (arm / "history.jsonl").write_text("\n".join(lines) + "\n")
    with _tool_module("ablate") as ablate:
        assert ablate.collapse_epoch([{"epoch": 1, "z_std": 0.01}], 8.0, 0.5, 1) == 1
        assert ablate.parse_custom("wide:model.pred_hidden=2048,config.optim.fix_pred_lr=True") == (
            "wide",
            {"model.pred_hidden": "2048", "optim.fix_pred_lr": "True"},
        )
        with pytest.raises(ValueError, match="NAME:KEY=VALUE"):
            ablate.parse_custom("nocolon")
        arms = ablate.collect(str(tmp_path), ["simsiam", "no_stopgrad"])
        md = ablate.write_report(str(tmp_path), arms, {n: ablate.ARMS[n] for n in arms}, {}, 3)
    text = open(md).read()
    assert "| no_stopgrad | model.stop_gradient=False | 3 | -0.950 | 0.300 | 0.100 | 0.32 |" in text
    assert "| epoch 3 |" in text  # the collapse warning fired at epoch 3 (p below 0.5 from 1)
    report = json.load(open(tmp_path / "ablation.json"))
    assert report["arms"]["simsiam"]["knn_vs_random_init"] == pytest.approx(4.0)
    assert report["arms"]["simsiam"]["collapse_warning_epoch"] is None
    with open(tmp_path / "ablation.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _tool(*args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


TINY = TINY_TRAIN_FLAGS + [
    "--config.train.steps_per_epoch=3",
    "--config.eval.knn_every_epochs=1",
    "--config.eval.max_bank=300",
    "--config.eval.max_queries=100",
]


@pytest.mark.slow
def test_tools_end_to_end(tmp_path):
    """train -> eval_knn, eval_linear, plot on the run and on a folder it never saw; ablate."""
    from tests.conftest import write_images

    run = str(tmp_path / "run")
    _tool("tools/train.py", f"--workdir={run}", *TINY, "--config.optim.epochs=1")
    out = _tool("tools/eval_knn.py", f"--workdir={run}")
    res = json.load(open(os.path.join(run, "knn_eval.json")))
    assert 0 <= res["knn_top1"] <= 1 and 0 <= res["random_init_knn_top1"] <= 1, out
    _tool("tools/eval_linear.py", f"--workdir={run}", "--epochs=2", "--verbose=0")
    res = json.load(open(os.path.join(run, "linear_cifar.json")))
    assert res["backbone_unchanged"] and 0 <= res["top1"] <= res["top5"] <= 1
    _tool("tools/plot.py", f"--workdir={run}", "--queries=3", "--k=4")
    for name in ("curves.png", "retrieval.png"):
        with open(os.path.join(run, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # An unseen labelled folder without train/test subfolders: a seeded 80/20 split.
    folder = tmp_path / "unseen"
    for c in range(3):
        write_images(str(folder / f"class{c}"), 10, seed=c)
    _tool(
        "tools/eval_knn.py",
        f"--workdir={run}",
        f"--data=folder:{folder}",
        "--k=5",
        f"--output={tmp_path / 'knn_unseen.json'}",
    )
    assert json.load(open(tmp_path / "knn_unseen.json"))["num_queries"] == 6
    _tool(
        "tools/eval_linear.py",
        f"--workdir={run}",
        f"--data=folder:{folder}",
        "--epochs=2",
        "--batch_size=8",
        "--verbose=0",
        f"--output={tmp_path / 'lin_unseen.json'}",
    )
    assert json.load(open(tmp_path / "lin_unseen.json"))["num_test"] == 6

    study = str(tmp_path / "study")
    out = _tool(
        "tools/ablate.py",
        "--config=configs/quickstart.py",
        f"--workdir={study}",
        "--arms=simsiam,no_stopgrad",
        "--epochs=1",
        *TINY[1:],
    )
    report = json.load(open(os.path.join(study, "ablation.json")))
    assert set(report["arms"]) == {"simsiam", "no_stopgrad"}
    assert os.path.exists(os.path.join(study, "ablation.png")) and "| no_stopgrad |" in out


# ------------------------------------------------------------------------------------------------
# The held-out split of a labelled folder without test/


def _folder_config(folder, **eval_overrides):
    c = tiny_config()
    c.data.source = f"folder:{folder}"
    c.data.image_size = 16
    for k, v in eval_overrides.items():
        c.eval[k] = v
    return c


def _names(source):
    return sorted(
        os.path.relpath(f, source.name.partition(":")[2].split("[")[0]) for f in source.files
    )


def test_holdout_is_recorded_stratified_disjoint_and_reused(tmp_path, caplog):
    from tests.conftest import write_images

    folder = tmp_path / "photos"
    for c, n in (("a", 10), ("b", 6), ("c", 1)):
        write_images(str(folder / c), n, seed=len(c) + n)
    run = str(tmp_path / "run")
    config = _folder_config(folder)
    train, info = holdout.load_split(config, "train", run, record=True)
    test, _ = holdout.load_split(config, "test", run)
    # 20% of each class, at least one of a class of two or more, none of a class of one.
    assert sorted(test.labels.tolist()) == [0, 0, 1]
    assert train.num_examples == 14 and test.num_examples == 3
    assert not set(train.files) & set(test.files)
    assert sorted(train.files + test.files) == sorted(data.load_source(f"folder:{folder}").files)
    saved = json.load(open(os.path.join(run, holdout.RECORD)))
    assert saved["heldout"] == _names(test) and saved["num_heldout"] == 3
    assert saved["sha1"] == holdout.digest(_names(test)) and saved["excluded_from_pretraining"]
    assert (saved["fraction"], saved["seed"], saved["num_examples"]) == (0.2, 0, 17)
    assert info == saved

    # Another seed in the config, and a new file in the folder: the record still decides, and
    # the new file joins the training side.
    write_images(str(folder / "a" / "new"), 1, seed=99)
    other = _folder_config(folder, holdout_seed=5)
    test2, _ = holdout.load_split(other, "test", run)
    train2, _ = holdout.load_split(other, "train", run)
    assert _names(test2) == _names(test)
    assert train2.num_examples == 15 and any("new" in f for f in train2.files)
    assert any("the run's recorded split is used" in r.getMessage() for r in caplog.records)
    # Without a record, the seed draws another split of the same size.
    fresh, _ = holdout.load_split(other, "test", str(tmp_path / "elsewhere"))
    assert fresh.num_examples == 3 and _names(fresh) != _names(test)


def test_no_holdout_with_a_test_folder_or_fraction_zero(tmp_path):
    from tests.conftest import write_images

    for split, n in (("train", 5), ("test", 2)):
        for c in ("a", "b"):
            write_images(str(tmp_path / "split" / split / c), n, seed=n)
    config = _folder_config(tmp_path / "split")
    test, info = holdout.load_split(config, "test", str(tmp_path / "run"), record=True)
    assert info is None and test.num_examples == 4 and test.name.endswith("test")
    assert not os.path.exists(tmp_path / "run" / holdout.RECORD)

    for c in ("a", "b"):
        write_images(str(tmp_path / "flat" / c), 5, seed=1)
    config = _folder_config(tmp_path / "flat", holdout_fraction=0.0)
    assert holdout.load_split(config, "test", str(tmp_path / "run2"), record=True) == (None, None)
    assert holdout.load_split(config, "train", None)[0].num_examples == 10
    with pytest.raises(ValueError, match="holdout_fraction=0 holds none out"):
        linear.eval_sources(config, None)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("eval.holdout_fraction", 1.0, r"must be in \[0, 1\)"),
        ("eval.holdout_fraction", -0.1, r"must be in \[0, 1\)"),
        ("eval.holdout_seed", -1, "non-negative"),
        ("train.log_every_steps", -5, ">= 0"),
    ],
)
def test_holdout_and_logging_keys_are_validated(key, value, match):
    from simsiam_tf import config as config_lib
    from simsiam_tf.errors import ConfigError

    c = config_lib.default_config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=f"config.{key}={value}.*{match}"):
        config_lib.validate(c)


def test_weights_info_names_the_epoch_of_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
    manager = tf.train.CheckpointManager(ckpt, str(run / "checkpoints"), 3)
    manager.save(checkpoint_number=8)
    (run / "checkpoints" / "steps_per_epoch.json").write_text(json.dumps({"steps_per_epoch": 4}))
    info = linear.weights_info(str(run))
    assert (info["kind"], info["epoch"], info["step"]) == ("checkpoint", 2, 8)
    assert linear.describe(info).endswith("ckpt-8 (epoch 2, step 8)")
    manager.save(checkpoint_number=10)  # a mid-epoch backup
    assert linear.weights_info(str(run))["epoch"] == 2.5
    assert linear.weights_info(str(run), random_init=True)["epoch"] == 0
    assert linear.weights_info(str(run), weights="x.weights.h5")["epoch"] is None
    # No checkpoints, only the final weights: the last epoch of history.jsonl.
    final = tmp_path / "final"
    final.mkdir()
    (final / "backbone.weights.h5").write_bytes(b"")
    rows = [{"epoch": e, "step": 5 * e, "loss": 0.0} for e in (1, 2, 3)]
    (final / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert linear.weights_info(str(final))["epoch"] == 3
    with pytest.raises(FileNotFoundError, match="neither checkpoints"):
        linear.weights_info(str(tmp_path / "empty"))
