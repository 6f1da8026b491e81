"""Reading a dlforge model bundle: its manifest checked, every file's checksum verified, then its contents.

The format is dlforge's (``dlforge.optimizer.bundle``), read here without dlforge: a zip with
``manifest.json`` (``format``, ``format_version``, ``producer``, and per file its ``sha256`` and
``bytes``), ``model.onnx``, ``preprocessing.json``, ``classes.json``, ``decision.json``, ``spec.json``
and ``spec_check.json``. A bundle of another format version, with a file that does not match its
checksum, with a file missing or one the manifest does not list is refused with :class:`BundleError`.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "dlforge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
REQUIRED = (MODEL, "preprocessing.json", "classes.json", "decision.json", "spec.json", "spec_check.json")
MAX_MEMBER_BYTES = 2 * 2**30


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
    try:
        raw = json.loads(z.read(MANIFEST))
    except KeyError as exc:
        raise BundleError(f"{source}: not a dlforge bundle (no {MANIFEST})") from exc
    except ValueError as exc:
        raise BundleError(f"{source}: {MANIFEST} is not valid JSON ({exc})") from exc
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
        data = z.read(info)
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
    try:
        preprocessing = Preprocessing(
            colour_mode=str(pre["colour_mode"]), input_size=int(pre["input_size"]),
            mean=tuple(float(v) for v in pre["mean"]), std=tuple(float(v) for v in pre["std"]),
            divide_by=float(pre["divide_by"]), resize=str(pre["resize"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{source}: preprocessing.json lacks or garbles {exc}") from exc
    if preprocessing.colour_mode not in ("L", "RGB") or preprocessing.resize != "bilinear":
        raise BundleError(f"{source}: preprocessing {preprocessing.colour_mode!r}/{preprocessing.resize!r} is not "
                          "one this dlforge-edge knows (colour L or RGB, bilinear resize)")
    if len(preprocessing.mean) != preprocessing.channels or len(preprocessing.std) != preprocessing.channels:
        raise BundleError(f"{source}: preprocessing.json has {len(preprocessing.mean)} means and "
                          f"{len(preprocessing.std)} stds for {preprocessing.channels} channel(s)")
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
        if not isinstance(raw_threshold, int | float):
            raise BundleError(f"{source}: decision.json has a positive class but no numeric threshold")
        threshold = float(raw_threshold)
    return Bundle(path=path, manifest=manifest, model=files[MODEL], preprocessing=preprocessing, classes=classes,
                  positive_class=positive, threshold=threshold,
                  spec=_json(files["spec.json"], "spec.json", source),
                  spec_check=_json(files["spec_check.json"], "spec_check.json", source))
