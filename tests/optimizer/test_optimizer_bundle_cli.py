"""``dlforge bundle RUN_ID -o FILE`` against a served API (auth required): the run's bundle, and clear errors."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import uvicorn
from accounts import create_accounts
from bundle_testdata import stored_bundle
from optimizer_testdata import Optimized

from dlforge.cli.main import main
from dlforge.common.app import create_app
from dlforge.common.runs import RUNS


@pytest.fixture
def api(optimized: Optimized, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Optimized,
                                                                                                  dict[str, str]]]:
    """The optimizer, the run view and accounts on a copy of the optimized state, served on 127.0.0.1."""
    from dlforge.common import runs
    from dlforge.common.auth import routes as auth_routes
    from dlforge.common.runtime import Backends
    from dlforge.optimizer.app import part

    monkeypatch.setenv("DLFORGE_AUTH", "required")
    mine = replace(optimized, root=tmp_path / "state")
    shutil.copytree(optimized.root, mine.root)
    settings = mine.settings(auth="required")
    tokens = asyncio.run(create_accounts(settings.docs, {"vera": {"default": "viewer"}}))

    async def early_run() -> None:  # a run still training: no model yet
        backends = Backends.from_settings(mine.settings())
        await backends.start()
        await backends.docs.upsert(RUNS, {
            "_id": "run-early", "run_id": "run-early", "dataset_id": "ds1", "state": "running", "events": [],
            "counts": {}, "stages": {"labeler": {"state": "succeeded"}, "trainer": {"state": "running"},
                                     "optimizer": {"state": "pending"}}})
        await backends.stop()

    asyncio.run(early_run())
    app = create_app([part(), runs.part(), auth_routes.part()], settings=settings, mount_prefix=True,
                     run_workers=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the API did not start"
    try:
        yield f"http://127.0.0.1:{port}", mine, tokens
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_dlforge_bundle_downloads_the_runs_bundle(api: tuple[str, Optimized, dict[str, str]], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url, mine, tokens = api
    stored = stored_bundle(mine, tmp_path / "stored.zip").read_bytes()
    monkeypatch.setenv("DLFORGE_TOKEN", tokens["vera"])
    out = tmp_path / "out" / "bundle.zip"
    assert main(["bundle", mine.run_id, "-o", str(out), "--url", url]) == 0
    assert out.read_bytes() == stored
    said = capsys.readouterr().out
    assert f"written to {out}" in said and hashlib.sha256(stored).hexdigest() in said
    assert f"variant {mine.chosen_variant}" in said
    assert not list(out.parent.glob("*.partial"))

    def refused(run_id: str, message: str, *, to: Path = tmp_path / "x.zip") -> None:
        assert main(["bundle", run_id, "-o", str(to), "--url", url]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert to.is_dir() or not to.exists()

    refused("run-none", "unknown run 'run-none'")
    refused("run-early", "run 'run-early' has no model yet: it is running and its optimizer stage is pending; "
                         "stage trainer is running")
    refused("../etc", "RUN_ID '../etc' is not a run id")
    refused(mine.run_id, "-o " + str(tmp_path) + ": a folder", to=tmp_path)
    monkeypatch.delenv("DLFORGE_TOKEN")
    refused(mine.run_id, "the API refused the request (401")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert main(["bundle", mine.run_id, "-o", str(tmp_path / "y.zip"), "--url", f"http://127.0.0.1:{closed}"]) == 2
    assert f"cannot reach the dlforge API at http://127.0.0.1:{closed}" in capsys.readouterr().err


def test_demo_and_run_write_the_bundle_beside_their_report_and_name_it(tmp_path: Path) -> None:
    from dlforge.cli.main import bundle_path
    from dlforge.common.report import format_text

    assert bundle_path("reports/demo.json", tmp_path) == Path("reports/demo-bundle.zip")
    assert bundle_path(None, tmp_path / "state") == tmp_path / "state" / "bundle.zip"
    report = {"run_id": "r1", "state": "succeeded", "stages": {},
              "bundle": {"file": "reports/demo-bundle.zip", "bytes": 3 * 2**20, "sha256": "ab" * 32,
                         "variant": "onnx_int8", "model_id": "m1"}}
    text = format_text(report)
    assert ("model bundle: reports/demo-bundle.zip (onnx_int8, 3.0 MiB, sha256 abababababababab…); run it anywhere: "
            "dlforge-edge predict reports/demo-bundle.zip IMAGE...") in text.splitlines()
    failed = format_text({**report, "bundle": {"file": None, "error": "run 'r1' has no model bundle: gone"}})
    assert "model bundle: NOT written: run 'r1' has no model bundle: gone" in failed.splitlines()
