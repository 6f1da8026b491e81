"""Reading a dlforge model bundle: its manifest checked, every file's checksum verified, then its contents.

The format is dlforge's (``dlforge.optimizer.bundle``), read here without dlforge: a zip with
``manifest.json`` (``format``, ``format_version``, ``producer``, and per file its ``sha256`` and
``bytes``), ``model.onnx``, ``preprocessing.json``, ``classes.json``, ``decision.json``, ``spec.json``
and ``spec_check.json``. A bundle of another format version, with a file that does not match its
checksum, with a file missing or one the manifest does not list, or whose preprocessing cannot make a finite
network input (a std that is 0, negative or not finite, an input size that is not a whole number above 0, a
mean or std that is not one finite number per channel) is refused with :class:`BundleError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "dlforge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
REQUIRED = (MODEL, "preprocessing.json", "classes.json", "decision.json", "spec.json", "spec_check.json")
MAX_MEMBER_BYTES = 2 * 2**30
MAX_MANIFEST_BYTES = 2**20  # the manifest is read whole before anything is checked: a larger one is refused


class BundleError(ValueError):
    """The bundle must not be used; the message says why."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input: ``(pixel / divide_by - mean[c]) / std[c]``, NCHW float32."""

    colour_mode: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    divide_by: float
    resize: str

    @property
    def channels(self) -> int:
        return 1 if self.colour_mode == "L" else 3


@dataclass(frozen=True)
class Bundle:
    """A verified bundle's contents."""

    path: Path
    manifest: dict[str, Any]
    model: bytes
    preprocessing: Preprocessing
    classes: list[str]
    positive_class: str | None
    threshold: float | None
    spec: dict[str, Any]
    spec_check: dict[str, Any]

    @property
    def variant(self) -> str:
        return str(self.manifest.get("variant", ""))

    @property
    def model_id(self) -> str:
        return str(self.manifest.get("model_id", ""))


def _safe(name: str) -> bool:
    return len(PurePosixPath(name).parts) == 1 and name not in (".", "..") and "\\" not in name


def _manifest(z: zipfile.ZipFile, source: str) -> dict[str, Any]:
    big = [i.file_size for i in z.infolist() if i.filename == MANIFEST and i.file_size > MAX_MANIFEST_BYTES]
    if big:  # checked from the zip's directory, before a byte of it is inflated
        raise BundleError(f"{source}: {MANIFEST} is {big[0]} bytes, over the limit of {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = json.loads(z.read(MANIFEST))
    except KeyError as exc:
        raise BundleError(f"{source}: not a dlforge bundle (no {MANIFEST})") from exc
    except ValueError as exc:
        raise BundleError(f"{source}: {MANIFEST} is not valid JSON ({exc})") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise BundleError(f"{source}: {MANIFEST} cannot be read from the zip ({exc}): the bundle was altered or "
                          "damaged") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else raw
        raise BundleError(f"{source}: not a dlforge bundle ({MANIFEST} format is {found!r}, expected {FORMAT!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{source}: bundle format version {version!r}, but this dlforge-edge reads version "
                          f"{FORMAT_VERSION} only (use the dlforge-edge release that matches the platform that "
                          "made the bundle)")
    files = raw.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
            for e in files.values()):
        raise BundleError(f"{source}: {MANIFEST} has no valid 'files' table (name -> sha256, bytes)")
    return raw


def _verified(z: zipfile.ZipFile, manifest: dict[str, Any], source: str) -> dict[str, bytes]:
    files: dict[str, dict[str, Any]] = manifest["files"]
    members = {i.filename: i for i in z.infolist()}
    unsafe = sorted(n for n in {*members, *files} if not _safe(n))
    if unsafe:
        raise BundleError(f"{source}: file names outside the bundle's top level: {', '.join(unsafe)}")
    missing = sorted((set(files) | set(REQUIRED)) - set(members))
    if missing:
        raise BundleError(f"{source}: files missing from the bundle: {', '.join(missing)}")
    unlisted = sorted(set(members) - set(files) - {MANIFEST})
    if unlisted:
        raise BundleError(f"{source}: files the manifest does not list: {', '.join(unlisted)}")
    not_listed = sorted(set(REQUIRED) - set(files))
    if not_listed:
        raise BundleError(f"{source}: the manifest lists no checksum for {', '.join(not_listed)}")
    out = {}
    for name, entry in files.items():
        info = members[name]
        if info.file_size != entry["bytes"] or info.file_size > MAX_MEMBER_BYTES:
            raise BundleError(f"{source}: {name} is {info.file_size} bytes, the manifest says {entry['bytes']}: the "
                              "bundle was altered or damaged")
        try:
            data = z.read(info)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a bad CRC, a broken deflate stream
            raise BundleError(f"{source}: {name} cannot be read from the zip ({exc}): the bundle was altered or "
                              "damaged") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise BundleError(f"{source}: {name} does not match its checksum in the manifest (sha256 {digest}, "
                              f"expected {entry['sha256']}): the bundle was altered or damaged")
        out[name] = data
    return out


def _json(data: bytes, name: str, source: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise BundleError(f"{source}: {name} is not valid JSON ({exc})") from exc


def _finite(value: Any) -> bool:
    """A JSON number that is a finite float (not a bool, NaN, an infinity, or an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


MAX_INPUT_SIZE = 4096
"""The largest input side a bundle may ask for: a 4096 x 4096 x 3 float32 input is 200 MB a batch of one
(the platform's specs measure speed at sides up to 4096 too)."""


def _preprocessing(pre: Any, source: str) -> Preprocessing:
    """``preprocessing.json`` as a Preprocessing that makes a finite network input, else BundleError."""
    if not isinstance(pre, dict):
        raise BundleError(f"{source}: preprocessing.json must be an object (colour_mode, input_size, mean, std, "
                          "divide_by, resize)")
    absent = [k for k in ("colour_mode", "input_size", "mean", "std", "divide_by", "resize") if k not in pre]
    if absent:
        raise BundleError(f"{source}: preprocessing.json lacks {', '.join(absent)}")
    size, mean, std, divide_by = pre["input_size"], pre["mean"], pre["std"], pre["divide_by"]
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_INPUT_SIZE:
        raise BundleError(f"{source}: preprocessing.json's input_size {size!r:.80} is not a whole number of pixels "
                          f"from 1 to {MAX_INPUT_SIZE} (each image is resized to it)")
    for name, values in (("mean", mean), ("std", std)):
        if not isinstance(values, list) or not all(_finite(v) for v in values):
            raise BundleError(f"{source}: preprocessing.json's {name} {values!r:.80} is not a list of finite "
                              "numbers (one per channel)")
    if not all(v > 0 for v in std):
        raise BundleError(f"{source}: preprocessing.json's std {std!r:.80} has a value that is not above 0 (every "
                          "pixel is divided by it)")
    if not _finite(divide_by) or divide_by <= 0:
        raise BundleError(f"{source}: preprocessing.json's divide_by {divide_by!r:.80} is not a finite number above 0 "
                          "(every pixel is divided by it)")
    preprocessing = Preprocessing(colour_mode=str(pre["colour_mode"]), input_size=size,
                                  mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                                  divide_by=float(divide_by), resize=str(pre["resize"]))
    if preprocessing.colour_mode not in ("L", "RGB") or preprocessing.resize != "bilinear":
        raise BundleError(f"{source}: preprocessing {preprocessing.colour_mode!r}/{preprocessing.resize!r} is not "
                          "one this dlforge-edge knows (colour L or RGB, bilinear resize)")
    if len(preprocessing.mean) != preprocessing.channels or len(preprocessing.std) != preprocessing.channels:
        raise BundleError(f"{source}: preprocessing.json has {len(preprocessing.mean)} means and "
                          f"{len(preprocessing.std)} stds for {preprocessing.channels} channel(s)")
    return preprocessing


def load_bundle(path: str | Path) -> Bundle:
    """Open and verify the bundle at ``path``; BundleError saying why it must not be used."""
    path = Path(path)
    source = str(path)
    try:
        z = zipfile.ZipFile(path)
    except FileNotFoundError as exc:
        raise BundleError(f"{source}: no such file") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{source}: not a readable zip ({exc})") from exc
    with z:
        manifest = _manifest(z, source)
        files = _verified(z, manifest, source)
    pre = _json(files["preprocessing.json"], "preprocessing.json", source)
    classes = _json(files["classes.json"], "classes.json", source)
    decision = _json(files["decision.json"], "decision.json", source)
    preprocessing = _preprocessing(pre, source)
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"{source}: classes.json must be a list of at least two class names")
    if not isinstance(decision, dict):
        raise BundleError(f"{source}: decision.json must be an object (positive_class, threshold, rule)")
    positive = decision.get("positive_class")
    raw_threshold = decision.get("threshold")
    threshold: float | None = None
    if positive is not None:
        if positive not in classes:
            raise BundleError(f"{source}: decision.json's positive class {positive!r} is not one of {classes}")
        if isinstance(raw_threshold, bool) or not isinstance(raw_threshold, int | float) \
                or not 0.0 <= raw_threshold <= 1.0:  # NaN fails this too: it would never decide the positive class
            raise BundleError(f"{source}: decision.json has a positive class but its threshold {raw_threshold!r} is "
                              "not a probability (a number from 0 to 1)")
        threshold = float(raw_threshold)
    return Bundle(path=path, manifest=manifest, model=files[MODEL], preprocessing=preprocessing, classes=classes,
                  positive_class=positive, threshold=threshold,
                  spec=_json(files["spec.json"], "spec.json", source),
                  spec_check=_json(files["spec_check.json"], "spec_check.json", source))
