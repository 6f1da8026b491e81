"""Helpers for the labeler tests: small images, crafted zips, a stub embedder, settings."""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from dlforge.common.runtime import Backends
from dlforge.labeler.ingest import IngestLimits
from dlforge.labeler.settings import LabelerSettings
from dlforge.labeler.worker import LabelerDeps, build_deps


def png(seed: int, *, size: int = 24, level: int | None = None) -> bytes:
    """A small PNG with unique content; ``level`` sets its mean brightness (the 'class' signal)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216) if level is None else level
    arr = np.clip(base + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name) if name.endswith("/") else name, data)
    return buf.getvalue()


def zip_with_symlink(link_name: str, target: str, others: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in others.items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo(link_name)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return buf.getvalue()


def lying_zip(name: str, real_size: int, *, declared: int, extra: dict[str, bytes] | None = None) -> bytes:
    """A zip whose entry ``name`` inflates to ``real_size`` zero bytes but whose headers claim ``declared``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, data in (extra or {}).items():
            zf.writestr(n, data)
        zf.writestr(name, b"\0" * real_size)
    data = bytearray(buf.getvalue())
    encoded = name.encode()
    # local file header: signature PK\3\4, uncompressed size at offset 22
    pos = 0
    while (pos := data.find(b"PK\x03\x04", pos)) >= 0:
        n_len = struct.unpack_from("<H", data, pos + 26)[0]
        if bytes(data[pos + 30:pos + 30 + n_len]) == encoded:
            struct.pack_into("<I", data, pos + 22, declared)
        pos += 4
    # central directory header: signature PK\1\2, uncompressed size at offset 24
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
        n_len = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46:pos + 46 + n_len]) == encoded:
            struct.pack_into("<I", data, pos + 24, declared)
        pos += 4
    return bytes(data)


LIMITS = IngestLimits(max_file_bytes=200_000, max_total_bytes=2_000_000, max_entries=200)


class StubStatsEmbedder:
    """TEST STUB, not a real backbone: 8x8 downsampled pixels plus mean brightness.

    Used only where a test is about the loop's logic, not about embedding quality.
    """

    name = "test-stub-stats"

    def prepare(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BILINEAR), dtype=np.uint8)[:, :, None]

    def embed(self, batch: np.ndarray) -> np.ndarray:
        x = batch.reshape(len(batch), -1).astype(np.float32) / 255.0
        mean = x.mean(axis=1, keepdims=True)
        return np.hstack([x - mean, 4.0 * mean, 4.0 * (1 - mean)]).astype(np.float32)


def labeler_settings_for(tmp: Path, **overrides: object) -> LabelerSettings:
    imports = tmp / "imports"
    imports.mkdir(exist_ok=True)
    values: dict[str, object] = {
        "bus": "memory://",
        "objects": f"file://{tmp}/objects",
        "docs": f"sqlite:///{tmp}/docs.db",
        "work_dir": str(tmp / "work"),
        "labeler_import_roots": [str(imports)],
        "labeler_max_file_bytes": LIMITS.max_file_bytes,
        "labeler_max_archive_bytes": LIMITS.max_total_bytes,
        "labeler_max_entries": LIMITS.max_entries,
        "labeler_max_upload_bytes": 5_000_000,
        "poll_seconds": 0.05,
        "retry_base_seconds": 0.01,
        "retry_attempts": 2,
    }
    values.update(overrides)
    return LabelerSettings(**values)  # type: ignore[arg-type]


def two_class_images(n_per_class: int, *, start: int = 0, size: int = 24) -> dict[str, tuple[bytes, str]]:
    """name -> (png bytes, true label): 'bright' and 'dark' cells, clearly separable."""
    out: dict[str, tuple[bytes, str]] = {}
    for i in range(n_per_class):
        out[f"b{start + i:03d}.png"] = (png(1000 + start + i, size=size, level=190), "bright")
        out[f"d{start + i:03d}.png"] = (png(5000 + start + i, size=size, level=60), "dark")
    return out


async def stub_deps(settings: LabelerSettings, backends: Backends) -> LabelerDeps:
    """The labeler's dependencies with the TEST STUB embedder (tests about the loop's logic)."""
    return await build_deps(settings, backends, embedder=StubStatsEmbedder())
