"""A small ablation study: the same recipe, seed, data and budget per arm, one switch apart.

  python tools/ablate.py --config=configs/cifar10_small_cpu.py --workdir=runs/ablation \
      --arms=simsiam,no_stopgrad,no_predictor --epochs=4 \
      [--config.data.source=archive:../shared/data/cifar10-jpeg.tar.gz ...]

Each arm is a pretraining run, `tools/train.py` in its own process, in WORKDIR/ARM (rerunning
resumes or skips finished arms). Any `--config.KEY=VALUE` applies to every arm. Then the study's
WORKDIR/ablation.md (a Markdown table per arm and per epoch), WORKDIR/ablation.json and
WORKDIR/ablation.png (the paper's Figure 2: training loss, output std and kNN accuracy per
epoch) are written.

Arms (ARMS below): simsiam (the method), no_stopgrad (paper Figure 2), no_predictor and
fixed_predictor (Table 1a), no_pred_bn (pred_hidden_bn=False), asymmetric (Table 4 of the
loss), fix_pred_lr. Custom arms: --arm=NAME:model.pred_hidden=2048,optim.fix_pred_lr=True.
"""

import json
import math
import os
import subprocess
import sys
import time

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402,F401  (before TensorFlow: a quiet start-up)

from simsiam_tf import callbacks, plots  # noqa: E402

ARMS = {
    "simsiam": {},
    "no_stopgrad": {"model.stop_gradient": False},
    "no_predictor": {"model.predictor": "identity"},
    "fixed_predictor": {"model.predictor": "fixed_random"},
    "no_pred_bn": {"model.pred_hidden_bn": False},
    "asymmetric": {"model.symmetric": False},
    "fix_pred_lr": {"optim.fix_pred_lr": True},
}

_CONFIG = flags.DEFINE_string("config", None, "Recipe file shared by every arm.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory; each arm in WORKDIR/ARM.")
_ARMS = flags.DEFINE_list("arms", ["simsiam", "no_stopgrad", "no_predictor"], "Built-in arms.")
_CUSTOM = flags.DEFINE_multi_string("arm", [], "Custom arm NAME:KEY=VALUE,KEY=VALUE.")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs per arm (the schedule's length).")
_RUN = flags.DEFINE_bool("run", True, "Run missing arms; False only collects what is there.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_custom(spec: str) -> tuple:
    name, sep, body = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"--arm={spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--arm={spec!r}: {item!r} is not KEY=VALUE")
        overrides[key.removeprefix("config.")] = value
    return name, overrides


def arm_command(name, overrides, config, workdir, epochs, shared) -> list:
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "train.py"),
        f"--config={config}",
        f"--workdir={os.path.join(workdir, name)}",
        f"--config.optim.epochs={epochs}",
        *shared,
    ]
    return cmd + [f"--config.{k}={v}" for k, v in overrides.items()]


def _finished(arm_dir: str, epochs: int) -> bool:
    rows = callbacks.read_history(os.path.join(arm_dir, "history.jsonl"))
    stopped = os.path.exists(os.path.join(arm_dir, "summary.json"))
    return stopped and bool(rows) and (rows[-1]["epoch"] >= epochs or _stopped_early(arm_dir))


def _stopped_early(arm_dir: str) -> bool:
    """A run the collapse monitor stopped (config.eval.collapse_stop) is finished too."""
    with open(os.path.join(arm_dir, "config.json")) as f:
        return bool(json.load(f).get("eval", {}).get("collapse_stop", False))


def _load_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def collect(workdir: str, names) -> dict:
    """Per arm: config, history rows, summary and random-init kNN."""
    out = {}
    for name in names:
        arm_dir = os.path.join(workdir, name)
        config = _load_json(os.path.join(arm_dir, "config.json"))
        rows = callbacks.read_history(os.path.join(arm_dir, "history.jsonl"))
        if config is None or not rows:
            logging.warning("arm %s has no history in %s", name, arm_dir)
            continue
        out[name] = dict(
            config=config,
            rows=rows,
            summary=_load_json(os.path.join(arm_dir, "summary.json")) or {},
            random_init=(_load_json(os.path.join(arm_dir, "random_init.json")) or {}).get(
                "knn_top1"
            ),
        )
    return out


def collapse_epoch(rows, scale: float, threshold: float, patience: int):
    """The epoch at which the collapse monitor's rule fires on a history (None: never)."""
    low = 0
    for row in rows:
        ratios = [row[k] * scale for k in ("z_std", "p_std") if k in row]
        low = low + 1 if ratios and not min(ratios) >= threshold else 0
        if low >= patience:
            return row["epoch"]
    return None


def _init_range(inits: dict) -> str:
    if not inits:
        return "not recorded"
    lo, hi = 100 * min(inits.values()), 100 * max(inits.values())
    return f"{lo:.2f}%" if lo == hi else f"{lo:.2f}-{hi:.2f}% across arms"


def _fmt(x, spec=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_report(workdir: str, arms: dict, overrides: dict, commands: dict, epochs: int) -> str:
    first = next(iter(arms.values()))
    dim = int(first["config"]["model"]["proj_dim"])
    scale = math.sqrt(dim)
    threshold = first["config"]["eval"].get("collapse_threshold", 0.5)
    inits = {n: a["random_init"] for n, a in arms.items() if a["random_init"] is not None}
    random_init = sum(inits.values()) / len(inits) if inits else None
    patience = first["config"]["eval"].get("collapse_patience", 3)
    ref = arms.get("simsiam")
    ref_std = {r["epoch"]: r.get("z_std") for r in ref["rows"]} if ref else {}

    lines = [
        "# Ablation study",
        "",
        f"Recipe `{first['config'].get('_recipe', '')}` with the arm's switch; {epochs} epochs "
        f"per arm; backbone {first['config']['model']['backbone']}; data "
        f"`{first['config']['data']['source']}` (max_examples "
        f"{first['config']['data']['max_examples']}); batch "
        f"{first['config']['optim']['batch_size']}; seed {first['config']['seed']}. "
        f"std ratio = per-channel std of the l2-normalised output x sqrt(d), d = {dim}: about 1 "
        f"healthy, 0 collapsed. kNN: k={first['config']['eval']['knn_k']}, "
        f"T={first['config']['eval']['knn_t']}; each arm is compared with its own network at "
        f"initialisation (random init: {_init_range(inits)}). Collapse warning: the collapse "
        f"monitor's rule, z or p std ratio below {threshold:g} for {patience} epochs in a row.",
        "",
        "| arm | switch | epochs | loss | z std ratio | p std ratio | z std vs simsiam "
        "| kNN top-1 (%) | vs random init | collapse warning | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    result = {}
    for name, arm in arms.items():
        last = arm["rows"][-1]
        z = last.get("z_std", float("nan")) * scale
        p = last.get("p_std", float("nan")) * scale
        rel = None
        if ref_std.get(last["epoch"]):
            rel = last.get("z_std", float("nan")) / ref_std[last["epoch"]]
        knn = next((r["knn_top1"] for r in reversed(arm["rows"]) if "knn_top1" in r), None)
        init = arm["random_init"]
        gap = None if knn is None or init is None else 100 * (knn - init)
        switch = ", ".join(f"{k}={v}" for k, v in overrides[name].items()) or "(none)"
        fired = collapse_epoch(arm["rows"], scale, threshold, patience)
        collapsed = f"epoch {fired}" if fired else "no"
        wall = arm["summary"].get("wall_seconds", last.get("time"))  # unfinished: history
        lines.append(
            f"| {name} | {switch} | {last['epoch']} | {_fmt(last['loss'])} | {_fmt(z)} | "
            f"{_fmt(p)} | {_fmt(rel, '.2f')} | {_fmt(knn and 100 * knn, '.2f')} | "
            f"{_fmt(gap, '+.2f')} | {collapsed} | {_fmt(wall, '.0f')} |"
        )
        result[name] = dict(
            switch=overrides[name],
            epochs=last["epoch"],
            loss=last["loss"],
            z_std_ratio=z,
            p_std_ratio=p,
            z_std_vs_simsiam=rel,
            knn_top1=knn,
            random_init_knn_top1=init,
            knn_vs_random_init=gap,
            collapse_warning_epoch=fired,
            wall_seconds=wall,
            command=" ".join(commands.get(name, [])),
            history=arm["rows"],
        )
    lines += ["", "Per epoch: loss / z std ratio / kNN top-1 (%).", ""]
    names = list(arms)
    lines.append("| epoch | " + " | ".join(names) + " |")
    lines.append("| --- |" + " --- |" * len(names))
    last_epoch = max(r["epoch"] for a in arms.values() for r in a["rows"])
    for e in range(1, last_epoch + 1):
        cells = []
        for name in names:
            row = next((r for r in arms[name]["rows"] if r["epoch"] == e), None)
            if row is None:
                cells.append("")
                continue
            knn = row.get("knn_top1")
            cells.append(
                f"{_fmt(row['loss'])} / {_fmt(row.get('z_std', float('nan')) * scale)} / "
                f"{_fmt(knn and 100 * knn, '.1f')}"
            )
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    if commands:
        lines += ["", "Commands:", ""]
        lines += [f"    {' '.join(cmd)}" for cmd in commands.values()]
    md = os.path.join(workdir, "ablation.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(workdir, "ablation.json"), "w") as f:
        json.dump(dict(random_init_knn_top1=random_init, proj_dim=dim, arms=result), f, indent=2)
    plots.plot_ablation(
        {name: arm["rows"] for name, arm in arms.items()},
        os.path.join(workdir, "ablation.png"),
        dim,
        inits,
        title=f"SimSiam ablations: {first['config']['model']['backbone']}, "
        f"{first['config']['data']['source']} ({first['config']['data']['max_examples'] or 'all'}"
        f" images), batch {first['config']['optim']['batch_size']}, {epochs}-epoch schedule",
    )
    return md


def _parse(argv):
    """absl flags, with every --config.KEY=VALUE set aside for the arms' train commands."""
    shared = [a for a in argv[1:] if a.startswith("--config.")]
    flags.FLAGS([argv[0]] + [a for a in argv[1:] if not a.startswith("--config.")])
    return shared


def main(shared):
    workdir, epochs = _WORKDIR.value, _EPOCHS.value
    arms = {}
    try:
        for name in _ARMS.value:
            if name not in ARMS:
                raise ValueError(f"--arms: unknown arm {name!r}; choose from {sorted(ARMS)}")
            arms[name] = ARMS[name]
        for spec in _CUSTOM.value:
            name, overrides = parse_custom(spec)
            arms[name] = overrides
    except ValueError as err:
        sys.exit(f"error: {err}")
    os.makedirs(workdir, exist_ok=True)
    commands = {
        name: arm_command(name, ov, _CONFIG.value, workdir, epochs, shared)
        for name, ov in arms.items()
    }
    for name, cmd in commands.items():
        arm_dir = os.path.join(workdir, name)
        if not _RUN.value or _finished(arm_dir, epochs):
            logging.info("arm %s: already in %s", name, arm_dir)
            continue
        logging.info("arm %s: %s", name, " ".join(cmd))
        start = time.time()
        with open(os.path.join(workdir, f"{name}.log"), "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if proc.returncode:
            sys.exit(f"error: arm {name} failed (exit {proc.returncode}); see {log.name}")
        logging.info("arm %s: done in %.0f s", name, time.time() - start)
    collected = collect(workdir, arms)
    if not collected:
        sys.exit(f"error: no arm of {workdir} has a history")
    for arm in collected.values():
        arm["config"]["_recipe"] = os.path.relpath(_CONFIG.value, REPO)
    md = write_report(workdir, collected, arms, commands, epochs)
    print(open(md).read())
    print(f"-> {md}, {os.path.join(workdir, 'ablation.png')}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
