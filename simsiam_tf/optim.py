"""Optimisation as the paper (section 4 "Optimizer"; official main_simsiam.py).

lr = base_lr x global_batch / 256, cosine decay, SGD momentum 0.9, weight decay;
`fix_pred_lr`: the predictor keeps the initial lr (paper section 4.4 note; `--fix-pred-lr`).
"""

from __future__ import annotations

import math
from typing import Iterable

import keras
import tensorflow as tf


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule the paper uses: lr = base_lr x batch / 256."""
    return base_lr * global_batch / 256.0


def _const(value: float, dtype) -> tf.Tensor:
    """A Python float as a tensor of `dtype`. (`tf.cast(0.9, tf.float64)` goes through float32
    first: 0.9 - 2.4e-8.)"""
    return tf.convert_to_tensor(value, dtype=dtype)


@keras.saving.register_keras_serializable("simsiam_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 at `total_steps`.

    Evaluated per step (`optim.lr_schedule="per_step"`); the official code sets the cosine once
    per epoch (`EpochCosine`, "per_epoch"). The two curves are at most pi / (2 x epochs) of the
    peak apart and the per-step one sums to about 1 / epochs less (ImageNet recipe: 1.57% and
    0.99%; docs/FIDELITY.md, tools/measure_departures.py).
    """

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}"
            )
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        # In float64, as the official code's Python float, in its order of operations, then
        # rounded once to the float type of the run (float32; float64 in the exact parity check).
        step = tf.cast(step, tf.float64)
        warm = self.peak_lr * step / max(self.warmup_steps, 1)
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        progress = tf.clip_by_value(progress, 0.0, 1.0)
        cosine = self.peak_lr * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return tf.cast(tf.where(step < self.warmup_steps, warm, cosine), keras.config.floatx())

    def get_config(self):
        return dict(
            peak_lr=self.peak_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps
        )


@keras.saving.register_keras_serializable("simsiam_tf")
class EpochCosine(keras.optimizers.schedules.LearningRateSchedule):
    """main_simsiam.py's `adjust_learning_rate`: the lr is set once per epoch, at its start,

        cur_lr = init_lr * 0.5 * (1. + math.cos(math.pi * epoch / epochs))

    with epoch = step // steps_per_epoch (held at the last epoch past the end). The per-epoch
    values are computed by that Python expression and looked up, so they are the official
    floats to the bit; a function of the step, so a resume mid-epoch continues exactly.
    """

    def __init__(self, peak_lr: float, epochs: int, steps_per_epoch: int):
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.peak_lr = float(peak_lr)
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.per_epoch = [
            self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
            for epoch in range(self.epochs)
        ]

    def __call__(self, step):
        epoch = tf.minimum(tf.cast(step, tf.int64) // self.steps_per_epoch, self.epochs - 1)
        lr = tf.gather(tf.constant(self.per_epoch, tf.float64), epoch)
        return tf.cast(lr, keras.config.floatx())  # one rounding, as WarmupCosine

    def get_config(self):
        return dict(peak_lr=self.peak_lr, epochs=self.epochs, steps_per_epoch=self.steps_per_epoch)


# `optim.lr_schedule`: "per_step" (WarmupCosine) or "per_epoch" (EpochCosine, the official rule).
LR_SCHEDULES = ("per_step", "per_epoch")


@keras.saving.register_keras_serializable("simsiam_tf")
class TorchSGD(keras.optimizers.Optimizer):
    """SGD with momentum and L2 weight decay exactly as `torch.optim.SGD`, which the paper used.

        g <- g + wd * w;   buf <- momentum * buf + g;   w <- w - lr * buf

    This differs from `keras.optimizers.SGD` in two ways that matter for reproducing the recipe:
    Keras folds lr into the momentum buffer (so a changing lr acts differently), and its
    `weight_decay` is decoupled from the gradient. Decay applies to every trainable variable,
    BN and biases included, as in the official code.

    Variables passed to `set_fixed_lr_variables` are updated with the constant `fixed_lr`
    instead of the schedule (the official `--fix-pred-lr`).
    """

    def __init__(
        self,
        learning_rate=0.05,
        momentum: float = 0.9,
        l2_weight_decay: float = 0.0,
        fixed_lr: float | None = None,
        name: str = "torch_sgd",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if l2_weight_decay < 0:
            raise ValueError(f"l2_weight_decay must be >= 0, got {l2_weight_decay}")
        self.momentum = momentum
        self.l2_weight_decay = l2_weight_decay
        self.fixed_lr = fixed_lr
        self._fixed_lr_keys: set = set()
        self._fixed_lr_indices: frozenset = frozenset()

    def set_fixed_lr_variables(self, variables: Iterable) -> None:
        """Marks variables (the predictor's) to be updated with `fixed_lr`. Call before build."""
        if self.built:
            raise RuntimeError("set_fixed_lr_variables must be called before the optimizer builds")
        if self.fixed_lr is None:
            raise ValueError("set_fixed_lr_variables needs fixed_lr to be set")
        self._fixed_lr_keys = {self._var_key(v) for v in variables}

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = [self.add_variable_from_reference(v, "momentum") for v in variables]
        self._fixed_lr_indices = frozenset(
            i for i, v in enumerate(variables) if self._var_key(v) in self._fixed_lr_keys
        )

    def uses_fixed_lr(self, variable) -> bool:
        return self._get_variable_index(variable) in self._fixed_lr_indices

    def _direction(self, gradient, variable):
        """The gradient the momentum buffer accumulates: here g + wd * w."""
        if self.l2_weight_decay:
            gradient = gradient + _const(self.l2_weight_decay, variable.dtype) * variable
        return gradient

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        if self.uses_fixed_lr(variable):
            lr = _const(self.fixed_lr, dtype)
        else:
            lr = tf.cast(learning_rate, dtype)
        gradient = self._direction(tf.cast(gradient, dtype), variable)
        buf = self.momentums[self._get_variable_index(variable)]
        self.assign(buf, _const(self.momentum, dtype) * buf + gradient)
        self.assign_sub(variable, lr * buf)

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            l2_weight_decay=self.l2_weight_decay,
            fixed_lr=self.fixed_lr,
        )
        return config


def build_optimizer(optim_config, global_batch: int, steps_per_epoch: int, predictor_vars=()):
    """The optimizer of the `optim` section of a config, with the scaled, scheduled lr."""
    c = optim_config
    peak = scaled_lr(c.base_lr, global_batch)
    kind = c.get("lr_schedule", "per_step")
    if kind not in LR_SCHEDULES:
        raise ValueError(f"optim.lr_schedule={kind!r} is not known; choose one of {LR_SCHEDULES}")
    if kind == "per_epoch":
        if c.warmup_epochs:
            raise ValueError(
                f"optim.warmup_epochs={c.warmup_epochs} with optim.lr_schedule='per_epoch': the "
                "official per-epoch rule has no warm-up; set warmup_epochs=0 or use 'per_step'"
            )
        schedule = EpochCosine(peak, c.epochs, steps_per_epoch)
    else:
        schedule = WarmupCosine(
            peak,
            total_steps=c.epochs * steps_per_epoch,
            warmup_steps=int(c.warmup_epochs * steps_per_epoch),
        )
    opt = TorchSGD(
        learning_rate=schedule,
        momentum=c.momentum,
        l2_weight_decay=c.weight_decay,
        fixed_lr=peak if c.fix_pred_lr else None,
    )
    if c.fix_pred_lr:
        opt.set_fixed_lr_variables(predictor_vars)
    return opt


# The two LARS rules `LARS` implements (see its docstring).
LARS_RULES = ("larc", "mocov3")


@keras.saving.register_keras_serializable("simsiam_tf")
class LARS(TorchSGD):
    """LARS for the linear evaluation: SGD with momentum whose gradients are first rescaled per
    variable by a trust ratio. Two rules (`rule`):

    "larc" (default): the official linear evaluation, facebookresearch/simsiam `main_lincls.py
    --lars`, which wraps torch.optim.SGD in NVIDIA apex `LARC(trust_coefficient=0.001,
    clip=False)` (apex/parallel/LARC.py, eps 1e-8). For EVERY variable, biases included:

        if ||w|| > 0 and ||g|| > 0:
            g <- (g + wd * w) * trust * ||w|| / (||g|| + wd * ||w|| + eps)
        else:
            g unchanged (LARC zeroes the SGD's weight decay during its step, so a variable
            skipped here gets no decay either)

    "mocov3": facebookresearch/moco-v3 `moco/optimizer.py` (MoCo v3's LARS, which its
    `main_moco.py --optimizer=lars` pretrains with). Variables of more than one dimension get

        g <- g + wd * w;   g <- g * trust * ||w|| / ||g||   (x 1 where either norm is 0)

    and variables of at most one dimension (biases, BN) neither decay nor the trust ratio.

    Then, for every variable: buf <- momentum * buf + g;  w <- w - lr * buf (torch SGD).
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum: float = 0.9,
        l2_weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        rule: str = "larc",
        eps: float = 1e-8,
        name: str = "lars",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            l2_weight_decay=l2_weight_decay,
            name=name,
            **kwargs,
        )
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if rule not in LARS_RULES:
            raise ValueError(f"LARS rule={rule!r} is not known; choose one of {LARS_RULES}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.trust_coefficient = trust_coefficient
        self.rule = rule
        self.eps = eps

    def _direction(self, gradient, variable):
        dtype = variable.dtype
        trust = _const(self.trust_coefficient, dtype)
        wd = _const(self.l2_weight_decay, dtype)
        w_norm = tf.norm(variable)
        if self.rule == "larc":
            g_norm = tf.norm(gradient)
            apply = (w_norm > 0) & (g_norm > 0)
            ratio = trust * w_norm / (g_norm + wd * w_norm + _const(self.eps, dtype))
            return tf.where(apply, (gradient + wd * variable) * ratio, gradient)
        if len(variable.shape) <= 1:
            return gradient
        gradient = gradient + wd * variable
        g_norm = tf.norm(gradient)
        ratio = tf.where(
            (w_norm > 0) & (g_norm > 0),
            trust * w_norm / tf.maximum(g_norm, _const(1e-30, dtype)),
            tf.ones_like(w_norm),
        )
        return gradient * ratio

    def get_config(self):
        config = super().get_config()
        config.pop("fixed_lr")
        config.update(trust_coefficient=self.trust_coefficient, rule=self.rule, eps=self.eps)
        return config
