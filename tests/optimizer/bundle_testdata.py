"""Helpers of the bundle tests: the bundle the worker stored, and altered copies that must be refused."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

from optimizer_testdata import Optimized

from dlforge.common.backends import open_objects

FORMAT_VERSION = 1  # the format these tests were written for (not read from the code under test)


def stored_bundle(optimized: Optimized, to: Path) -> Path:
    objects = open_objects(f"file://{optimized.root}/objects")
    return objects.get_file(optimized.bundle_key, to)



def rewrite(src: Path, dst: Path, *, change: Callable[[str, bytes], bytes | None] = lambda n, d: d,
            add: dict[str, bytes] | None = None) -> Path:
    """A copy of the zip ``src`` whose members pass through ``change`` (None drops one), plus ``add``."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for name in z.namelist():
            data = change(name, z.read(name))
            if data is not None:
                out.writestr(name, data)
        for name, data in (add or {}).items():
            out.writestr(name, data)
    return dst


def with_manifest(**changes: object) -> Callable[[str, bytes], bytes | None]:
    def change(name: str, data: bytes) -> bytes:
        return json.dumps({**json.loads(data), **changes}).encode() if name == "manifest.json" else data
    return change


def flip_last_byte(target: str) -> Callable[[str, bytes], bytes | None]:
    def change(name: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if name == target else data
    return change


def corrupted(src: Path, dst: Path, *, member: str) -> Path:
    """A byte-for-byte copy of ``src`` with one byte of ``member``'s compressed data flipped (as a bad
    download would): the zip's directory is intact, reading the member fails its CRC or its inflation."""
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = z.getinfo(member)
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.compress_size // 2] ^= 0xFF
    dst.write_bytes(raw)
    return dst


def manifest_bytes(bundle: Path) -> int:
    with zipfile.ZipFile(bundle) as z:
        return len(z.read("manifest.json"))


def altered_bundles(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Bundles that must be refused, and what the refusal must say (shared with the edge tests)."""
    def threshold(name: str, data: bytes) -> bytes:  # the decision moved, the size kept: only the hash tells
        if name != "decision.json":
            return data
        threshold = json.loads(data)["threshold"]
        text = f'"threshold": {threshold}'
        changed = data.replace(text.encode(), (text[:-1] + ("2" if text[-1] == "1" else "1")).encode(), 1)
        assert json.loads(changed)["threshold"] != threshold and len(changed) == len(data)
        return changed

    def longer(name: str, data: bytes) -> bytes:
        return data + b"\n" if name == "spec_check.json" else data

    (tmp / "not-a-zip.zip").write_bytes(b"PK but not really a zip")
    return {
        "threshold": (rewrite(good, tmp / "threshold.zip", change=threshold), "decision.json does not match its "
                      "checksum"),
        "size": (rewrite(good, tmp / "size.zip", change=longer), "spec_check.json is "),
        "model": (rewrite(good, tmp / "model.zip", change=flip_last_byte("model.onnx")),
                  "model.onnx does not match its checksum"),
        "version": (rewrite(good, tmp / "version.zip", change=with_manifest(format_version=FORMAT_VERSION + 1)),
                    f"format version {FORMAT_VERSION + 1}"),
        "format": (rewrite(good, tmp / "format.zip", change=with_manifest(format="something-else")),
                   "not a dlforge bundle"),
        "extra": (rewrite(good, tmp / "extra.zip", add={"run.sh": b"rm -rf /"}), "does not list: run.sh"),
        "missing": (rewrite(good, tmp / "missing.zip", change=lambda n, d: None if n == "spec.json" else d),
                    "missing"),
        "outside": (rewrite(good, tmp / "outside.zip", add={"../evil.json": b"{}"}), "outside the bundle"),
        "not_zip": (tmp / "not-a-zip.zip", "not a readable zip"),
        "damaged": (corrupted(good, tmp / "damaged.zip", member="model.onnx"),
                    "model.onnx cannot be read from the zip"),
        "damaged_manifest": (corrupted(good, tmp / "damaged-manifest.zip", member="manifest.json"),
                             "manifest.json cannot be read from the zip"),
        # valid JSON (the good manifest and 2 MiB of blanks), but over 1 MiB: a zip bomb is not inflated
        "manifest_size": (rewrite(good, tmp / "manifest-size.zip",
                                  change=lambda n, d: d + b" " * 2**21 if n == "manifest.json" else d),
                          f"manifest.json is {2**21 + manifest_bytes(good)} bytes, over the limit of 1048576 bytes"),
    }
