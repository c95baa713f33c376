"""Quickstart: SimSiam on scikit-learn's handwritten digits, offline, in a few CPU minutes.

    make quickstart     (= python tools/train.py --config=configs/quickstart.py --workdir=runs/quickstart)

Not a paper recipe: it shows the whole loop (two-view pipeline, stop-gradient train step,
checkpoints, kNN against the same network at random initialisation) end to end on data that
ships with a pinned package. Departures from the CIFAR recipe, all for the tiny 8x8 grey digits
and a 2-core budget:
  * backbone cnn_small (6 convs) and a 512-d projector / 128-d predictor bottleneck instead of
    ResNet-18 and 2048/512;
  * no flips (a mirrored digit is another symbol), milder crops (scale 0.5-1), no hue/saturation
    jitter (the images are grey);
  * batch 128, base lr 0.06 with 1 warm-up epoch, 30 epochs.
On digits a randomly initialised CNN already scores about 95% kNN: the run's health shows in
z_std_ratio (about 1 healthy, 0 collapsed) and the falling loss; the evidence that SimSiam learns
is on real photos (docs/RESULTS.md). Departures from the official code that remain in any
recipe (cosine per step, colour ops in float) are measured in docs/FIDELITY.md.
"""

from simsiam_tf.config import default_config


def get_config():
    c = default_config()
    c.model.backbone = "cnn_small"
    c.model.width = 32
    c.model.proj_dim = 512
    c.model.proj_hidden = 512
    c.model.pred_hidden = 128
    c.data.source = "builtin:digits"
    c.data.image_size = 32
    c.aug.crop_scale = (0.5, 1.0)
    c.aug.flip_prob = 0.0
    c.aug.saturation = 0.0
    c.aug.hue = 0.0
    c.optim.batch_size = 128
    c.optim.base_lr = 0.06
    c.optim.warmup_epochs = 1.0
    c.optim.epochs = 30
    c.eval.knn_every_epochs = 5
    c.eval.knn_k = 20
    return c
