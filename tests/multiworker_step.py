"""One process of the multi-worker test: trains a BN-free SimSiam a few steps under the strategy
TF_CONFIG selects (none: a single process) and saves its final weights.

    multiworker_step.py OUT.npz REPO [FOLDER]

With FOLDER, the images come from that image folder, each worker reading and decoding only its
rows of every global batch; the number of images this process decoded is printed."""

import sys

import numpy as np

sys.path.insert(0, sys.argv[2])

import tensorflow as tf  # noqa: E402

from simsiam_tf import data, distribute, optim  # noqa: E402
from simsiam_tf.config import default_config  # noqa: E402
from tests.helpers import bn_free_simsiam  # noqa: E402

GLOBAL_BATCH, STEPS = 32, 3


def main(out_path, folder=None):
    strategy = distribute.make_strategy()
    c = default_config()
    c.data.image_size = 8
    c.optim.weight_decay = 1e-3
    c.optim.epochs = 1
    decoded = tf.Variable(0, dtype=tf.int64, trainable=False)
    if folder:
        source = data.load_source(f"folder:{folder}", "train")
        decode = data.decode_rgb

        def counted(encoded, *args, **kwargs):  # every decode of the pipeline, counted
            decoded.assign_add(1)
            return decode(encoded, *args, **kwargs)

        data.decode_rgb = counted
    else:
        source = data.load_source("builtin:digits", "train")
    with strategy.scope():
        net = bn_free_simsiam(seed=5)
        net(np.zeros((1, 8, 8, 3), np.float32))
        net.compile(optimizer=optim.build_optimizer(c.optim, GLOBAL_BATCH, STEPS))
        net.optimizer.build(net.trainable_variables)

    def make(shard):
        return data.pretrain_dataset(
            source, c.data, c.aug, GLOBAL_BATCH, 0, 0, 1, STEPS, shard=shard
        )

    ds = distribute.distribute_batches(strategy, make, GLOBAL_BATCH, per_worker=bool(folder))
    history = net.fit(ds, epochs=1, steps_per_epoch=STEPS, verbose=0)
    weights = {f"w{i:03d}": v.numpy() for i, v in enumerate(net.trainable_variables)}
    np.savez(out_path, loss=history.history["loss"][-1], **weights)
    print("workers", distribute.num_workers(strategy), "chief", distribute.is_chief(strategy))
    print("decoded", int(decoded.numpy()))


if __name__ == "__main__":
    main(*sys.argv[1:2], *sys.argv[3:4])
