"""Checks an export through TensorFlow's C++ loader, the one TF Serving's SavedModel servables wrap.

  python tools/serving_cc_check.py --saved_model=exports/simsiam [photo.jpg ...]
      [--build_dir=DIR] [--atol=1e-6]

Builds serving/cc/serving_check.cc against the installed TensorFlow wheel (its C++ headers,
libtensorflow_framework.so.2 and libtensorflow_cc.so.2; needs g++ or $CXX), loads the export
with `tensorflow::LoadSavedModel(..., {"serve"})` (a base path: its highest version, as TF
Serving's default version policy serves it), replays its warm-up requests, sends each photo as
gRPC PredictRequests to every signature (encoded bytes to serving_bytes, decoded pixels to
serving_default and serving_float) and compares the C++ session's outputs with the Python
loader's. Prints one line per check and exits 1 on the first failure. What this proves and what
it does not: docs/SERVING.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import cli  # noqa: F401  (first: a quiet TensorFlow start-up)

import numpy as np
from absl import flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(REPO, "serving", "cc", "serving_check.cc")
BINARY = "serving_check"


class CheckError(RuntimeError):
    """The C++ check could not be built or run, or the export failed it."""


# ------------------------------------------------------------------------------------------------
# Building.


def compiler() -> Optional[str]:
    """The C++ compiler to use ($CXX, else g++), or None where there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def build_command(cxx: str, output: str) -> list:
    """g++ command line building SOURCE against the installed TensorFlow wheel.

    `--no-as-needed` keeps libtensorflow_cc.so.2 linked although no symbol of the program comes
    from it: loading it registers the DirectSession factory that LoadSavedModel needs.
    """
    import tensorflow as tf

    lib = tf.sysconfig.get_lib()
    return [
        cxx,
        *tf.sysconfig.get_compile_flags(),
        "-O1",  # the work is in TensorFlow's libraries; -O2 only adds compile time
        "-Wno-deprecated-declarations",  # TensorFlow's own headers
        SOURCE,
        "-o",
        output,
        "-Wl,--no-as-needed",
        *tf.sysconfig.get_link_flags(),
        "-l:libtensorflow_cc.so.2",
        f"-Wl,-rpath,{lib}",
    ]


def build(build_dir: str) -> str:
    """Compiles the program into build_dir, or reuses an up-to-date one; returns its path."""
    cxx = compiler()
    if cxx is None:
        raise CheckError(
            f"no C++ compiler: {os.environ.get('CXX', 'g++')} is not on PATH; install g++ or "
            "set CXX"
        )
    os.makedirs(build_dir, exist_ok=True)
    import tensorflow as tf

    output = os.path.join(build_dir, BINARY)
    inputs = (SOURCE, os.path.join(tf.sysconfig.get_lib(), "libtensorflow_framework.so.2"))
    if os.path.exists(output) and all(
        os.path.getmtime(output) >= os.path.getmtime(p) for p in inputs
    ):
        return output
    start = time.monotonic()
    proc = subprocess.run(build_command(cxx, output), capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckError(f"building {SOURCE} failed:\n{proc.stderr[-4000:]}")
    logging.info("Built %s in %.1f s", output, time.monotonic() - start)
    return output


# ------------------------------------------------------------------------------------------------
# Requests and responses: tensorflow_serving protos, as a gRPC client sends them.


def predict_request(
    signature: str, inputs: dict, output_filter: Sequence[str] = (), model_name: str = "simsiam"
) -> bytes:
    """A serialized PredictRequest: {input key: array} as TensorProtos (strings: object arrays)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        value = np.asarray(value)
        dtype = tf.string if value.dtype == object else None  # also when empty
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    request.output_filter.extend(output_filter)
    return request.SerializeToString()


def read_response(path: str) -> tuple[dict, dict]:
    """A PredictResponse file -> ({output key: array}, its model_spec as a dict)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    with open(path, "rb") as f:
        response = predict_pb2.PredictResponse.FromString(f.read())
    spec = response.model_spec
    model_spec = {
        "signature_name": spec.signature_name,
        "version": spec.version.value if spec.HasField("version") else None,
    }
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}, model_spec


@dataclasses.dataclass
class Run:
    """What one run of the program reported (its stdout lines, parsed)."""

    returncode: int
    model: dict  # {"model": dir, "version": N, "signatures": {...}} or the load error
    warmup: list  # warm-up lines, per record and per file, in order
    responses: dict  # request name -> {"ok": True, "outputs": {key: array}, ...} or the error
    stderr: str


def run(
    binary: str,
    model_path: str,
    requests: Optional[dict] = None,
    warmup: bool = False,
    warmup_files: Sequence[str] = (),
    timeout: float = 600,
) -> Run:
    """Runs the program: loads model_path, replays the warm-up files, sends `requests`
    ({name: serialized PredictRequest}) in order. Raises CheckError if the process crashed or
    left a request unanswered."""
    requests = requests or {}
    workdir = tempfile.mkdtemp(prefix="serving_cc_")
    try:
        paths = {}
        for i, (name, request) in enumerate(requests.items()):
            paths[name] = os.path.join(workdir, f"request{i:04d}.pb")
            with open(paths[name], "wb") as f:
                f.write(request)
        cmd = [binary, model_path, *(["--warmup"] if warmup else [])]
        cmd += [f"--warmup_file={p}" for p in warmup_files] + list(paths.values())
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode < 0 or proc.returncode > 2:
            raise CheckError(
                f"{binary} crashed (exit status {proc.returncode}) on {model_path}:\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            )
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        by_path = {line["request"]: line for line in lines if "request" in line}
        responses = {}
        for name, path in paths.items():
            if path not in by_path and proc.returncode != 2:
                raise CheckError(
                    f"{binary} left request {name!r} unanswered:\n{proc.stderr[-3000:]}"
                )
            line = by_path.get(path, {"ok": False, "error": "model not loaded"})
            if line["ok"]:
                line["outputs"], line["model_spec"] = read_response(line["response"])
            responses[name] = line
        return Run(
            returncode=proc.returncode,
            model=lines[0] if lines else {},
            warmup=[line for line in lines if "warmup_file" in line],
            responses=responses,
            stderr=proc.stderr,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The check of an export on photos, against the Python loader.


def photo_requests(files: Sequence[str], signatures: dict) -> tuple[dict, dict]:
    """The requests TF Serving would get for these photos: all of them encoded to every
    bytes signature, each one decoded to every pixel signature. Returns ({name: serialized
    request}, {name: (signature, inputs)}). `signatures`: {name: (input key, numpy dtype)}."""
    import tensorflow as tf

    encoded = []
    for path in files:
        with open(path, "rb") as f:
            encoded.append(f.read())
    cases = {}
    for signature, (key, dtype) in sorted(signatures.items()):
        if np.dtype(dtype) == np.dtype(object):  # tf.string: encoded images
            cases[f"{signature}/all"] = (signature, {key: np.array(encoded, object)})
            continue
        for i, (path, data) in enumerate(zip(files, encoded)):
            pixels = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
            cases[f"{signature}/{i}/{path}"] = (
                signature,
                {key: pixels[None].astype(dtype)},
            )
    requests = {name: predict_request(sig, inputs) for name, (sig, inputs) in cases.items()}
    return requests, cases


def python_outputs(loaded, signature: str, inputs: dict) -> dict:
    """The Python loader's answer to a request."""
    import tensorflow as tf

    out = loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def python_signatures(loaded) -> dict:
    """{signature: (input key, numpy dtype)} of a loaded SavedModel's one-input signatures."""
    out = {}
    for name, fn in loaded.signatures.items():
        [(key, spec)] = fn.structured_input_signature[1].items()
        out[name] = (key, spec.dtype.as_numpy_dtype)
    return out


def check(binary: str, saved_model: str, files: Sequence[str], atol: float) -> list:
    """Runs the whole check; returns the report lines, raises CheckError at a failure."""
    import tensorflow as tf

    from simsiam_tf import export

    versions = export.versions(saved_model)
    path = os.path.join(saved_model, str(versions[-1])) if versions else saved_model
    loaded = tf.saved_model.load(path)
    signatures = python_signatures(loaded)
    requests, cases = photo_requests(files, signatures)
    result = run(binary, saved_model, requests, warmup=True)
    if result.returncode == 2:
        raise CheckError(f"the C++ loader did not load {saved_model}: {result.model}")
    lines = [f"loaded {result.model['model']} (version {result.model['version']})"]
    described = {name: sorted(sig["inputs"]) for name, sig in result.model["signatures"].items()}
    if described != {name: [key] for name, (key, _) in signatures.items()}:
        raise CheckError(f"C++ SignatureDefs {described} differ from Python's {signatures}")
    summary = result.warmup[-1] if result.warmup else {"ok": False, "error": "no warm-up file"}
    if not summary["ok"]:
        raise CheckError(f"warm-up failed: {summary}")
    lines.append(f"warm-up: {summary['records']} records replayed")
    worst = 0.0
    for name, (signature, inputs) in cases.items():
        got = result.responses[name]
        if not got["ok"]:
            raise CheckError(f"{name}: refused by the C++ session: {got['error']}")
        want = python_outputs(loaded, signature, inputs)
        if set(got["outputs"]) != set(want):
            raise CheckError(f"{name}: outputs {sorted(got['outputs'])} != {sorted(want)}")
        err = max(float(np.max(np.abs(got["outputs"][k] - want[k]))) for k in want)
        worst = max(worst, err)
        if err > atol:
            raise CheckError(f"{name}: C++ and Python outputs differ by {err:.3g} (atol {atol})")
    lines.append(f"{len(cases)} requests: max |C++ - Python| = {worst:.3g} (atol {atol})")
    return lines


def define_flags() -> None:
    """The command line (defined only when run as a script, so tests can import this file)."""
    flags.DEFINE_string(
        "saved_model", None, "An export: a model's base path (its highest version) or a version."
    )
    flags.DEFINE_string(
        "build_dir",
        None,
        "Where to build the program (reused while up to date); default: a temp dir.",
    )
    flags.DEFINE_float("atol", 1e-6, "Largest allowed |C++ - Python| of any output value.")
    flags.mark_flag_as_required("saved_model")


def main(argv):
    f = flags.FLAGS
    files = argv[1:]
    for path in files:
        if not os.path.isfile(path):
            sys.exit(f"error: {path}: no such photo file")
    if not os.path.isdir(f.saved_model):
        sys.exit(f"error: --saved_model={f.saved_model}: no such directory")
    build_dir = f.build_dir or tempfile.mkdtemp(prefix="serving_cc_build_")
    try:
        binary = build(build_dir)
        for line in check(binary, f.saved_model, files, f.atol):
            print(line)
    except CheckError as err:
        sys.exit(f"error: {err}")
    finally:
        if not f.build_dir:
            shutil.rmtree(build_dir, ignore_errors=True)
    print("OK")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
