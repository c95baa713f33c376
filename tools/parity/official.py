"""The official SimSiam in PyTorch, written from facebookresearch/simsiam, for the parity
harness only: training, evaluation and serving never import torch.

    simsiam/builder.py   the encoder (torchvision ResNet, zero_init_residual=True) whose `fc` is
                         the projector, [Linear(no bias), BN, ReLU] x (L-1), Linear with its
                         bias frozen, BN(affine=False); the predictor Linear(no bias), BN, ReLU,
                         Linear.
    main_simsiam.py      loss -(cos(p1, z2).mean() + cos(p2, z1).mean()) / 2 with z detached;
                         init_lr = lr * batch / 256; SGD(momentum, weight_decay) over one
                         parameter group, or with --fix-pred-lr two, the predictor's with
                         `fix_lr`; adjust_learning_rate once per epoch,
                         lr = init_lr * 0.5 * (1 + cos(pi * epoch / epochs)).

The CIFAR ResNet-18 (paper appendix D) is torchvision's resnet18 with a 3x3 stride-1 conv1 and
no max-pool. The official builder always has 3 projector layers of width prev_dim; L and the
width are parameters here so that the CIFAR recipe (2 layers of 2048) can be compared too; with
L=3 and width=prev_dim this is the builder's module for module.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torchvision

ARCHS = ("resnet18_cifar", "resnet18", "resnet50")


def resnet(arch: str, num_classes: int) -> nn.Module:
    """torchvision's ResNet as the builder makes it: `zero_init_residual=True`."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not known; choose one of {ARCHS}")
    name = "resnet18" if arch == "resnet18_cifar" else arch
    net = torchvision.models.__dict__[name](num_classes=num_classes, zero_init_residual=True)
    if arch == "resnet18_cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


class SimSiam(nn.Module):
    """simsiam/builder.py's SimSiam (see the module docstring for the two parameters added)."""

    def __init__(
        self,
        arch: str,
        dim: int = 2048,
        pred_dim: int = 512,
        proj_layers: int = 3,
        proj_hidden: int | None = None,
    ):
        super().__init__()
        self.encoder = resnet(arch, dim)
        prev_dim = self.encoder.fc.weight.shape[1]
        hidden = proj_hidden or prev_dim
        layers, width = [], prev_dim
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(True)]
            width = hidden
        last = self.encoder.fc if width == prev_dim else nn.Linear(width, dim)
        self.encoder.fc = nn.Sequential(*layers, last, nn.BatchNorm1d(dim, affine=False))
        self.encoder.fc[-2].bias.requires_grad = False  # the builder's hack: BN follows it
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )

    def forward(self, x1, x2):
        z1 = self.encoder(x1)  # NxC
        z2 = self.encoder(x2)  # NxC
        p1 = self.predictor(z1)  # NxC
        p2 = self.predictor(z2)  # NxC
        return p1, p2, z1.detach(), z2.detach()


def features(model: nn.Module, x):
    """The pooled backbone features of a SimSiam (this one or builder.py's), NxC: the encoder
    up to its `fc`."""
    e = model.encoder
    x = e.maxpool(e.relu(e.bn1(e.conv1(x))))
    x = e.layer4(e.layer3(e.layer2(e.layer1(x))))
    return torch.flatten(e.avgpool(x), 1)


def loss_fn(p1, p2, z1, z2):
    criterion = nn.CosineSimilarity(dim=1)
    return -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5


def make_optimizer(
    model: nn.Module, init_lr: float, momentum: float, weight_decay: float, fix_pred_lr: bool
):
    """main_simsiam.py's optimizer: with --fix-pred-lr two groups, the predictor's with
    `fix_lr`; without, one group of every parameter (the frozen bias has no gradient, so SGD
    skips it)."""
    if fix_pred_lr:
        optim_params = [
            {"params": model.encoder.parameters(), "fix_lr": False},
            {"params": model.predictor.parameters(), "fix_lr": True},
        ]
    else:
        optim_params = model.parameters()
    return torch.optim.SGD(optim_params, init_lr, momentum=momentum, weight_decay=weight_decay)


def adjust_learning_rate(optimizer, init_lr: float, epoch: int, args) -> None:
    """main_simsiam.py's rule, called at the start of every epoch."""
    cur_lr = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    for param_group in optimizer.param_groups:
        if "fix_lr" in param_group and param_group["fix_lr"]:
            param_group["lr"] = init_lr
        else:
            param_group["lr"] = cur_lr


def train_step(model: SimSiam, optimizer, x1, x2, monitor: bool = False):
    """One step of main_simsiam.py's train(); returns (loss, z std as simsiam_tf logs it).

    The z std (only with `monitor`) is that of view 1's l2-normalised z read through the output
    BN in inference mode, right after that BN saw view 1, which is what simsiam_tf's z_std logs
    (model.SimSiam._project); the official code logs none.
    """
    seen = []
    out_bn = model.encoder.fc[-1]

    def hook(module, inputs, output):
        if not seen:
            h = inputs[0].detach()
            seen.append(
                torch.nn.functional.batch_norm(
                    h, module.running_mean, module.running_var, training=False, eps=module.eps
                )
            )

    handle = out_bn.register_forward_hook(hook) if monitor else None
    p1, p2, z1, z2 = model(x1=x1, x2=x2)
    loss = loss_fn(p1, p2, z1, z2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    z_std = float("nan")
    if handle is not None:
        handle.remove()
        z = torch.nn.functional.normalize(seen[0], dim=1)
        z_std = float(z.std(dim=0, unbiased=False).mean())
    return float(loss.detach()), z_std
