"""Filesystem ObjectStore: one file per object under a root folder, written atomically."""

from __future__ import annotations

import hashlib
import mimetypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from dlforge.common.errors import NotFound
from dlforge.common.objects import ObjectInfo, ObjectStore, check_key

_META_SUFFIX = ".dlforge-meta"


class FsObjectStore(ObjectStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_stream(
        self, key: str, stream: BinaryIO, *, length: int = -1, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.md5(usedforsecurity=False)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            Path(tmp + _META_SUFFIX).write_text(f"{digest.hexdigest()}\n{content_type}\n")
            os.replace(tmp + _META_SUFFIX, str(path) + _META_SUFFIX)
            os.replace(tmp, path)
        except BaseException:
            for leftover in (tmp, tmp + _META_SUFFIX):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            raise
        return self.stat(key)

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotFound(f"no object {key!r}") from exc

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"no object {key!r}")
        st = path.stat()
        meta = Path(str(path) + _META_SUFFIX)
        etag, content_type = "", mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if meta.is_file():
            lines = meta.read_text().splitlines()
            etag, content_type = lines[0], lines[1]
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=etag,
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
            content_type=content_type,
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        keys: list[str] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith(_META_SUFFIX) or name.startswith(".upload-"):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        for key in sorted(keys):
            yield self.stat(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        for p in (path, Path(str(path) + _META_SUFFIX)):
            if p.is_file():
                p.unlink()

    def presigned_get_url(self, key: str, *, expires: timedelta = timedelta(hours=1)) -> str:
        # A local file needs no signature: the URL is only readable by who can read the folder.
        self.stat(key)
        return self._path(key).as_uri()

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"object root {self.root} is not writable")

    def clear(self) -> None:
        """Remove every object (tests and demo resets)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
