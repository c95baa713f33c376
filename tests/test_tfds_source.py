"""simsiam_tf/tfds_source.py: TFDS names and the offline case, each one line, within seconds."""

import time

import pytest

from simsiam_tf import tfds_source
from simsiam_tf.errors import ConfigError


def test_an_unknown_name_is_one_line_naming_the_closest():
    with pytest.raises(ConfigError) as caught:
        tfds_source.tfds_builder_or_error("cifar_10")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("data.source=tfds:cifar_10: TFDS has no such data set; did you mean")
    assert "tfds:cifar10" in message


def test_not_prepared_without_download_names_the_local_sources(tmp_path):
    with pytest.raises(ConfigError, match="not prepared in .* data.tfds_download=False.*folder:"):
        tfds_source.tfds_builder_or_error("mnist", str(tmp_path), download=False)


def test_offline_fails_within_seconds_naming_the_local_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, "TFDS_HOST", "host.invalid")  # never resolves (RFC 6761)
    start = time.time()
    with pytest.raises(ConfigError, match="host.invalid cannot be reached.*offline, use folder:"):
        tfds_source.tfds_builder_or_error("mnist", str(tmp_path), download=True)
    assert time.time() - start < 15
    assert not any(tmp_path.rglob("*.tfrecord*"))  # nothing was downloaded
