"""SimSiam on ImageNet with ResNet-50: the paper's main recipe (section 4, appendix A).

    python tools/train.py --config=configs/imagenet_resnet50.py --workdir=runs/in1k_r50

Recipe: batch 512, base lr 0.05 (lr = 0.05 x 512/256 = 0.1), SGD momentum 0.9, weight decay
1e-4, cosine decay, 100 epochs, fix_pred_lr; 3-layer 2048-d projector, 512-d predictor
bottleneck; synchronised BN across replicas; MoCo v2 augmentations at 224 px. Paper: 68.1%
linear accuracy after 100 epochs (Table 4). Data: TFDS imagenet2012, which needs the ImageNet
archives placed by hand (see TFDS's imagenet2012 page), or an image folder:
    --config.data.source=folder:PATH   (PATH with train/ and val/ class subfolders,
    and --config.eval.query_split=val).
Photometric augmentation on the GPU keeps 8 GPUs fed from far fewer cores: set
    --config.data.photometric=device.
"""

from simsiam_tf.config import default_config


def get_config():
    c = default_config()
    c.model.backbone = "resnet50"
    c.model.proj_layers = 3
    c.model.sync_bn = True
    c.data.source = "tfds:imagenet2012"
    c.data.tfds_download = False
    c.data.image_size = 224
    c.data.eval_crop_fraction = 0.875
    c.aug.blur_prob = 0.5
    c.optim.batch_size = 512
    c.optim.base_lr = 0.05
    c.optim.weight_decay = 1e-4
    c.optim.epochs = 100
    c.optim.fix_pred_lr = True
    c.eval.query_split = "validation"
    c.eval.knn_every_epochs = 0
    return c
