"""Pretrains SimSiam.

  python tools/train.py --config=configs/cifar10_resnet18.py --workdir=runs/cifar10 \
      [--config.optim.epochs=100 --config.data.source=folder:~/images ...]

Rerunning the same command resumes from the last checkpoint in --workdir (after Ctrl-C, a
preemption or a crash). A rerun whose config changes what the run means (model, data,
augmentation, optimiser) is refused, naming each changed key; --allow_config_change accepts it.
Raising --config.optim.epochs of a finished run trains it longer.
"""

from absl import flags, logging
from ml_collections import config_flags

from simsiam_tf import callbacks, cli, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a run although its config changed in a key that changes the run's meaning.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    try:
        summary = train.train(
            _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value
        )
    except (callbacks.NonFiniteLossError, train.RunLocked) as err:
        cli.fail(str(err), code=1)
    except train.Stopped as err:
        cli.stop(str(err), err.exit_code)
    except KeyboardInterrupt:
        # Ctrl-C before training started (loading or checking data): nothing to save yet.
        cli.stop(
            "stopped by Ctrl-C before training started; rerunning the same command starts it", 130
        )
    logging.info("summary: %s", summary)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))


def run_command() -> None:
    """The `simsiam-train` command (tools/train.py)."""
    cli.run(main)


if __name__ == "__main__":
    run_command()
