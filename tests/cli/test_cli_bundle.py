"""``dlforge bundle RUN_ID -o FILE`` against a stand-in API: what it writes, and that a failure writes nothing.

The stand-in answers the two requests the command makes (the run view, then the bundle) with bytes the
test chooses, so a bundle can be malformed, or cut off mid-body, as no real API would send it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dlforge.cli.main import main

RUN_ID = "run-1"
BUNDLE_PATH = f"/optimizer/models/ds1/bundle?run_id={RUN_ID}"
RUN_VIEW = {"run_id": RUN_ID, "dataset_id": "ds1", "state": "succeeded",
            "stages": {"trainer": {"state": "succeeded"}, "optimizer": {"state": "succeeded"}}}


@dataclass
class StandIn:
    """What the stand-in API sends for the bundle: ``body``, and ``cut_after`` bytes of it only (the
    Content-Length still saying the whole) before the connection is closed."""

    url: str = ""
    body: bytes = b""
    cut_after: int | None = None
    paths: list[str] = field(default_factory=list)
    run_view: bytes | None = None  # what GET /runs/{id} answers instead of RUN_VIEW


@pytest.fixture
def api() -> Iterator[StandIn]:
    stand_in = StandIn()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            stand_in.paths.append(self.path)
            if self.path == f"/runs/{RUN_ID}":
                body, sent = stand_in.run_view or json.dumps(RUN_VIEW).encode(), None
            elif self.path == BUNDLE_PATH:
                body, sent = stand_in.body, stand_in.cut_after
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if sent is None else body[:sent])
            if sent is not None:
                self.wfile.flush()
                self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


GOOD = zip_of({"manifest.json": json.dumps({"format": "dlforge-bundle", "format_version": 1, "model_id": "m1",
                                            "variant": "onnx_fp32"}).encode(),
               "model.onnx": bytes(range(256)) * 1024})  # 256 KiB


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_the_stand_in_serves_a_bundle_the_command_writes(api: StandIn, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    api.body = GOOD
    out = tmp_path / "out" / "b.zip"
    assert main(["bundle", RUN_ID, "-o", str(out), "--url", api.url]) == 0
    assert out.read_bytes() == GOOD
    said = capsys.readouterr().out
    assert f"model m1, variant onnx_fp32, {len(GOOD)} bytes, sha256 {hashlib.sha256(GOOD).hexdigest()}" in said
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.zip"]


@pytest.mark.parametrize("manifest", [b"[1, 2]", b'"dlforge-bundle"', b"null", b"3"])
def test_a_manifest_that_is_not_an_object_is_refused_and_nothing_written(
        api: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str], manifest: bytes) -> None:
    api.body = zip_of({"manifest.json": manifest, "model.onnx": b"\0" * 100})
    out = tmp_path / "out" / "b.zip"
    assert main(["bundle", RUN_ID, "-o", str(out), "--url", api.url]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"dlforge: the bundle of run '{RUN_ID}' the API sent is not a bundle"), err
    assert f"its manifest.json is {manifest.decode()}, not a JSON object" in err, err
    assert not out.exists() and not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize(("view", "said"), [
    (b"<html>502 Bad Gateway</html>", "the API's answer is not JSON ('<html>502 Bad Gateway</html>')"),
    (b'{"run_id": "run-1", "stag', "the API's answer is not JSON"),
    (b"[1, 2]", "the API's answer is not a run view ([1, 2])"),
    (b'{"run_id": "run-1", "stages": [1]}', "the API's answer is not a run view"),
    (b'{"run_id": "run-1", "dataset_id": ["x"], "stages": {"optimizer": {"state": "succeeded"}, "trainer": 3}}',
     "has no model yet"),
])
def test_a_run_view_that_is_not_one_is_a_message_not_a_traceback(
        api: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str], view: bytes, said: str) -> None:
    api.body, api.run_view = GOOD, view
    out = tmp_path / "out" / "b.zip"
    assert main(["bundle", RUN_ID, "-o", str(out), "--url", api.url]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"dlforge: run '{RUN_ID}'") and said in err, err
    assert api.paths == [f"/runs/{RUN_ID}"] and not out.exists()


def test_a_download_cut_off_mid_body_is_refused_and_nothing_written(api: StandIn, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    api.body, api.cut_after = GOOD, len(GOOD) // 3
    out = tmp_path / "out" / "b.zip"
    assert main(["bundle", RUN_ID, "-o", str(out), "--url", api.url]) == 2
    assert api.paths == [f"/runs/{RUN_ID}", BUNDLE_PATH]  # the API was reached: it is the body that was cut
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"dlforge: the bundle of run '{RUN_ID}' did not arrive whole"), err
    assert f"nothing was written to {out}" in err, err
    assert not out.exists() and not list(tmp_path.rglob("*.partial"))


def test_a_failed_download_leaves_another_downloads_partial_file_alone(
        api: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each call streams to a file of its own: a second download to the same FILE that fails must not delete
    the first one's file while it is still being written."""
    out = tmp_path / "out" / "b.zip"
    out.parent.mkdir()
    others = [out.with_name(out.name + ".partial"), out.with_name(f".{out.name}.abc123.partial")]
    for other in others:
        other.write_bytes(b"another download, half way")
    api.body, api.cut_after = GOOD, len(GOOD) // 3
    assert main(["bundle", RUN_ID, "-o", str(out), "--url", api.url]) == 2
    assert "did not arrive whole" in one_line(capsys.readouterr().err)
    assert sorted(tmp_path.rglob("*.partial")) == sorted(others)
    assert all(o.read_bytes() == b"another download, half way" for o in others) and not out.exists()


def test_a_failed_disk_write_leaves_no_partial_file(api: StandIn, tmp_path: Path) -> None:
    """The command in a process whose files may not grow past 64 KiB (RLIMIT_FSIZE; Python ignores SIGXFSZ, so
    the write fails with EFBIG as on a full disk) is given a 256 KiB bundle."""
    api.body = GOOD
    limit = 64 * 1024
    out = tmp_path / "out" / "b.zip"

    # the limit is set in the child itself: preexec_fn is unsafe beside the stand-in API's server thread
    child = ("import resource, runpy, sys; "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
             "sys.argv = ['dlforge', *sys.argv[1:]]; runpy.run_module('dlforge.cli.main', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", child, "bundle", RUN_ID, "-o", str(out), "--url", api.url],
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    err = one_line(run.stderr)
    assert err.startswith(f"dlforge: cannot write the bundle of run '{RUN_ID}' to {out}"), err
    assert "File too large" in err, err
    assert not out.exists() and not list(tmp_path.rglob("*.partial"))
    assert api.paths == [f"/runs/{RUN_ID}", BUNDLE_PATH]
