"""Weighted kNN evaluation of a pretraining run (the SimSiam authors' CIFAR monitor).

  python tools/eval_knn.py --workdir=runs/c10 [--data=folder:/path/to/labelled/images] \
      [--k=200 --t=0.1 --max_bank=N --max_queries=N]

L2-normalised backbone features (BatchNorm in inference mode) of the bank split are the memory;
each query's k nearest by cosine similarity vote with weight exp(sim / t); top-1 on the query
split. The same network at its random initialisation is scored too (--random_init_baseline),
since a random CNN already does well above chance. Writes WORKDIR/knn_eval.json (or --output),
with the epoch of the checkpoint scored.

The splits are those training scored (simsiam_tf/holdout.py): a labelled folder without test/
is scored on the held-out images listed in WORKDIR/holdout.json, and broken image files are
skipped and named (or refused under data.strict), reusing the run's cached verdicts. --data
scores another labelled data set: class subfolders, with train/ and test/ subfolders, or else a
seeded held-out split (eval.holdout_fraction, eval.holdout_seed of the run).
"""

import json
import os
import sys
import time

from absl import flags, logging

from simsiam_tf import cli, data, holdout, knn, linear
from simsiam_tf.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining run directory.")
_DATA = flags.DEFINE_string("data", "", "Data source spec (default: the run's data.source).")
_BANK_SPLIT = flags.DEFINE_string("bank_split", "", "Bank split (default: eval.bank_split).")
_QUERY_SPLIT = flags.DEFINE_string("query_split", "", "Query split (default: eval.query_split).")
_MAX_BANK = flags.DEFINE_integer("max_bank", None, "Seeded bank subset (default: eval.max_bank).")
_MAX_QUERIES = flags.DEFINE_integer(
    "max_queries", None, "Query subset (default: eval.max_queries)."
)
_K = flags.DEFINE_integer("k", None, "Neighbours (default: eval.knn_k).")
_T = flags.DEFINE_float("t", None, "Temperature (default: eval.knn_t).")
_BATCH = flags.DEFINE_integer(
    "batch", None, "Images and queries per batch (default: eval.knn_batch)."
)
_BASELINE = flags.DEFINE_bool("random_init_baseline", True, "Also score the initial network.")
_WEIGHTS = flags.DEFINE_string("weights", "", "A backbone .weights.h5 to evaluate instead.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON path (default: WORKDIR/knn_eval.json).")
flags.mark_flags_as_required(["workdir"])


def _or(value, default):
    return default if value is None else value


def score(backbone, bank, queries, image_size, crop_fraction, k, t, batch, dtype) -> float:
    # The whole bank, in chunks on the device (knn.build_bank): any size fits beside the model.
    bank_f = knn.build_bank(
        backbone, data.eval_dataset(bank, image_size, batch, crop_fraction), dtype
    )
    query_f, query_y = knn.extract_features(
        backbone, data.eval_dataset(queries, image_size, batch, crop_fraction)
    )
    num_classes = max(bank.num_classes, queries.num_classes)
    return knn.knn_accuracy(bank_f, None, query_f, query_y, num_classes, k, t, batch)


def main(argv):
    del argv
    start = time.time()
    workdir = _WORKDIR.value
    try:
        backbone, config, origin = linear.load_run_backbone(workdir, weights=_WEIGHTS.value)
        weights = linear.weights_info(workdir, weights=_WEIGHTS.value)
        d, e = config.data, config.eval
        bank, queries, held = linear.eval_sources(
            config,
            workdir,
            _DATA.value,
            _BANK_SPLIT.value or e.bank_split,
            _QUERY_SPLIT.value or e.query_split,
            _or(_MAX_BANK.value, e.max_bank),
            _or(_MAX_QUERIES.value, e.max_queries),
        )
    except (ConfigError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    k, t, batch = _or(_K.value, e.knn_k), _or(_T.value, e.knn_t), _or(_BATCH.value, e.knn_batch)
    args = (bank, queries, d.image_size, d.eval_crop_fraction, k, t, batch, e.knn_bank_dtype)
    logging.info(
        "backbone: %s; bank %s (%d), queries %s (%d)",
        origin,
        bank.name,
        bank.num_examples,
        queries.name,
        queries.num_examples,
    )
    result = {
        "knn_top1": score(backbone, *args),
        "backbone": origin,
        "epoch": weights["epoch"],
        "step": weights["step"],
    }
    if _BASELINE.value:
        init, _, _ = linear.load_run_backbone(workdir, random_init=True)
        result["random_init_knn_top1"] = score(init, *args)
    result.update(
        k=k,
        t=t,
        bank=bank.name,
        num_bank=bank.num_examples,
        queries=queries.name,
        num_queries=queries.num_examples,
        holdout=holdout.summary(held),
        wall_seconds=time.time() - start,
    )
    out = _OUTPUT.value or os.path.join(workdir, "knn_eval.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    line = f"knn_top1={result['knn_top1']:.4f}"
    if weights["epoch"] is not None:
        line = f"epoch {weights['epoch']}: {line}"
    if "random_init_knn_top1" in result:
        line += f" random_init_knn_top1={result['random_init_knn_top1']:.4f}"
    print(f"{line} -> {out}")


def run_command() -> None:
    """The `simsiam-eval-knn` command (tools/eval_knn.py)."""
    cli.run(main)


if __name__ == "__main__":
    run_command()
