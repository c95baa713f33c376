"""The command line: what every command shares, a quiet start and mistakes answered in one line.

The commands are this package's modules (simsiam_tf/cli/train.py, ...), installed as console
scripts (`simsiam-train`, `simsiam-eval-knn`, `simsiam-eval-linear`, `simsiam-plot`,
`simsiam-export`, `simsiam-embed`) and run from a clone as `python tools/train.py`, ... Importing
any of them imports this package first, before TensorFlow; the other tools in tools/ import it
as `import cli` (tools/cli.py), first among their imports, and end with `cli.run(main)`.

* Start-up noise is dropped at its source. TensorFlow's native libraries print INFO lines while
  they load (the oneDNN notice, the CPU-feature notice, absl's "before InitializeLog" line)
  ahead of any log-level setting, so the import runs with the native stderr captured and only
  those known lines are dropped; any other line (a missing CUDA library, an error) is replayed.
  TensorFlow's own Python INFO logs (checkpoint sharding timings, "Assets written") are
  lowered to WARNING; warnings and errors still show.
* A mistake in the flags or the config (a misspelled key, a missing config file, a bad value)
  prints one line that names it and the fix, and exits with 2, before any data is read; so
  does a file system that refuses a write (read-only, no permission, full).
* `--config=quickstart` (or configs/quickstart.py where no such file exists, as outside a
  clone) names a shipped recipe: the package carries configs/.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import logging as py_logging
import os
import re
import sys
from typing import Callable, Iterable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # C++ INFO off; warnings and errors stay
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from simsiam_tf.quiet import STARTUP_NOISE, native_stderr_filtered  # noqa: E402 (no TF import)

with native_stderr_filtered(STARTUP_NOISE):
    import tensorflow as tf  # noqa: E402

from absl import app, flags  # noqa: E402

from simsiam_tf.errors import ConfigError  # noqa: E402


class _LibraryInfoFilter(py_logging.Filter):
    """Drops INFO records that TensorFlow's own modules send through absl (checkpoint sharding
    timings, SavedModel "Assets written"); their warnings and errors pass, as do our logs."""

    _root = os.path.dirname(tf.__file__)

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or not record.pathname.startswith(self._root)


py_logging.getLogger("absl").addFilter(_LibraryInfoFilter())
tf.get_logger().setLevel(py_logging.WARNING)

# What a tool reports as one line (its message already names the problem), exit code 2.
USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, FileExistsError)
EXIT_USAGE = 2


def _keys(d, prefix="") -> Iterable[str]:
    for k, v in d.items():
        if hasattr(v, "items"):
            yield from _keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _config_flag_names() -> list:
    return [name for name, flag in flags.FLAGS.__flags.items() if _is_config_flag(flag)]


def _is_config_flag(flag) -> bool:
    return type(flag).__name__ == "_ConfigFlag"  # ml_collections' config_flags


def _unknown_key_message(argv: list) -> str | None:
    """'unknown config key optim.epoch; did you mean optim.epochs?' for the first override in
    argv that names no key of its config, or None."""
    for name in _config_flag_names():
        config = _config_for_hints(name, argv)
        if config is None:
            continue
        known = set(_keys(config))
        for arg in argv[1:]:
            match = re.match(rf"--{re.escape(name)}\.([^=]+)", arg)
            if not match or match.group(1) in known:
                continue
            key = match.group(1)
            if any(k.startswith(key + ".") for k in known):
                return f"config key {key} is a group; set one of its keys, e.g. --{name}.{key}.x"
            hint = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            fix = f"; did you mean {hint[0]}?" if hint else f"; see the keys in --{name}'s file"
            return f"unknown config key {key}{fix}"
    return None


def _config_for_hints(name: str, argv: list):
    """The config of flag `name`: parsed, or (when parsing stopped before it) loaded from the
    file named in argv; None if neither works."""
    try:
        config = flags.FLAGS[name].value
    except Exception:  # noqa: BLE001 - the file failed to load: reported on its own
        return None
    if config is not None:
        return config
    path = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith(f"--{name}=")), "")
    path = path.split(":", 1)[0]
    if not os.path.isfile(path):
        return None
    try:
        spec = importlib.util.spec_from_file_location(f"_{name}_for_hints", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception:  # noqa: BLE001 - reported by the real parse
        return None


def shipped_configs_dir() -> str:
    """The recipes that come with the package: simsiam_tf/configs in an installed wheel,
    configs/ beside the package in a clone."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (os.path.join(package, "configs"), os.path.join(package, "..", "configs")):
        if os.path.isfile(os.path.join(folder, "quickstart.py")):
            return os.path.normpath(folder)
    return os.path.join(package, "configs")


def with_shipped_configs(argv: list) -> list:
    """argv with each `--config=NAME` that is no file here replaced by the shipped recipe of that
    name (NAME, NAME.py or configs/NAME.py; a `:suffix` is kept)."""
    out = list(argv[:1])
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path, colon, rest = arg[len("--config=") :].partition(":")
            name = os.path.basename(path)
            shipped = os.path.join(
                shipped_configs_dir(), name if name.endswith(".py") else name + ".py"
            )
            if not os.path.exists(path) and os.path.isfile(shipped):
                arg = f"--config={shipped}{colon}{rest}"
        out.append(arg)
    return out


def os_error_message(err: OSError) -> str:
    """One line for an error of the operating system: the path, what failed, what to do. Errors
    the project raises itself carry their own message (no errno) and keep it."""
    if not err.errno:
        return str(err)
    where = f"{err.filename}: " if err.filename else ""
    if err.errno == errno.ENOENT:
        fix = "check the path (relative paths start at the current directory)"
    else:
        fix = "give a path this user can write to, on a writable file system with free space"
    return f"{where}{err.strerror or err}; {fix}"


def _parse(argv: list) -> list:
    """absl's flag parsing, with every failure reduced to one line."""
    try:
        rest = flags.FLAGS(argv)
        for name in _config_flag_names():
            config = flags.FLAGS[name].value  # a config file that failed raises on first use
            if config is not None:
                list(_keys(config))
        return rest
    except (OSError, SyntaxError, ImportError) as err:
        fail(_config_file_message(argv, err))
    except Exception as err:  # noqa: BLE001 - unknown flags or keys, values of the wrong type
        message = _unknown_key_message(argv)
        if message is None:
            message = str(err).splitlines()[0] if isinstance(err, flags.Error) else _clean(err)
        fail(message)
    return []


def _config_file_message(argv: list, err: Exception) -> str:
    for arg in argv[1:]:
        for name in _config_flag_names():
            if arg.startswith(f"--{name}="):
                path = arg.split("=", 1)[1].split(":", 1)[0]
                if not os.path.exists(path):
                    near = _nearby_configs(path)
                    return f"config file {path} does not exist{near}"
                return f"config file {path} could not be loaded: {_clean(err)}"
    return _clean(err)


def _nearby_configs(path: str) -> str:
    folder = os.path.dirname(path)
    if not folder or not os.path.isdir(folder):
        folder = shipped_configs_dir()  # outside a clone: the recipes that come with the package
    found = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
    name = os.path.basename(path)
    name = name if name.endswith(".py") else name + ".py"
    hint = difflib.get_close_matches(name, found, n=1, cutoff=0.8)
    if hint:
        return f"; did you mean {os.path.join(folder, hint[0])}?"
    return f"; {folder} holds {', '.join(found)}" if found else ""


def _clean(err: Exception) -> str:
    """The last line of a (possibly chained) exception, without Python's repr quoting."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().strip("'\"").replace("\\n", " ").replace("\\'", "'")
    return text.splitlines()[-1] if text else type(err).__name__


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Exits with `error: message` as the one line on stderr."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def stop(message: str, code: int) -> None:
    """Exits after a clean stop (Ctrl-C, SIGTERM) with one line on its own line."""
    sys.stdout.flush()
    sys.stderr.write(f"\n{message}\n" if sys.stdout.isatty() else f"{message}\n")
    sys.stderr.flush()
    sys.exit(code)


def run(main: Callable, user_errors: tuple = USER_ERRORS) -> None:
    """app.run(main) with one-line errors: flag and config mistakes, and `user_errors` raised
    by main (exit 2)."""

    def guarded(argv):
        try:
            return main(argv)
        except user_errors as err:
            fail(os_error_message(err) if isinstance(err, OSError) else str(err))
        except OSError as err:  # read-only file system, permission denied, disk full, ...
            fail(os_error_message(err))

    app.run(guarded, argv=with_shipped_configs(sys.argv), flags_parser=_parse)
