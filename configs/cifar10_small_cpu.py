"""SimSiam on a 10,000-image CIFAR-10 subset with a small CNN: the CPU budget of docs/RESULTS.md.

    python tools/train.py --config=configs/cifar10_small_cpu.py --workdir=runs/c10_small

Data: the CIFAR-10 JPEGs (train/ and test/ class subfolders) in the archive
`../shared/data/cifar10-jpeg.tar.gz` (relative to the repository root, where the tools run),
unpacked once into the cache by the `archive:` source. Elsewhere, point it at a copy:
`--config.data.source=archive:PATH.tar.gz`, `folder:PATH` (an unpacked folder) or
`tfds:cifar10` (TFDS downloads the original PNG release; figures then differ slightly, since
the JPEG copy is a re-encoding). Measured (docs/RESULTS.md):
the kNN top-1 (k=200, T=0.1, bank = the same 10,000 training images, queries = the 10,000 test
images) dips below the network's random-initialisation score (32.2%) in epoch 1, crosses it in
epoch 2 and is 5.5 points above it after 13 of the 20 epochs (37.7%; linear probe 46.3%), at
100-240 s per epoch on a 2-core CPU (the spread follows the
machine's load; docs/RESULTS.md). Not a paper number.

Departures from the paper's CIFAR recipe (appendix D, `configs/cifar10_resnet18.py`), all to
fit a 2-core CPU:
  * backbone `cnn_small` (6 convs, width 32, 256-d features) instead of the CIFAR ResNet-18
    (34 M multiply-adds per 32x32 image against 0.56 G: about 16x cheaper);
  * projector 2 x 512 and predictor bottleneck 128 instead of 2048 / 512;
  * a seeded 10,000-image subset of the 50,000 training images (`data.max_examples`);
  * batch 64 instead of 512, base lr 0.06 (lr = 0.06 x 64/256 = 0.015) instead of 0.03, so
    that a few epochs move the network; 1 warm-up epoch; 20 epochs instead of 800;
  * the kNN bank is the 10,000-image training subset (`eval.max_bank`), scored every epoch.
Augmentations, weight decay (5e-4), momentum, the cosine schedule, the loss and the
stop-gradient are the paper's, with the departures from the official code measured for
`configs/cifar10_resnet18.py` (docs/FIDELITY.md): colour ops in float (1.07 grey levels mean
difference from torchvision on PIL at 32 px, max 20) and the cosine per step (here with the
warm-up epoch, whose lr starts at 0: the sum of the lr over the run is 4.8% below the official
per-epoch cosine without warm-up). Linear probe: the `cifar` protocol (see that config).
"""

from simsiam_tf.config import default_config


def get_config():
    c = default_config()
    c.model.backbone = "cnn_small"
    c.model.width = 32
    c.model.proj_layers = 2
    c.model.proj_dim = 512
    c.model.proj_hidden = 512
    c.model.pred_hidden = 128
    c.data.source = "archive:../shared/data/cifar10-jpeg.tar.gz"
    c.data.max_examples = 10_000
    c.data.image_size = 32
    c.optim.batch_size = 64
    c.optim.base_lr = 0.06
    c.optim.weight_decay = 5e-4
    c.optim.warmup_epochs = 1.0
    c.optim.epochs = 20
    c.eval.knn_every_epochs = 1
    c.eval.knn_k = 200
    c.eval.knn_t = 0.1
    c.eval.max_bank = 10_000
    c.eval.max_queries = 0
    return c
