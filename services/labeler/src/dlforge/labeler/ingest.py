"""Ingestion as pure functions: a zip or a folder in, a typed :class:`IngestResult` out.

Nothing here writes anywhere but :func:`persist`, which copies the accepted images and the
manifest to the object store and removes what it wrote if it fails part-way. Refusals
(:class:`InvalidInput` with a 4xx status) all happen while scanning, before anything is written:

- a zip entry that escapes the target folder (absolute path, drive letter, ``..``) or is a symlink;
- a single file over ``max_file_bytes`` (declared in the zip header *or* counted while inflating);
- an archive whose declared or actually inflated total exceeds ``max_total_bytes`` (zip bomb);
- more than ``max_entries`` files; an upload that is not a zip;
- a CSV manifest without a file column, naming missing files or escaping the folder;
- a dataset with no valid image.

Bad images are not refusals: each is reported by name with the reason, and so are duplicates
(same SHA-256 as an earlier file, by name order).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import os
import re
import stat
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from pydantic import BaseModel, ConfigDict

from dlforge.common.classnames import MAX_LABEL_CHARS as MAX_LABEL_CHARS  # re-exported: the labeler's name
from dlforge.common.classnames import RULE, valid_label
from dlforge.common.errors import InvalidInput
from dlforge.common.objects import ObjectStore
from dlforge.vision.images import decode
from dlforge.vision.manifest import Duplicate, Item, Manifest, Rejection, save_manifest

Layout = Literal["auto", "class_folders", "csv", "flat"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
_FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "GIF": "gif", "PPM": "ppm"}
FILE_COLUMNS = ("file", "filename", "file_name", "filepath", "file_path", "path", "image", "image_name",
                "image_path", "img", "name", "fname", "images")
LABEL_COLUMNS = ("label", "labels", "class", "class_name", "category", "target", "y", "tag")
DOMAIN_COLUMNS = ("domain", "type", "group", "source")
PREFERRED_CSV = ("labels.csv", "manifest.csv", "annotations.csv", "dataset.csv")

STATUS_TOO_LARGE = 413
STATUS_NOT_A_ZIP = 415
STATUS_BAD_INPUT = 422


@dataclass(frozen=True)
class IngestLimits:
    """Upper bounds a scan enforces (the labeler settings supply them)."""

    max_file_bytes: int
    max_total_bytes: int
    max_entries: int


class IngestedItem(BaseModel):
    """One accepted image: where it came from and what it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: str
    source: str
    name: str
    sha256: str
    size: int
    width: int
    height: int
    ext: str
    label: str | None = None
    domain: str | None = None


class IngestResult(BaseModel):
    """What a scan found; :func:`persist` turns it into objects and a manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: Literal["class_folders", "csv", "flat"]
    csv_name: str | None = None
    items: list[IngestedItem]
    classes: list[str]
    rejected: list[Rejection]
    duplicates: list[Duplicate]
    skipped: list[str] = []

    @property
    def labeled_count(self) -> int:
        return sum(1 for i in self.items if i.label is not None)


# ------------------------------------------------------------------------------------------
# File trees: a zip archive or a server-side folder, with their limits enforced
# ------------------------------------------------------------------------------------------


class FileTree(ABC):
    """A read-only tree of files addressed by relative POSIX paths."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self._inflated = 0

    @abstractmethod
    def files(self) -> list[str]:
        """Every regular file, as a relative POSIX path, sorted."""

    @abstractmethod
    def _open(self, path: str) -> BinaryIO:
        """A stream of the file's content."""

    @abstractmethod
    def declared_size(self, path: str) -> int:
        """The size the tree claims for the file."""

    def read(self, path: str) -> bytes:
        """The file's bytes, counted while streaming: over a limit refuses the whole tree."""
        limits = self.limits
        declared = self.declared_size(path)
        out = io.BytesIO()
        with self._open(path) as stream:
            while chunk := stream.read(1 << 20):
                out.write(chunk)
                self._inflated += len(chunk)
                n = out.tell()
                if n > limits.max_file_bytes:
                    raise InvalidInput(
                        f"{path!r} expands to more than the per-file limit of {limits.max_file_bytes} bytes",
                        status_code=STATUS_TOO_LARGE,
                    )
                if n > declared:
                    raise InvalidInput(
                        f"{path!r} expands beyond the {declared} bytes its header declares "
                        "(a malformed archive or a zip bomb)",
                        status_code=STATUS_TOO_LARGE,
                    )
                if self._inflated > limits.max_total_bytes:
                    raise InvalidInput(
                        f"the upload expands to more than the limit of {limits.max_total_bytes} bytes "
                        f"(reached while reading {path!r})",
                        status_code=STATUS_TOO_LARGE,
                    )
        return out.getvalue()

    def reread(self, path: str) -> bytes:
        """Read a file again after the scan (for copying); the scan's byte budget is not charged twice."""
        saved = self._inflated
        self._inflated = 0
        try:
            return self.read(path)
        finally:
            self._inflated = saved

    def close(self) -> None:  # noqa: B027 - optional
        """Release the underlying archive."""


def _check_declared(limits: IngestLimits, sizes: dict[str, int]) -> None:
    if len(sizes) > limits.max_entries:
        raise InvalidInput(f"the upload has {len(sizes)} files, more than the limit of {limits.max_entries}",
                           status_code=STATUS_TOO_LARGE)
    for name, size in sizes.items():
        if size > limits.max_file_bytes:
            raise InvalidInput(f"{name!r} is {size} bytes, over the per-file limit of {limits.max_file_bytes}",
                               status_code=STATUS_TOO_LARGE)
    total = sum(sizes.values())
    if total > limits.max_total_bytes:
        raise InvalidInput(f"the upload declares {total} bytes uncompressed, over the limit of "
                           f"{limits.max_total_bytes}", status_code=STATUS_TOO_LARGE)


def _safe_relative(raw: str) -> str:
    """The entry name as a safe relative POSIX path, or InvalidInput if it escapes the target folder."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise InvalidInput(f"zip entry {raw!r} has a NUL byte in its name", status_code=STATUS_BAD_INPUT)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise InvalidInput(f"zip entry {raw!r} has an absolute path: it would escape the target folder",
                           status_code=STATUS_BAD_INPUT)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"zip entry {raw!r} contains '..': it would escape the target folder",
                           status_code=STATUS_BAD_INPUT)
    return "/".join(parts)


class ZipTree(FileTree):
    """A zip archive. Construction validates every entry's name, type and declared size."""

    def __init__(self, stream: BinaryIO, limits: IngestLimits) -> None:
        super().__init__(limits)
        try:
            self._zip = zipfile.ZipFile(stream)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise InvalidInput(f"the upload is not a zip archive ({exc})", status_code=STATUS_NOT_A_ZIP) from exc
        infos = self._zip.infolist()
        if len(infos) > limits.max_entries:
            raise InvalidInput(f"the archive has {len(infos)} entries, more than the limit of "
                               f"{limits.max_entries}", status_code=STATUS_TOO_LARGE)
        self._infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            rel = _safe_relative(info.filename)
            mode = (info.external_attr >> 16) & 0xFFFF
            if stat.S_ISLNK(mode):
                raise InvalidInput(f"zip entry {info.filename!r} is a symlink; symlinks are not accepted",
                                   status_code=STATUS_BAD_INPUT)
            if info.is_dir() or not rel:
                continue
            if rel in self._infos:
                raise InvalidInput(f"zip entry {info.filename!r} appears twice", status_code=STATUS_BAD_INPUT)
            self._infos[rel] = info
        _check_declared(limits, {k: i.file_size for k, i in self._infos.items()})

    def files(self) -> list[str]:
        return sorted(self._infos)

    def declared_size(self, path: str) -> int:
        return self._infos[path].file_size

    def _open(self, path: str) -> BinaryIO:
        info = self._infos[path]
        if info.flag_bits & 0x1:
            raise _EntryError("encrypted zip entry")
        # Let zipfile inflate past the declared size: read() counts the bytes and stops at the
        # limits, so a lying header is caught by counting instead of being silently truncated.
        capped = copy.copy(info)
        capped.file_size = 1 << 62
        try:
            return self._zip.open(capped)  # type: ignore[return-value]
        except NotImplementedError as exc:
            raise _EntryError(f"unsupported zip compression ({exc})") from exc

    def read(self, path: str) -> bytes:
        try:
            data = super().read(path)
        except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError) as exc:
            raise _EntryError(f"corrupt zip entry ({exc})") from exc
        declared = self._infos[path].file_size
        if len(data) != declared:
            raise _EntryError(f"inflates to {len(data)} bytes but its header declares {declared}")
        return data

    def close(self) -> None:
        self._zip.close()


class FolderTree(FileTree):
    """A server-side folder. Symlinks are refused; sizes are checked before and while reading."""

    def __init__(self, root: Path, limits: IngestLimits) -> None:
        super().__init__(limits)
        if not root.is_dir():
            raise InvalidInput(f"folder {str(root)!r} does not exist or is not a folder", status_code=404)
        self.root = root
        self._sizes: dict[str, int] = {}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in sorted(dirnames + filenames):
                full = Path(dirpath, name)
                rel = full.relative_to(root).as_posix()
                if full.is_symlink():
                    raise InvalidInput(f"{rel!r} is a symlink; symlinks are not accepted",
                                       status_code=STATUS_BAD_INPUT)
                if name in filenames and full.is_file():
                    self._sizes[rel] = full.stat().st_size
                    if len(self._sizes) > limits.max_entries:
                        raise InvalidInput(f"the folder has more than {limits.max_entries} files",
                                           status_code=STATUS_TOO_LARGE)
        _check_declared(limits, self._sizes)

    def files(self) -> list[str]:
        return sorted(self._sizes)

    def declared_size(self, path: str) -> int:
        return self._sizes[path]

    def _open(self, path: str) -> BinaryIO:
        return (self.root / path).open("rb")

    def read(self, path: str) -> bytes:
        try:
            return super().read(path)
        except OSError as exc:
            raise _EntryError(f"cannot be read ({exc})") from exc


class _EntryError(Exception):
    """One file cannot be read: it is rejected, the rest goes on."""


def open_zip(stream: BinaryIO, limits: IngestLimits) -> ZipTree:
    return ZipTree(stream, limits)


def open_folder(folder: str | Path, *, roots: Sequence[Path], limits: IngestLimits) -> FolderTree:
    """A server-side folder inside one of ``roots``; anything else is refused with 403."""
    if not roots:
        raise InvalidInput("server-side folder import is disabled: set DLFORGE_LABELER_IMPORT_ROOTS",
                           status_code=403)
    if re.search(r"[\x00-\x1f\x7f]", str(folder)):
        raise InvalidInput(f"folder {str(folder)[:200]!r} has control characters", status_code=STATUS_BAD_INPUT)
    try:
        path = Path(folder).expanduser()
        if not path.is_absolute():
            raise InvalidInput(f"folder {str(folder)!r} must be an absolute path", status_code=STATUS_BAD_INPUT)
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # an unknown ~user, a path the OS refuses
        raise InvalidInput(f"folder {str(folder)[:200]!r} is not a usable path ({exc})",
                           status_code=STATUS_BAD_INPUT) from exc
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise InvalidInput(f"folder {str(folder)!r} is outside the allowed import roots", status_code=403)
    return FolderTree(resolved, limits)


# ------------------------------------------------------------------------------------------
# Layout: class folders, CSV manifest or flat
# ------------------------------------------------------------------------------------------


def _is_hidden(path: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" or p == "Thumbs.db" for p in path.split("/"))


def _strip_wrapper(files: list[str]) -> str:
    """The single top-level folder everything sits in ('' if none)."""
    if not files or any("/" not in f for f in files):
        return ""
    tops = {f.split("/", 1)[0] for f in files}
    return tops.pop() + "/" if len(tops) == 1 else ""


def _clean_label(raw: str | None, *, where: str) -> str | None:
    if raw is None:
        return None
    label = raw.strip()
    if not label:
        return None
    if not valid_label(label):
        raise InvalidInput(f"{where}: label {label[:40]!r} is not a valid class name ({RULE})",
                           status_code=STATUS_BAD_INPUT)
    return label


@dataclass(frozen=True)
class CsvLabels:
    """What a CSV manifest says: relative file path -> (label, domain)."""

    labels: dict[str, str | None]
    domains: dict[str, str | None]
    file_column: str
    label_column: str | None


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _split_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    sample = "\n".join(lines[:50])
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
        rows = list(csv.reader(lines, dialect))
        if len({len(r) for r in rows[:50]}) <= 2 and max(len(r) for r in rows[:50]) > 1:
            return [[c.strip() for c in r] for r in rows]
    except csv.Error:
        pass
    ws = [ln.split() for ln in lines]
    if max(len(r) for r in ws[:50]) > 1:
        return ws
    return [[ln.strip()] for ln in lines]


def _normalize_ref(ref: str, csv_name: str) -> str:
    ref = ref.strip().replace("\\", "/")
    if ref.startswith("/") or re.match(r"^[A-Za-z]:", ref) or ".." in ref.split("/"):
        raise InvalidInput(f"{csv_name}: {ref!r} points outside the dataset folder", status_code=STATUS_BAD_INPUT)
    return "/".join(p for p in ref.split("/") if p not in ("", "."))


def parse_csv(
    data: bytes, *, csv_name: str, files: Sequence[str], allowed: Collection[str] | None = None
) -> CsvLabels:
    """Read a CSV manifest; the file (and label, domain) columns are found by header name or content.

    ``files`` are the relative paths present next to the CSV. A CSV without a file column, or
    naming files that are not there, is refused with a message that says so; so is one whose labels
    are not all in ``allowed`` (when given: the dataset's classes, new ones not allowed).
    """
    rows = _split_rows(_decode_text(data))
    if not rows:
        raise InvalidInput(f"{csv_name} is empty", status_code=STATUS_BAD_INPUT)
    present = set(files)
    by_base: dict[str, list[str]] = {}
    for f in files:
        by_base.setdefault(PurePosixPath(f).name, []).append(f)

    def resolve(ref: str) -> str | None:
        if ref in present:
            return ref
        hits = by_base.get(PurePosixPath(ref).name, [])
        return hits[0] if len(hits) == 1 and "/" not in ref else None

    header = [c.strip().lower().replace(" ", "_").replace("-", "_") for c in rows[0]]
    file_col: int | None = None
    label_col: int | None = None
    domain_col: int | None = None
    if any(h in FILE_COLUMNS + LABEL_COLUMNS + DOMAIN_COLUMNS for h in header):
        file_col = next((i for i, h in enumerate(header) if h in FILE_COLUMNS), None)
        label_col = next((i for i, h in enumerate(header) if h in LABEL_COLUMNS), None)
        domain_col = next((i for i, h in enumerate(header) if h in DOMAIN_COLUMNS and i != file_col), None)
        if file_col is None:
            raise InvalidInput(
                f"{csv_name} has no file column: its header is {rows[0]!r}; name one column "
                f"{', '.join(FILE_COLUMNS[:6])} (or similar)", status_code=STATUS_BAD_INPUT)
        body = rows[1:]
        names = list(rows[0])
    else:
        width = max(len(r) for r in rows)
        scores = []
        for col in range(width):
            vals = [r[col] for r in rows if col < len(r) and r[col]]
            hits = sum(1 for v in vals if resolve(v.replace("\\", "/").lstrip("./")) is not None)
            looks = sum(1 for v in vals if v.lower().endswith(IMAGE_EXTS))
            scores.append((hits, looks, col))
        best = max(scores) if scores else (0, 0, 0)
        if best[0] == 0 and best[1] == 0:
            raise InvalidInput(f"{csv_name} has no file column: no column names image files "
                               "(add a header row such as 'file,label')", status_code=STATUS_BAD_INPUT)
        file_col = best[2]
        others = [c for c in range(width) if c != file_col]
        label_col = others[0] if others else None
        domain_col = others[1] if len(others) > 1 else None
        body = rows
        names = [f"column {i + 1}" for i in range(width)]

    labels: dict[str, str | None] = {}
    domains: dict[str, str | None] = {}
    missing: list[str] = []
    unknown: list[tuple[int, str]] = []
    for n, row in enumerate(body, start=2 if body is not rows else 1):
        if file_col >= len(row) or not row[file_col]:
            continue
        ref = _normalize_ref(row[file_col], csv_name)
        target = resolve(ref)
        if target is None:
            missing.append(row[file_col])
            continue
        where = f"{csv_name} line {n}"
        label = _clean_label(row[label_col] if label_col is not None and label_col < len(row) else None,
                             where=where)
        if label is not None and allowed is not None and label not in allowed:
            unknown.append((n, label))
        domain = row[domain_col].strip() or None if domain_col is not None and domain_col < len(row) else None
        if target in labels and labels[target] is not None and label is not None and labels[target] != label:
            raise InvalidInput(f"{where}: {target!r} is listed twice with different labels "
                               f"({labels[target]!r} and {label!r})", status_code=STATUS_BAD_INPUT)
        if labels.get(target) is None:
            labels[target] = label
        domains.setdefault(target, domain)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise InvalidInput(f"{csv_name} names {len(missing)} file(s) that are not in the upload: {shown}{more}",
                           status_code=STATUS_BAD_INPUT, details={"missing": missing[:1000]})
    if unknown:
        assert allowed is not None
        shown = ", ".join(f"line {n}: {label!r}" for n, label in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise InvalidInput(
            f"{csv_name} has {len(unknown)} label(s) outside the dataset's classes {sorted(allowed)} and new "
            f"classes are not allowed (allow_new_classes is off): {shown}{more}", status_code=STATUS_BAD_INPUT,
            details={"unknown": [{"line": n, "label": label} for n, label in unknown[:1000]]})
    if not labels:
        raise InvalidInput(f"{csv_name} lists no files", status_code=STATUS_BAD_INPUT)
    return CsvLabels(labels=labels, domains=domains, file_column=names[file_col],
                     label_column=names[label_col] if label_col is not None else None)


def _pick_csv(csvs: list[str]) -> str:
    if len(csvs) == 1:
        return csvs[0]
    preferred = [c for c in csvs if c.lower() in PREFERRED_CSV]
    if len(preferred) == 1:
        return preferred[0]
    raise InvalidInput(f"several CSV files at the top level ({', '.join(csvs)}): keep one, or name it labels.csv",
                       status_code=STATUS_BAD_INPUT)


# ------------------------------------------------------------------------------------------
# The scan
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoundLayout:
    """How a tree's (non-hidden) files are laid out."""

    wrapper: str
    """the single top-level folder everything sits in, stripped from the names ('' if none)"""
    relative: dict[str, str]
    """file path -> its name in the dataset (the path without the wrapper)"""
    root_csvs: list[str]
    layout: Literal["class_folders", "csv", "flat"]


def detect_layout(files: Sequence[str], layout: Layout = "auto") -> FoundLayout:
    """The layout of ``files`` (non-hidden, relative POSIX paths): a CSV at the top level, class
    sub-folders (their names are the given labels) or flat; ``layout`` other than auto is taken as is."""
    wrapper = _strip_wrapper(list(files))
    if wrapper and layout == "class_folders" and not any("/" in f[len(wrapper):] for f in files):
        wrapper = ""  # a single class folder, not a wrapper around the dataset
    rel = {f: f[len(wrapper):] for f in files}
    root_csvs = [r for r in rel.values() if "/" not in r and r.lower().endswith((".csv", ".tsv"))]
    resolved: Literal["class_folders", "csv", "flat"]
    if layout == "auto":
        if root_csvs:
            resolved = "csv"
        elif any("/" in r for r in rel.values()):
            resolved = "class_folders"
        else:
            resolved = "flat"
    else:
        resolved = layout
    return FoundLayout(wrapper=wrapper, relative=rel, root_csvs=root_csvs, layout=resolved)


def is_hidden(path: str) -> bool:
    """Files the scan skips (dot files, ``__MACOSX``, ``Thumbs.db``)."""
    return _is_hidden(path)


def item_id_of(sha256: str) -> str:
    """Items are named by their content, so re-ingesting the same file gives the same id."""
    return sha256[:20]


def scan(
    tree: FileTree,
    *,
    layout: Layout = "auto",
    classes: Iterable[str] = (),
    allow_new_classes: bool = True,
) -> IngestResult:
    """Read, decode and check every file of ``tree``; refusals raise InvalidInput (nothing written).

    With ``allow_new_classes`` off and ``classes`` named, every given label (class folder or CSV
    label) must be one of ``classes``; otherwise the upload is refused naming the offenders.
    """
    named = sorted({c for c in (_clean_label(c, where="classes") for c in classes) if c})
    allowed = None if allow_new_classes or not named else set(named)
    all_files = tree.files()
    skipped = [f for f in all_files if _is_hidden(f)]
    files = [f for f in all_files if not _is_hidden(f)]
    found = detect_layout(files, layout)
    wrapper, rel, root_csvs, resolved = found.wrapper, found.relative, found.root_csvs, found.layout
    if resolved == "csv" and not root_csvs:
        raise InvalidInput("layout 'csv' asked but there is no CSV file at the top level",
                           status_code=STATUS_BAD_INPUT)

    csv_name: str | None = None
    csv_labels: CsvLabels | None = None
    image_files = [f for f in files if not (resolved == "csv" and rel[f] in root_csvs)]
    if resolved == "csv":
        csv_name = _pick_csv(root_csvs)
        source = wrapper + csv_name
        try:
            data = tree.read(source)
        except _EntryError as exc:
            raise InvalidInput(f"{csv_name} cannot be read: {exc}", status_code=STATUS_BAD_INPUT) from exc
        csv_labels = parse_csv(data, csv_name=csv_name, files=[rel[f] for f in image_files], allowed=allowed)
    if resolved == "class_folders" and allowed is not None:
        folders = sorted({_clean_label(rel[f].split("/", 1)[0], where=rel[f]) or "" for f in image_files
                          if "/" in rel[f]} - {""})
        if unknown := [f for f in folders if f not in allowed]:
            raise InvalidInput(
                f"class folder(s) {', '.join(repr(f) for f in unknown[:10])} are not among the dataset's classes "
                f"{named} and new classes are not allowed (allow_new_classes is off)",
                status_code=STATUS_BAD_INPUT, details={"unknown": unknown[:1000]})

    rejected: list[Rejection] = []
    duplicates: list[Duplicate] = []
    items: list[IngestedItem] = []
    first_by_hash: dict[str, int] = {}
    for f in image_files:
        name = rel[f]
        try:
            data = tree.read(f)
        except _EntryError as exc:
            rejected.append(Rejection(name=name, reason=str(exc)))
            continue
        try:
            img = decode(data, name=name)
        except InvalidInput as exc:
            reason = str(exc)
            rejected.append(Rejection(name=name, reason=reason.removeprefix(f"{name}: ")))
            continue
        digest = hashlib.sha256(data).hexdigest()
        label: str | None = None
        domain: str | None = None
        if resolved == "class_folders" and "/" in name:
            label = _clean_label(name.split("/", 1)[0], where=name)
        elif csv_labels is not None:
            label = csv_labels.labels.get(name)
            domain = csv_labels.domains.get(name)
        if digest in first_by_hash:
            first = items[first_by_hash[digest]]
            duplicates.append(Duplicate(name=name, duplicate_of=first.name))
            if first.label is None and label is not None:
                items[first_by_hash[digest]] = first.model_copy(update={"label": label})
            continue
        suffix = PurePosixPath(name).suffix.lower()
        ext = suffix[1:] if suffix in IMAGE_EXTS else _FORMAT_EXT.get(str(img.format), "img")
        first_by_hash[digest] = len(items)
        items.append(IngestedItem(item_id=item_id_of(digest), source=f, name=name, sha256=digest, size=len(data),
                                  width=img.width, height=img.height, ext=ext, label=label, domain=domain))
        img.close()
    if not items:
        detail = f" ({len(rejected)} file(s) rejected)" if rejected else ""
        raise InvalidInput(f"the dataset is empty: no valid image was found{detail}", status_code=STATUS_BAD_INPUT,
                           details={"rejected": [r.model_dump() for r in rejected[:1000]]})
    known = sorted(set(named) | {i.label for i in items if i.label is not None})
    return IngestResult(layout=resolved, csv_name=csv_name, items=items, classes=known, rejected=rejected,
                        duplicates=duplicates, skipped=skipped)


# ------------------------------------------------------------------------------------------
# Persisting: images and manifest to the object store, all or nothing
# ------------------------------------------------------------------------------------------


def dataset_prefix(dataset_id: str) -> str:
    return f"labeler/datasets/{dataset_id}"


def manifest_key(dataset_id: str) -> str:
    return f"{dataset_prefix(dataset_id)}/manifest.json"


def item_key(dataset_id: str, item: IngestedItem) -> str:
    return f"{dataset_prefix(dataset_id)}/items/{item.item_id}.{item.ext}"


_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "bmp": "image/bmp",
                  "tif": "image/tiff", "tiff": "image/tiff", "webp": "image/webp", "gif": "image/gif"}


def build_manifest(dataset_id: str, name: str, result: IngestResult) -> Manifest:
    return Manifest(
        dataset_id=dataset_id,
        name=name,
        classes=list(result.classes),
        items=[
            Item(item_id=i.item_id, key=item_key(dataset_id, i), name=i.name, sha256=i.sha256, width=i.width,
                 height=i.height, label=i.label, label_source="given" if i.label is not None else None,
                 confidence=1.0 if i.label is not None else None, domain=i.domain)
            for i in result.items
        ],
        rejected=list(result.rejected),
        duplicates=list(result.duplicates),
    )


def persist(objects: ObjectStore, tree: FileTree, *, dataset_id: str, name: str, result: IngestResult) -> Manifest:
    """Copy the accepted images and write the manifest; on any failure remove what was written."""
    written: list[str] = []
    try:
        for item in result.items:
            key = item_key(dataset_id, item)
            data = tree.reread(item.source)
            if hashlib.sha256(data).hexdigest() != item.sha256:
                raise InvalidInput(f"{item.name!r} changed while it was being imported", status_code=409)
            objects.put_bytes(key, data, content_type=_CONTENT_TYPES.get(item.ext, "application/octet-stream"))
            written.append(key)
        manifest = build_manifest(dataset_id, name, result)
        written.append(manifest_key(dataset_id))
        save_manifest(objects, manifest_key(dataset_id), manifest)
        return manifest
    except BaseException:
        remove_objects(objects, written)
        raise


def remove_objects(objects: ObjectStore, keys: Iterable[str]) -> None:
    """Best-effort removal used to undo a partial write."""
    for key in keys:
        try:
            objects.delete(key)
        except Exception:
            continue
