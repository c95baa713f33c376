"""Writes serving/batching_parameters.txt, TF Serving's batching parameters for the shipped
recipes, from their default export limits (export.shipped_batching_text).

  python tools/batching_parameters.py            # prints it
  python tools/batching_parameters.py --write    # writes serving/batching_parameters.txt
  python tools/batching_parameters.py --check    # exit status 1 if the shipped file differs

Every export also writes its own, for its own limits, in assets.extra/batching_parameters.txt.
"""

import glob
import importlib.util
import os
import sys

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

from absl import flags

from simsiam_tf import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "serving", "batching_parameters.txt")

_WRITE = flags.DEFINE_boolean("write", False, f"Write {os.path.relpath(SHIPPED, REPO)}.")
_CHECK = flags.DEFINE_boolean("check", False, "Fail if the shipped file is not what is generated.")


def recipes() -> dict:
    """{recipe name: image_size} of every config in configs/."""
    out = {}
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(f"_recipe_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out[name] = int(module.get_config().data.image_size)
    return out


def generated() -> str:
    return export.shipped_batching_text(recipes())


def main(argv):
    del argv
    text = generated()
    if _CHECK.value:
        with open(SHIPPED) as f:
            if f.read() != text:
                sys.exit(f"error: {SHIPPED} differs from the generated file; run with --write")
        return
    if _WRITE.value:
        with open(SHIPPED, "w") as f:
            f.write(text)
        print(SHIPPED)
        return
    sys.stdout.write(text)


if __name__ == "__main__":
    cli.run(main)
