"""Linear evaluation of a pretraining run: a linear classifier on the frozen backbone.

  python tools/eval_linear.py --workdir=runs/c10 [--protocol=cifar|imagenet] \
      [--data=folder:/path/to/labelled/images] [--random_init] [--epochs=N ...]

The backbone (latest checkpoint, else WORKDIR/backbone.weights.h5) runs with BatchNorm in
inference mode; only the linear head trains (protocols: simsiam_tf/linear.py). The tool checks
that every backbone weight is unchanged afterwards, and writes top-1 (top-5 too with more than 5
classes) and the epoch of the checkpoint as JSON to WORKDIR/linear_<protocol>[_random_init].json
(or --output). Quiet while the head trains unless --verbose=1 (a bar) or 2 (a line per epoch).

The splits are those training used (simsiam_tf/holdout.py): for a labelled folder without
test/, the head trains on the pretraining images and is scored on the held-out ones listed in
WORKDIR/holdout.json; broken image files are skipped and named (or refused under data.strict),
reusing the run's cached verdicts. --data evaluates on another labelled data set: class
subfolders, with train/ and test/ subfolders, or else a seeded held-out split.
"""

import json
import os
import sys

from absl import flags, logging

from simsiam_tf import cli, holdout, linear, optim
from simsiam_tf.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining run directory.")
_PROTOCOL = flags.DEFINE_enum("protocol", "cifar", list(linear.PROTOCOLS), "Evaluation protocol.")
_DATA = flags.DEFINE_string("data", "", "Data source spec (default: the run's data.source).")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "Split the classifier trains on.")
_TEST_SPLIT = flags.DEFINE_string("test_split", "", "Split scored (default: eval.query_split).")
_MAX_TRAIN = flags.DEFINE_integer("max_train", 0, "Seeded subset of the train split (0: all).")
_MAX_TEST = flags.DEFINE_integer("max_test", 0, "Seeded subset of the test split (0: all).")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override the protocol's epochs.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Override the protocol's batch size.")
_BASE_LR = flags.DEFINE_float("base_lr", None, "Override the protocol's base lr (x batch/256).")
_OPTIMIZER = flags.DEFINE_enum("optimizer", None, ["sgd", "lars"], "Override the optimizer.")
_LARS_RULE = flags.DEFINE_enum(
    "lars_rule",
    None,
    list(optim.LARS_RULES),
    "LARS: larc (official main_lincls.py, every variable) or mocov3 (biases exempt).",
)
_AUGMENT = flags.DEFINE_bool("augment", None, "Override: train on random-resized-crop views.")
_RANDOM_INIT = flags.DEFINE_bool("random_init", False, "Evaluate the network at initialisation.")
_WEIGHTS = flags.DEFINE_string("weights", "", "A backbone .weights.h5 to evaluate instead.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON path (default: in the run directory).")
_VERBOSE = flags.DEFINE_integer(
    "verbose", 0, "Keras verbosity while the head trains: 0 quiet, 1 bar, 2 a line per epoch."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    try:
        proto = linear.get_protocol(
            _PROTOCOL.value,
            epochs=_EPOCHS.value,
            batch_size=_BATCH.value,
            base_lr=_BASE_LR.value,
            optimizer=_OPTIMIZER.value,
            lars_rule=_LARS_RULE.value,
            augment=_AUGMENT.value,
        )
        backbone, config, origin = linear.load_run_backbone(
            _WORKDIR.value, _RANDOM_INIT.value, _WEIGHTS.value
        )
        weights = linear.weights_info(_WORKDIR.value, _RANDOM_INIT.value, _WEIGHTS.value)
        d = config.data
        train_src, test_src, held = linear.eval_sources(
            config,
            _WORKDIR.value,
            _DATA.value,
            _TRAIN_SPLIT.value,
            _TEST_SPLIT.value or config.eval.query_split,
            _MAX_TRAIN.value,
            _MAX_TEST.value,
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    logging.info("backbone: %s", origin)
    result = linear.linear_eval(
        backbone,
        train_src,
        test_src,
        d.image_size,
        proto,
        d.eval_crop_fraction,
        config.seed,
        verbose=_VERBOSE.value,
    )
    result.update(
        backbone=origin,
        epoch=weights["epoch"],
        step=weights["step"],
        holdout=holdout.summary(held),
    )
    suffix = "_random_init" if _RANDOM_INIT.value else ""
    out = _OUTPUT.value or os.path.join(_WORKDIR.value, f"linear_{proto.name}{suffix}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    line = f"top1={result['top1']:.4f}"
    if weights["epoch"] is not None:
        line = f"epoch {weights['epoch']}: {line}"
    if "top5" in result:
        line += f" top5={result['top5']:.4f}"
    print(f"{line} backbone_unchanged=True -> {out}")


def run_command() -> None:
    """The `simsiam-eval-linear` command (tools/eval_linear.py)."""
    cli.run(main)


if __name__ == "__main__":
    run_command()
