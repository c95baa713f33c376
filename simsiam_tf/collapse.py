"""The collapse monitor: SimSiam's failure mode made loud (paper section 4.1, Figure 2 middle).

A collapsed SimSiam maps every image to the same point: the loss reaches its minimum -1 while
the representation carries nothing. It shows in the per-channel std of the L2-normalised
output, which the train step logs every epoch as `z_std` (projector output, read through its
output BN in inference mode) and `p_std` (predictor output). For a healthy d-dimensional output
it is about 1/sqrt(d) (each of the d channels of a unit vector spread evenly); collapsed, 0.

`CollapseMonitor` compares std x sqrt(d) with a threshold every epoch, adds the ratios to the
epoch logs (`z_std_ratio`, `p_std_ratio`: progress bar, TensorBoard, history.jsonl), warns when
one stays below the threshold for `patience` consecutive epochs and, if asked, stops the run with
a message naming the likely causes.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import keras
from absl import logging

# What most often collapses a SimSiam run, most frequent first (paper sections 4.1-4.4, and the
# usual reports from users on custom data), keyed by topic.
GENERIC_CAUSES = {
    "stop_gradient": "no stop-gradient on the target branch (config.model.stop_gradient must be "
    "True; without it SimSiam collapses within a few epochs, paper Figure 2)",
    "predictor": "no trainable predictor (config.model.predictor='identity' collapses, paper "
    "Table 1a)",
    "lr": "learning rate too high (lr = optim.base_lr x batch / 256; try half, or a warm-up)",
    "augment": "augmentations too weak: two views that are nearly the same image (a smaller "
    "aug.crop_scale minimum, colour jitter, grayscale; blur for large images)",
    "pred_lr": "the predictor's learning rate decaying with the schedule (optim.fix_pred_lr=True "
    "keeps it constant, paper section 4.4)",
}


def likely_causes(config=None) -> list:
    """The causes to name: first what the run's own config shows, then the usual suspects."""
    specific = {}
    if config is not None:
        m, o = config.model, config.optim
        if not m.stop_gradient:
            specific["stop_gradient"] = (
                "this run has config.model.stop_gradient=False: without the stop-gradient "
                "SimSiam collapses (paper Figure 2); that is the cause"
            )
        if m.predictor == "identity":
            specific["predictor"] = (
                "this run has config.model.predictor='identity': without a predictor SimSiam "
                "collapses even with the stop-gradient (paper Table 1a); that is the cause"
            )
        lr = o.base_lr * o.batch_size / 256.0
        if lr > 0.5:
            specific["lr"] = f"the lr is high: {o.base_lr} x {o.batch_size}/256 = {lr:g}"
    rest = [text for key, text in GENERIC_CAUSES.items() if key not in specific]
    return list(specific.values()) + rest


class CollapseMonitor(keras.callbacks.Callback):
    """Watches `z_std` and `p_std` in the epoch logs against 1/sqrt(d).

    Args:
      dim: d, the output dimension (config.model.proj_dim).
      threshold: an epoch counts as collapsed when std x sqrt(d) of z (or p) is below this.
        Healthy runs sit near 1; a collapse heads to 0.
      patience: warn (and stop, if `stop`) after this many consecutive collapsed epochs.
      stop: end training with `model.stop_training` once the collapse is confirmed.
      causes: the likely causes to name in the message (`likely_causes(config)`).
      keys: the log entries watched.
      log: where the warning goes (absl's logging.warning by default).
    """

    def __init__(
        self,
        dim: int,
        threshold: float = 0.5,
        patience: int = 3,
        stop: bool = False,
        causes: Optional[Sequence[str]] = None,
        keys: Sequence[str] = ("z_std", "p_std"),
        log: Optional[Callable[[str], None]] = None,
    ):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.dim = dim
        self.threshold = threshold
        self.patience = patience
        self.stop = stop
        self.causes = list(causes) if causes is not None else likely_causes()
        self.keys = tuple(keys)
        self.log = log or logging.warning
        self.low_epochs = 0  # consecutive epochs below the threshold
        self.collapsed_at: Optional[int] = None  # epoch (1-based) the collapse was confirmed
        self.message: Optional[str] = None

    def ratios(self, logs) -> dict:
        """std x sqrt(d) of each watched key present in the logs."""
        scale = math.sqrt(self.dim)
        return {k: float(logs[k]) * scale for k in self.keys if logs and k in logs}

    def on_epoch_end(self, epoch, logs=None):
        ratios = self.ratios(logs)
        if not ratios:
            return
        for key, ratio in ratios.items():
            logs[f"{key}_ratio"] = ratio
        low = {k: r for k, r in ratios.items() if not r >= self.threshold}  # NaN counts as low
        self.low_epochs = self.low_epochs + 1 if low else 0
        if self.low_epochs < self.patience:
            return
        self.collapsed_at = self.collapsed_at or epoch + 1
        self.message = self.describe(epoch + 1, low)
        self.log(self.message)
        if self.stop and self.model is not None:
            self.model.stop_training = True

    def describe(self, epoch: int, low: dict) -> str:
        shown = ", ".join(f"{k} x sqrt(d) = {r:.3f}" for k, r in sorted(low.items()))
        lines = [
            f"COLLAPSE: at epoch {epoch} the output std has stayed below {self.threshold:g} x "
            f"1/sqrt(d) (d={self.dim}) for {self.low_epochs} epochs ({shown}; healthy is about "
            "1, collapsed 0): the network is mapping every image to nearly the same point.",
            "Likely causes:",
        ]
        lines += [f"  - {c}" for c in self.causes]
        lines.append(
            "Stopping the run (config.eval.collapse_stop=True)."
            if self.stop
            else "Training goes on (config.eval.collapse_stop=True stops it here)."
        )
        return "\n".join(lines)
