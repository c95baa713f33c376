"""Embeds an image folder with an exported SavedModel; answers nearest-neighbour queries.

  # embed every image under photos/ (any depth) -> index/photos.npy + index/photos.csv
  python tools/embed.py --saved_model=exports/simsiam --image_dir=photos --index=index/photos
  # the k most similar images of the index to a query image, by cosine similarity
  python tools/embed.py --saved_model=exports/simsiam --index=index/photos --query=q.jpg --k=5

--saved_model is a version directory or a model's base path (its highest version is used).
Images go through the export's `serving_bytes` signature, the path TF Serving clients take;
GIF and BMP files, which it refuses, are converted to PNG first. A file that cannot be read or
that the model refuses (corrupt, truncated, too large, too elongated) is skipped with a warning
naming it and the reason, and left out of the index; the rest of the folder is embedded.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from typing import Optional, Sequence

import numpy as np
from absl import flags, logging

from simsiam_tf import cli, export


def list_images(root: str) -> list:
    """Image files under root (any depth), sorted, as paths relative to root."""
    from simsiam_tf import data

    if not os.path.isdir(root):
        raise FileNotFoundError(f"--image_dir={root}: no such directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            os.path.relpath(os.path.join(dirpath, f), root)
            for f in sorted(filenames)
            if f.lower().endswith(data.IMAGE_EXTENSIONS)
        ]
    return found


def resolve_saved_model(path: str) -> str:
    """A version directory as is; a model's base path -> its highest version."""
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    found = export.versions(path)
    if not found:
        raise FileNotFoundError(f"--saved_model={path}: neither a SavedModel nor a base path")
    return os.path.join(path, str(found[-1]))


def load(path: str):
    """The `serving_bytes` function of the SavedModel at path (a version or a base path)."""
    import tensorflow as tf

    path = resolve_saved_model(path)
    logging.info("Loading %s", path)
    return tf.saved_model.load(path).signatures[export.SERVING_BYTES]


def max_batch(path: str) -> Optional[int]:
    """The largest batch the export at path accepts (its metadata), None when not recorded."""
    meta = os.path.join(resolve_saved_model(path), "assets.extra", export.METADATA_FILE)
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        return json.load(f).get("max_batch")


def as_accepted_bytes(encoded: bytes) -> bytes:
    """JPEG and PNG bytes as they are; other formats (GIF first frame, BMP) re-encoded as PNG."""
    if encoded.startswith((export.JPEG_MAGIC, export.PNG_MAGIC)):
        return encoded
    import tensorflow as tf

    from simsiam_tf import data

    return tf.io.encode_png(data.decode_rgb(encoded)).numpy()


def embed_files(
    signature,
    paths: Sequence[str],
    batch_size: int = 64,
    output_key: str = export.EMBEDDING,
    progress: bool = True,
) -> tuple[np.ndarray, list]:
    """Embeddings [n, C] of the files the model accepts, and those files' paths."""
    import keras
    import tensorflow as tf

    def run(batch):
        return signature(**{export.IMAGE_BYTES: tf.constant(batch)})[output_key].numpy()

    bar = keras.utils.Progbar(len(paths), unit_name="image") if progress else None
    rows, kept = [], []
    for start in range(0, len(paths), batch_size):
        chunk, encoded = [], []
        for path in paths[start : start + batch_size]:
            try:
                with open(path, "rb") as f:
                    encoded.append(as_accepted_bytes(f.read()))
                chunk.append(path)
            except (OSError, tf.errors.OpError) as err:  # unreadable, or a GIF/BMP that fails
                logging.warning("Skipped %s: %s", path, skip_reason(_message(err)))
        try:
            if chunk:
                rows.append(run(encoded))
                kept += chunk
        except tf.errors.InvalidArgumentError:
            # One bad file fails its whole batch: redo it one by one to keep the others.
            for path, e in zip(chunk, encoded):
                try:
                    rows.append(run([e]))
                    kept.append(path)
                except tf.errors.OpError as err:
                    logging.warning("Skipped %s: %s", path, skip_reason(_message(err)))
        if bar is not None:
            bar.add(len(paths[start : start + batch_size]))
    dim = rows[0].shape[-1] if rows else 0
    return (np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)), kept


def _message(err: Exception) -> str:
    return getattr(err, "message", None) or str(err)


# TensorFlow's annotations of an op error: the graph node and function that raised it.
# Graph nodes, and an eager op's "[Op:Name] name: ..." suffix.
_GRAPH_NOTES = re.compile(
    r"\[\[\{\{.*?\}\}\]\]|\{\{(function_)?node [^}]*\}\}|\[Op:[^\]]*\]( name:\s*\S*)?"
)

# The traceback of the Python code that defined the failing op, which graph errors carry.
_TRACE_LINE = re.compile(r"Graph execution error|Detected at node|File \"")


def skip_reason(message: str) -> str:
    """Why a file was refused, from an op error's message: the assertion's or the decoder's own
    words ("corrupt or truncated JPEG data: ...", "Unknown image file format. ..."), without the
    graph nodes TensorFlow appends, nor the request index of a one-file batch."""
    lines = [_GRAPH_NOTES.sub("", line).strip() for line in message.strip().splitlines()]
    lines = [x for x in lines if x and not _TRACE_LINE.match(x)] or ["refused by the model"]
    line = next((x for x in lines if "assertion failed" in x), lines[-1])
    match = re.search(r"assertion failed: \[(.*?)\]?$", line)
    return match.group(1) if match else line


def write_index(prefix: str, embeddings: np.ndarray, names: Sequence[str]) -> None:
    """PREFIX.npy (float32 [n, C]) and PREFIX.csv (index,file), row i of one = row i of other."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    np.save(prefix + ".npy", embeddings.astype(np.float32))
    with open(prefix + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "file"])
        writer.writerows(enumerate(names))


def read_index(prefix: str) -> tuple[np.ndarray, list]:
    embeddings = np.load(prefix + ".npy")
    with open(prefix + ".csv", newline="") as f:
        names = [row["file"] for row in csv.DictReader(f)]
    if len(names) != len(embeddings):
        raise ValueError(f"{prefix}.csv has {len(names)} rows, {prefix}.npy {len(embeddings)}")
    return embeddings, names


def nearest(embeddings: np.ndarray, query: np.ndarray, k: int) -> list:
    """The k rows of embeddings most cosine-similar to query: [(row, cosine)], best first."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    sims = unit(embeddings) @ unit(query)
    order = np.argsort(-sims, kind="stable")[:k]
    return [(int(i), float(sims[i])) for i in order]


def define_flags() -> None:
    """The command line (defined only when run as a script, so tests can import this file)."""
    flags.DEFINE_string("saved_model", None, "Exported version directory, or the base path.")
    flags.DEFINE_string("image_dir", None, "Folder of images to embed (searched recursively).")
    flags.DEFINE_string("index", None, "Prefix of the index files PREFIX.npy and PREFIX.csv.")
    flags.DEFINE_string("query", None, "Image whose nearest neighbours in the index to print.")
    flags.DEFINE_integer("k", 5, "Number of neighbours to print.")
    flags.DEFINE_integer("batch_size", 64, "Images per call of the model.")
    flags.DEFINE_enum(
        "output_key",
        export.EMBEDDING,
        (export.EMBEDDING, export.EMBEDDING_NORMALIZED, export.PROJECTION),
        "Which output of the model to index.",
    )
    flags.mark_flags_as_required(["saved_model", "index"])


def run(
    saved_model: str,
    index: str,
    image_dir: Optional[str] = None,
    query: Optional[str] = None,
    k: int = 5,
    batch_size: int = 64,
    output_key: str = export.EMBEDDING,
) -> list:
    """The tool: embeds image_dir into the index (when given), then answers the query (when
    given); returns the neighbours [(file, cosine)]."""
    if image_dir is None and query is None:
        raise ValueError("nothing to do: give --image_dir to build the index, --query to search it")
    if k < 1 or batch_size < 1:
        raise ValueError(f"--k={k} and --batch_size={batch_size} must be at least 1")
    signature = load(saved_model)
    batch_size = min(batch_size, max_batch(saved_model) or batch_size)
    if image_dir is not None:
        names = list_images(image_dir)
        if not names:
            raise FileNotFoundError(f"--image_dir={image_dir}: no image files found")
        paths = [os.path.join(image_dir, n) for n in names]
        embeddings, kept = embed_files(signature, paths, batch_size, output_key)
        kept_names = [os.path.relpath(p, image_dir) for p in kept]
        write_index(index, embeddings, kept_names)
        print(f"{len(kept_names)} of {len(names)} images embedded -> {index}.npy, {index}.csv")
    if query is None:
        return []
    embeddings, names = read_index(index)
    q, kept = embed_files(signature, [query], output_key=output_key, progress=False)
    if not kept:
        raise ValueError(f"--query={query}: the model refused this image (see the warning)")
    neighbours = [(names[i], sim) for i, sim in nearest(embeddings, q[0], k)]
    print(f"{len(neighbours)} nearest to {query} (cosine similarity):")
    for rank, (name, sim) in enumerate(neighbours, 1):
        print(f"{rank}\t{sim:.4f}\t{name}")
    return neighbours


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        run(f.saved_model, f.index, f.image_dir, f.query, f.k, f.batch_size, f.output_key)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


def run_command() -> None:
    """The `simsiam-embed` command (tools/embed.py)."""
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run_command()
