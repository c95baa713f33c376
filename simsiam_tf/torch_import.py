"""An official PyTorch checkpoint (facebookresearch/simsiam) -> a run directory of this project.

The checkpoint arrives as NumPy (tools/import_torch.py reads it with torch; nothing here needs
torch). Two layouts are recognised:

  pretraining   main_simsiam.py's checkpoint_NNNN.pth.tar: `epoch` (epochs completed), `arch`,
                `state_dict` (`module.encoder.*` with the projector as `module.encoder.fc.*`,
                `module.predictor.*`) and `optimizer` (SGD momentum buffers)
  linear_eval   main_lincls.py's checkpoint: `state_dict` of a torchvision ResNet
                (`module.conv1.weight`, ..., the classifier `module.fc.*`)

The run directory is what tools/train.py writes, so every tool takes it (tools/eval_knn.py,
tools/eval_linear.py, tools/export.py, and tools/train.py to continue pretraining):

  config.json           the given config (eval.random_init_knn off: the run did not start from
                        this seed's initialisation)
  checkpoints/ckpt-N    model + optimizer at step N = epoch x steps_per_epoch
  backbone.weights.h5   the backbone
  history.jsonl         one row for the imported epochs (no metrics: the checkpoint has none)
  import.json           where the weights came from and what was made of them
  classifier.npz        linear_eval only: the classifier, kernel [in, out] and bias

What `epoch` means for continuing: this project's position in training is the optimizer's step
count, and train.py resumes at epoch = step // steps_per_epoch. So the import sets the step to
(the checkpoint's completed epochs) x (the steps of one epoch of the run that will continue),
and carries over the SGD momentum buffers (optim.TorchSGD has torch's buffer); the cosine
schedule then resumes at the learning rate the official run would use for its next epoch (per
step or per epoch as `optim.lr_schedule` says). A checkpoint whose `optimizer` is empty or
missing imports the weights alone; the momentum buffers then start at zero. With
steps_per_epoch = 0 the step is 0, which is all evaluation and export need: train.py would
pretrain from epoch 0 starting at these weights. A linear_eval checkpoint has
no projector, predictor or pretraining state: those start at this seed's initialisation, at
step 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional

import ml_collections
import numpy as np
from absl import logging

from simsiam_tf import callbacks, data, torch_weights, train
from simsiam_tf import config as config_lib

PRETRAINING = "pretraining"
LINEAR_EVAL = "linear_eval"
_BUFFERS = ("running_mean", "running_var", torch_weights.COUNTER)
_PREFIX = "module."


@dataclasses.dataclass
class OfficialCheckpoint:
    """An official checkpoint as NumPy, names without `module.`."""

    layout: str  # PRETRAINING or LINEAR_EVAL
    state_dict: dict
    epoch: Optional[int]  # epochs completed, as main_simsiam.py saves it
    arch: Optional[str]
    momentum: dict  # parameter name -> SGD momentum buffer (pretraining only; may be empty)


def _strip_prefix(state_dict: Mapping) -> dict:
    names = list(state_dict)
    prefixed = [n.startswith(_PREFIX) for n in names]
    if any(prefixed) and not all(prefixed):
        first = names[prefixed.index(False)]
        raise ValueError(f"checkpoint tensor {first} lacks the `module.` prefix the others have")
    if all(prefixed):
        return {n[len(_PREFIX) :]: v for n, v in state_dict.items()}
    return dict(state_dict)


def parse(raw: Mapping) -> OfficialCheckpoint:
    """Recognises the layout of a `torch.load`ed checkpoint whose tensors are NumPy arrays (a
    dict with `state_dict`, or a bare state_dict)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"checkpoint holds a {type(raw).__name__}, not a dict")
    if "state_dict" in raw:
        state_dict = raw["state_dict"]
    elif raw and all(isinstance(v, np.ndarray) for v in raw.values()):
        state_dict = raw
    else:
        raise ValueError(
            f"checkpoint has no `state_dict` (its keys: {sorted(raw)[:8]}): not a checkpoint of "
            "main_simsiam.py or main_lincls.py"
        )
    state_dict = _strip_prefix(state_dict)
    if any(n.startswith("encoder.") for n in state_dict):
        layout = PRETRAINING
    elif "fc.weight" in state_dict and "conv1.weight" in state_dict:
        layout = LINEAR_EVAL
    else:
        raise ValueError(
            "checkpoint's state_dict has neither `encoder.*` (main_simsiam.py) nor a ResNet with "
            f"`fc` (main_lincls.py); its first tensor is {next(iter(state_dict), 'none')}"
        )
    epoch = raw.get("epoch") if "state_dict" in raw else None
    momentum = {}
    optimizer = raw.get("optimizer") if "state_dict" in raw else None
    # An empty or missing `optimizer` (stripped before sharing the weights) imports the weights
    # alone: the momentum buffers then start at zero.
    if layout == PRETRAINING and isinstance(optimizer, Mapping) and optimizer:
        momentum = _momentum_buffers(state_dict, optimizer)
    return OfficialCheckpoint(
        layout=layout,
        state_dict=state_dict,
        epoch=None if epoch is None else int(epoch),
        arch=raw.get("arch") if "state_dict" in raw else None,
        momentum=momentum,
    )


def _momentum_buffers(state_dict: Mapping, optimizer: Mapping) -> dict:
    """Parameter name -> momentum buffer of a torch.optim.SGD state_dict.

    The optimizer numbers the parameters in the order of its param groups: the official code
    passes `model.parameters()`, or with --fix-pred-lr the encoder's then the predictor's;
    both are the state_dict's order without the BatchNorm buffers. The frozen projector bias
    never gets a gradient, hence no buffer.
    """
    params = [n for n in state_dict if n.rsplit(".", 1)[-1] not in _BUFFERS]
    ids = [i for group in optimizer.get("param_groups", []) for i in group.get("params", [])]
    if len(ids) != len(params):
        raise ValueError(
            f"checkpoint optimizer has {len(ids)} parameters, its state_dict {len(params)}: "
            "not the official SGD state"
        )
    state = optimizer.get("state", {})
    out = {}
    for i, name in zip(ids, params):
        buf = state.get(i, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = np.asarray(buf)
    return out


def count_steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Steps of one epoch as train.py counts them: training examples // global batch, capped by
    train.steps_per_epoch (before image folders drop files that do not decode)."""
    d = config.data
    source = data.load_source(
        d.source, "train", d.max_examples, config.seed, d.tfds_data_dir or None, d.tfds_download
    )
    if source is None:
        raise ValueError(f"config.data.source={d.source!r} has no train split")
    steps = source.num_examples // config.optim.batch_size
    if config.train.steps_per_epoch:
        steps = min(steps, config.train.steps_per_epoch)
    return steps


def _check_momentum(tensors: list, momentum: Mapping) -> None:
    for t in tensors:
        if t.name in momentum and tuple(momentum[t.name].shape) != t.shape:
            raise ValueError(
                f"checkpoint momentum buffer of {t.name} has shape {momentum[t.name].shape}; "
                f"the model expects {t.shape}"
            )


def write_run(
    ckpt: OfficialCheckpoint,
    config: ml_collections.ConfigDict,
    workdir: str,
    steps_per_epoch: int,
    origin: str,
) -> dict:
    """Checks the checkpoint against the config's model, then writes the run directory.

    Nothing is written when the architecture differs: the ValueError names the first tensor.
    Returns the contents of import.json.
    """
    for name in ("config.json", "checkpoints", "backbone.weights.h5"):
        if os.path.exists(os.path.join(workdir, name)):
            raise ValueError(f"{workdir} already holds a run ({name}); choose a new --workdir")
    if steps_per_epoch < 0:
        raise ValueError(f"steps_per_epoch must be >= 0, got {steps_per_epoch}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.random_init_knn = False
    config_lib.validate(config)
    continuing = ckpt.layout == PRETRAINING and steps_per_epoch > 0 and ckpt.epoch is not None
    step = ckpt.epoch * steps_per_epoch if continuing else 0
    if ckpt.layout == PRETRAINING and not ckpt.momentum:
        logging.warning(
            "%s has no SGD state (`optimizer` empty or missing): the weights are imported and "
            "the momentum buffers start at zero",
            origin,
        )

    import keras

    keras.utils.set_random_seed(config.seed)
    net, opt = train.build_model_and_optimizer(config, max(steps_per_epoch, 1))
    m = config.model
    what = f"config model.backbone={m.backbone}"
    classifier = None
    if ckpt.layout == PRETRAINING:
        what += (
            f", proj_layers={m.proj_layers}, proj_hidden={m.proj_hidden}, proj_dim={m.proj_dim}, "
            f"pred_hidden={m.pred_hidden}"
        )
        tensors = torch_weights.simsiam_tensors(net)
    else:
        backbone_sd, kernel, bias = torch_weights.split_linear_eval(ckpt.state_dict)
        tensors = torch_weights.backbone_tensors(net.backbone)
        ckpt = dataclasses.replace(ckpt, state_dict=backbone_sd)
        classifier = {"kernel": kernel, "bias": bias}
    if ckpt.arch:
        what += f"; checkpoint arch={ckpt.arch}"
    # Every check before any write: the model's tensors, the classifier, the momentum buffers.
    torch_weights.check_state_dict(tensors, ckpt.state_dict, what)
    feat_dim = int(net.backbone.output.shape[-1])
    if classifier is not None and classifier["kernel"].shape[0] != feat_dim:
        raise ValueError(
            f"checkpoint tensor fc.weight has {classifier['kernel'].shape[0]} inputs; the "
            f"backbone gives {feat_dim} ({what})"
        )
    if continuing:
        _check_momentum(tensors, ckpt.momentum)

    torch_weights.assign_tensors(tensors, ckpt.state_dict, what)
    momentum_loaded = 0
    if continuing:
        for t in tensors:
            if t.variable is not None and t.name in ckpt.momentum and t.variable.trainable:
                buf = opt.momentums[opt._get_variable_index(t.variable)]
                buf.assign(torch_weights.from_torch_layout(ckpt.momentum[t.name], t.kind))
                momentum_loaded += 1
        opt.iterations.assign(step)

    os.makedirs(workdir, exist_ok=True)
    train.write_config(config, workdir)
    checkpointer = callbacks.Checkpointer(
        os.path.join(workdir, "checkpoints"), net, opt, max(steps_per_epoch, 1)
    )
    checkpointer.set_model(net)
    checkpoint_path = checkpointer.save()
    net.backbone.save_weights(os.path.join(workdir, "backbone.weights.h5"))
    if classifier is not None:
        np.savez(os.path.join(workdir, "classifier.npz"), **classifier)
    epochs_done = step // steps_per_epoch if continuing else 0
    info = {
        "checkpoint": origin,
        "layout": ckpt.layout,
        "arch": ckpt.arch,
        "checkpoint_epoch": ckpt.epoch,
        "step": step,
        "steps_per_epoch": steps_per_epoch,
        "epochs_done": epochs_done,
        "momentum_buffers": momentum_loaded,
        "projector": (
            "imported" if ckpt.layout == PRETRAINING else "initialised (seed %d)" % config.seed
        ),
        "frozen_projector_bias": "folded into the output BN moving mean",
        "run_checkpoint": checkpoint_path,
    }
    with open(os.path.join(workdir, "import.json"), "w") as f:
        json.dump(info, f, indent=2)
    if epochs_done:
        with open(os.path.join(workdir, "history.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": epochs_done, "imported_from": origin}) + "\n")
    logging.info("Imported %s (%s) into %s: %s", origin, ckpt.layout, workdir, info)
    return info
