"""Official-layout PyTorch checkpoints for tests/test_import_torch.py, made with torchvision.

Run in its own process (torchvision imported after TensorFlow crashes the interpreter):

  python tests/official_torch.py make --out=C.pth.tar --layout=pretraining --arch=resnet18 \
      [--epoch=3 --dim=128 --pred_dim=32 --proj_layers=3 --cifar --seed=0 \
       --optimizer=full|empty|missing]
  python tests/official_torch.py embed --out=C.pth.tar ...same model flags... \
      --pixels=X.npy --result=Y.npz

`make` writes the checkpoint as facebookresearch/simsiam does (main_simsiam.py: `epoch`, `arch`,
`state_dict` of the DistributedDataParallel model, `optimizer` after one SGD step with the
--fix-pred-lr param groups; main_lincls.py: a torchvision ResNet, `fc` the classifier), with
random weights and BatchNorm statistics, plus C.pth.tar.ref.npz with some momentum buffers.
`embed` reloads the checkpoint into a fresh model and writes, for float [0, 1] NHWC pixels,
the backbone's output in eval mode (`embedding`) and, for pretraining, the projector's (`z`).
Never imports TensorFlow.
"""

import argparse

import numpy as np
import torch
import torchvision
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class OfficialSimSiam(nn.Module):
    """simsiam/builder.py, the projector's depth a parameter (3 in builder.py; the CIFAR recipe's
    2 drops the middle [Linear, BN, ReLU]), and the CIFAR ResNet stem as an option."""

    def __init__(self, base_encoder, dim=2048, pred_dim=512, proj_layers=3, cifar=False):
        super().__init__()
        self.encoder = base_encoder(num_classes=dim, zero_init_residual=True)
        if cifar:  # 3x3 stride-1 stem, no max-pool
            self.encoder.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.encoder.maxpool = nn.Identity()
        prev_dim = self.encoder.fc.weight.shape[1]
        self.encoder.fc.bias.requires_grad = False  # not used: followed by BN
        hidden = []
        for _ in range(proj_layers - 1):
            hidden += [nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim)]
            hidden += [nn.ReLU(inplace=True)]
        self.encoder.fc = nn.Sequential(*hidden, self.encoder.fc, nn.BatchNorm1d(dim, affine=False))
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )


def build(args) -> nn.Module:
    arch = getattr(torchvision.models, args.arch)
    if args.layout == "pretraining":
        return OfficialSimSiam(arch, args.dim, args.pred_dim, args.proj_layers, args.cifar)
    return arch(num_classes=args.num_classes)


def randomise(module, seed):
    """Random weights and BN statistics everywhere (zero-init gammas too), so that a swapped,
    transposed or dropped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.num_batches_tracked.fill_(1234)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0.0, 0.2, generator=gen)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.5, generator=gen)


def make(args):
    torch.manual_seed(args.seed)
    net = build(args)
    if args.layout == "linear_eval":
        randomise(net, args.seed + 1)
        state = {f"module.{k}": v for k, v in net.state_dict().items()}
        torch.save(
            {"epoch": 90, "arch": args.arch, "state_dict": state, "best_acc1": 0.0}, args.out
        )
        np.savez(f"{args.out}.ref.npz", fc_weight=net.fc.weight.detach().numpy())
        return
    optimizer = torch.optim.SGD(
        [
            {"params": net.encoder.parameters(), "fix_lr": False},
            {"params": net.predictor.parameters(), "fix_lr": True},
        ],
        0.05,
        momentum=0.9,
        weight_decay=1e-4,
    )
    x1, x2 = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    z1, z2 = net.encoder(x1), net.encoder(x2)
    p1, p2 = net.predictor(z1), net.predictor(z2)
    cos = nn.CosineSimilarity(dim=1)
    loss = -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) * 0.5
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    randomise(net, args.seed + 1)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    checkpoint = {"epoch": args.epoch, "arch": args.arch, "state_dict": state}
    if args.optimizer != "missing":  # stripped before sharing: `{}` or no key at all
        checkpoint["optimizer"] = optimizer.state_dict() if args.optimizer == "full" else {}
    torch.save(checkpoint, args.out)
    buffers = {p: optimizer.state[p]["momentum_buffer"] for p in optimizer.state}
    np.savez(
        f"{args.out}.ref.npz",
        trainable=sum(p.requires_grad for p in net.parameters()),
        buffers=len(buffers),
        layer2_conv1=buffers[net.encoder.layer2[0].conv1.weight].numpy(),
        predictor_bias=buffers[net.predictor[3].bias].numpy(),
    )


def embed(args):
    net = build(args)
    checkpoint = torch.load(args.out, map_location="cpu", weights_only=True)
    state = {k[len("module.") :]: v for k, v in checkpoint["state_dict"].items()}
    net.load_state_dict(state)
    net.eval()
    encoder = net.encoder if args.layout == "pretraining" else net
    pixels = torch.from_numpy(np.load(args.pixels))
    x = ((pixels - torch.tensor(MEAN)) / torch.tensor(STD)).permute(0, 3, 1, 2).contiguous()
    out = {}
    with torch.no_grad():
        if args.layout == "pretraining":
            out["z"] = encoder(x).numpy()
        encoder.fc = nn.Identity()
        out["embedding"] = encoder(x).numpy()
    np.savez(args.result, **out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("make", "embed"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--layout", choices=("pretraining", "linear_eval"), default="pretraining")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--epoch", type=int, default=3)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--pred_dim", type=int, default=512)
    parser.add_argument("--proj_layers", type=int, default=3)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--cifar", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=("full", "empty", "missing"), default="full")
    parser.add_argument("--pixels")
    parser.add_argument("--result")
    args = parser.parse_args()
    torch.set_num_threads(2)
    make(args) if args.command == "make" else embed(args)


if __name__ == "__main__":
    main()
