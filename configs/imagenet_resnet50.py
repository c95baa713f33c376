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

Remaining departures from the official code (docs/FIDELITY.md; measured with
tools/measure_departures.py, commands there):
  * none in the schedule: optim.lr_schedule="per_epoch" sets the cosine once per epoch, as
    main_simsiam.py (the per-step cosine would be 1.57% of the peak lr apart at most);
  * the blur is an exact Gaussian truncated at 6 px with mirrored edges; PIL's
    ImageFilter.GaussianBlur (simsiam/loader.py) chains box blurs: on 100 real photos at 224 px,
    sigma 0.5-2, at most 3-5 grey levels apart (mean 0.30-0.44) away from the 6-px border and up
    to 43 levels at the border, where the two treat the image edge differently; equal at
    sigma 0.1;
  * colour jitter and grayscale stay float in [0, 1] between ops, where torchvision on PIL
    images rounds down to uint8 after each op: on the same photos the recipe's draws differ by
    1.09 grey levels on average (ours 1.06 brighter; max 18, from the uint8 HSV of PIL's hue
    shift); brightness, contrast or saturation alone by at most 1 level;
  * data order: TFDS imagenet2012 is streamed: shard files in a per-epoch seeded order, then a
    shuffle buffer of `data.shuffle_buffer` = 10,000 examples seeded per epoch, where the
    official sampler permutes all 1.28 M images every epoch; an image folder
    (`data.source=folder:...`) is fully permuted every epoch, as the official code.
Linear evaluation (tools/eval_linear.py --protocol=imagenet) is main_lincls.py --lars: apex LARC
on the weight and the bias (`--lars_rule=mocov3` exempts the bias), with the same per-step
against per-epoch cosine (312 steps x 90 epochs: at most 1.74% of the peak lr apart).
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
    c.optim.lr_schedule = "per_epoch"
    c.optim.fix_pred_lr = True
    c.eval.query_split = "validation"
    c.eval.knn_every_epochs = 0
    return c
