"""SimSiam on CIFAR-10 with a CIFAR ResNet-18: paper appendix D.

    python tools/train.py --config=configs/cifar10_resnet18.py --workdir=runs/cifar10_r18

Recipe: batch 512, base lr 0.03 (lr = 0.03 x 512/256 = 0.06), SGD momentum 0.9, weight decay
5e-4, cosine decay, 800 epochs; 2-layer 2048-d projector, 512-d predictor bottleneck; MoCo v2
augmentations without blur at 32 px. Paper: 91.8% linear accuracy (appendix D, Figure D.1).
Data: TFDS cifar10 (downloads once; needs the network), or a local copy with train/ and test/
class subfolders: --config.data.source=folder:PATH, or, for the JPEG archive beside this
repository, --config.data.source=archive:../shared/data/cifar10-jpeg.tar.gz
Expected cost on one V100-class GPU: about 25 s per epoch, 6 hours for 800 epochs.

Remaining departures from the official code (docs/FIDELITY.md; measured with
tools/measure_departures.py, commands there):
  * none in the schedule: optim.lr_schedule="per_epoch" sets the cosine once per epoch, as
    main_simsiam.py (the per-step cosine would be 0.19% of the peak lr apart at most);
  * colour jitter and grayscale stay float in [0, 1] between ops, where torchvision on PIL
    images rounds down to uint8 after each op: on 500 CIFAR-10 test photos at 32 px, the
    recipe's draws differ by 1.07 grey levels on average (ours 1.05 brighter; max 20, from the
    uint8 HSV of PIL's hue shift); brightness, contrast or saturation alone by at most 1 level;
  * no blur in this recipe, so the blur kernel does not matter here;
  * data order: a fresh seeded permutation every epoch (as the official sampler), not the same
    permutation as torch's generator.
Linear probe (tools/eval_linear.py --protocol=cifar): the paper names no CIFAR protocol, so the
probe is main_lincls.py's plain-SGD path (its optimiser without --lars: momentum 0.9, base lr
0.1 x batch/256, weight decay 0, cosine decay) at batch 256 for 100 epochs, trained on the
frozen features of the un-augmented 32 px images (computed once; deterministic and minutes on
a CPU). `--augment` trains on RandomResizedCrop + flip views as main_lincls.py does.
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
    c.optim.lr_schedule = "per_epoch"
    c.eval.knn_every_epochs = 10
    return c
