"""A picture of the augmented views: N images of the configured source, each beside its two
views as the training pipeline makes them (the same code: `data.pretrain_dataset`, and in
device mode the train step's augmentation stage), with the recipe in the title.

  python tools/show_views.py --config=configs/quickstart.py --out=views.png [--n=8] \
      [--config.aug.extra="RandomSharpness(factor=0.5, value_range=(0, 1))"]

The views are those of the first training batch of a fresh run with this config. The same grid
goes to TensorBoard (WORKDIR/tb/views) when a training run starts.
"""

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

from absl import flags, logging
from ml_collections import config_flags

from simsiam_tf import augment, data, imagecheck, plots
from simsiam_tf import config as config_lib
from simsiam_tf.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py).")
_OUT = flags.DEFINE_string("out", "views.png", "Where to write the PNG.")
_N = flags.DEFINE_integer("n", 8, "How many images.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    config = _CONFIG.value
    config_lib.validate(config)
    if _N.value < 1:
        raise ConfigError(f"--n={_N.value} is invalid: must be a positive integer")
    d = config.data
    source = data.load_source(
        d.source, "train", d.max_examples, config.seed, d.tfds_data_dir or None, d.tfds_download
    )
    if d.check_images:
        source = imagecheck.drop_undecodable(source, d.strict)
    views = data.preview_views(source, config, _N.value)
    recipe = augment.TwoViewRecipe(config.aug, d.image_size, d.photometric)
    title = plots.views_title(recipe.description, f"{source.name} ({d.photometric} mode)")
    plots.views_grid(views["image"], views["view1"], views["view2"], title, _OUT.value)
    logging.info("wrote %s: %d images and their views", _OUT.value, len(views["image"]))


if __name__ == "__main__":
    cli.run(main)
