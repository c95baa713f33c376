"""SimSiam on CIFAR-10 with a CIFAR ResNet-18: paper appendix D.

    python tools/train.py --config=configs/cifar10_resnet18.py --workdir=runs/cifar10_r18

Recipe: batch 512, base lr 0.03 (lr = 0.03 x 512/256 = 0.06), SGD momentum 0.9, weight decay
5e-4, cosine decay, 800 epochs; 2-layer 2048-d projector, 512-d predictor bottleneck; MoCo v2
augmentations without blur at 32 px. Paper: 91.8% linear accuracy (appendix D, Figure D.1).
Data: TFDS cifar10 (downloads once; needs the network), or a local copy with train/ and test/
class subfolders: --config.data.source=folder:PATH, or, for the JPEG archive beside this
repository, --config.data.source=archive:../shared/data/cifar10-jpeg.tar.gz
Expected cost on one V100-class GPU: about 25 s per epoch, 6 hours for 800 epochs.
"""

from simsiam_tf.config import default_config


def get_config():
    c = default_config()
    c.model.backbone = "resnet18_cifar"
    c.model.proj_layers = 2
    c.data.source = "tfds:cifar10"
    c.data.image_size = 32
    c.optim.batch_size = 512
    c.optim.base_lr = 0.03
    c.optim.weight_decay = 5e-4
    c.optim.epochs = 800
    c.eval.knn_every_epochs = 10
    return c
