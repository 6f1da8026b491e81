"""ObjectStore contract: one suite, run against every backend (filesystem and S3)."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dlforge.common.backends import open_objects
from dlforge.common.errors import InvalidInput, NotFound
from dlforge.common.objects import ObjectStore


@pytest.fixture(params=[pytest.param("fs", id="fs"), pytest.param("s3", id="s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    url = f"file://{tmp_path}/objects" if request.param == "fs" else str(request.getfixturevalue("s3_url"))
    s = open_objects(url)
    yield s
    for info in list(s.list()):
        s.delete(info.key)


class UnknownLengthStream(io.RawIOBase):
    """``total`` pseudo-random bytes handed out in odd-sized reads, length not known in advance."""

    def __init__(self, total: int, seed: bytes = b"dlforge") -> None:
        self.remaining = total
        self.block = hashlib.sha256(seed).digest() * 4096  # 128 KiB pattern
        self.offset = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.remaining, 77_777)
        if n <= 0:
            return 0
        chunk = self._chunk(n)
        buffer[:n] = chunk
        self.remaining -= n
        self.digest.update(chunk)
        return n

    def _chunk(self, n: int) -> bytes:
        start = self.offset % len(self.block)
        out = (self.block[start:] + self.block)[:n] if start + n > len(self.block) else self.block[start:start + n]
        self.offset += n
        return out


def test_put_and_get_bytes(store: ObjectStore) -> None:
    info = store.put_bytes("a/b/hello.txt", b"hello world", content_type="text/plain")
    assert info.key == "a/b/hello.txt" and info.size == 11
    assert store.get_bytes("a/b/hello.txt") == b"hello world"
    assert store.exists("a/b/hello.txt") and not store.exists("a/b/other.txt")
    store.put_bytes("a/b/hello.txt", b"replaced")  # a put overwrites
    assert store.get_bytes("a/b/hello.txt") == b"replaced"


def test_json_helpers_round_trip(store: ObjectStore) -> None:
    value = {"items": [1, 2, 3], "name": "ds", "nested": {"ok": True}}
    store.put_json("m/manifest.json", value)
    assert store.get_json("m/manifest.json") == value
    assert store.stat("m/manifest.json").content_type == "application/json"


def test_stat_reports_size_etag_time_and_type(store: ObjectStore) -> None:
    before = datetime.now(UTC) - timedelta(minutes=5)
    store.put_bytes("s/x.bin", b"\x00" * 1234, content_type="application/x-test")
    info = store.stat("s/x.bin")
    assert info.size == 1234
    assert info.etag == hashlib.md5(b"\x00" * 1234, usedforsecurity=False).hexdigest()
    assert info.content_type == "application/x-test"
    assert info.last_modified.tzinfo is not None and info.last_modified >= before


def test_streaming_put_of_an_unknown_length_stream_and_get_file(store: ObjectStore, tmp_path: Path) -> None:
    size = 21 * 1024 * 1024 + 12345  # > 20 MB, more than one 16 MiB multipart part on S3
    stream = UnknownLengthStream(size)
    info = store.put_stream("big/blob.bin", io.BufferedReader(stream, 1 << 20), length=-1)
    assert info.size == size and store.stat("big/blob.bin").size == size
    out = store.get_file("big/blob.bin", tmp_path / "download" / "blob.bin")
    assert out.stat().st_size == size
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == stream.digest.hexdigest()
    assert not list((tmp_path / "download").glob("*.part"))  # the temporary file was renamed
    with store.open("big/blob.bin") as f:  # streaming read
        assert len(f.read(1000)) == 1000


def test_put_file_streams_a_local_file(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(b"onnx" * 10_000)
    store.put_file("models/m.onnx", src)
    assert store.get_bytes("models/m.onnx") == src.read_bytes()


def test_list_by_prefix_is_sorted(store: ObjectStore) -> None:
    for key in ["ds/2/b.png", "ds/1/z.png", "ds/1/a.png", "dsx/other.png", "models/m.pt"]:
        store.put_bytes(key, key.encode())
    assert [i.key for i in store.list("ds/")] == ["ds/1/a.png", "ds/1/z.png", "ds/2/b.png"]
    assert [i.key for i in store.list("ds")] == ["ds/1/a.png", "ds/1/z.png", "ds/2/b.png", "dsx/other.png"]
    assert [i.key for i in store.list()] == sorted(["ds/2/b.png", "ds/1/z.png", "ds/1/a.png", "dsx/other.png",
                                                    "models/m.pt"])
    assert [i.size for i in store.list("models/")] == [len(b"models/m.pt")]
    assert list(store.list("nothing/")) == []


def test_presigned_url_reads_the_object_without_credentials(store: ObjectStore) -> None:
    payload = json.dumps({"report": list(range(100))}).encode()
    store.put_bytes("reports/r.json", payload, content_type="application/json")
    url = store.presigned_get_url("reports/r.json", expires=timedelta(minutes=5))
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == payload


def test_delete_removes_and_is_idempotent(store: ObjectStore) -> None:
    store.put_bytes("d/x", b"1")
    store.delete("d/x")
    assert not store.exists("d/x")
    assert list(store.list("d/")) == []
    store.delete("d/x")  # no error when already gone


def test_missing_objects_raise_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        store.get_bytes("missing/key")
    with pytest.raises(NotFound):
        store.stat("missing/key")
    with pytest.raises(NotFound):
        store.get_file("missing/key", tmp_path / "out")
    with pytest.raises(NotFound):
        store.presigned_get_url("missing/key")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["", "/abs/key", "../escape", "a/../../b", "a//b", "dir/", ".hidden", "a b",
                                 "x" * 901])
def test_invalid_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidInput):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidInput):
        store.get_bytes(key)


def test_ping_answers(store: ObjectStore) -> None:
    store.ping()
