"""Services and accounts: the split deployment's token introspection, the project map fed by
``dataset.uploaded``, and the command line (`dlforge admin`, `dlforge up`)."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from auth_testkit import PASSWORD, bearer, cells_zip, create_accounts
from pydantic import SecretStr

from dlforge.cli.admin import create_token
from dlforge.cli.main import main as dlforge
from dlforge.common.auth import routes as auth_routes
from dlforge.common.auth.store import AuthStore
from dlforge.common.docs.sqlite import SqliteDocumentStore
from dlforge.common.events import DatasetUploaded, Event, RunDeleted, Spec
from dlforge.common.runtime import Backends, Worker
from dlforge.common.settings import CommonSettings, load_settings
from dlforge.console.app import create_app as console_app
from dlforge.labeler.app import create_app as labeler_app
from dlforge.labeler.settings import LabelerSettings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def console(auth_settings: CommonSettings) -> Iterator[str]:
    """The console service (accounts, /auth) served by uvicorn on 127.0.0.1: its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(console_app(auth_settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the console service did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


async def test_a_service_verifies_tokens_through_the_console_service(
        auth_settings: CommonSettings, console: str, tmp_path: Path) -> None:
    tokens = await create_accounts(auth_settings, {"otto": {"default": "operator"}, "lars": {"default": "labeler"}})
    service_token, _ = await create_token(auth_settings, "svc-labeler", project=None, role=None, name="labeler",
                                          expires_days=None, service=True)
    # the labeler has its own document store: it can only learn about tokens by asking the console service
    (tmp_path / "labeler").mkdir()
    own = {**auth_settings.model_dump(), "docs": f"sqlite:///{tmp_path}/labeler/docs.db",
           "objects": f"file://{tmp_path}/labeler/objects", "auth_url": console,
           "auth_service_token": service_token, "auth_cache_seconds": 0,
           "labeler_import_roots": [str(tmp_path / "imports")]}
    app = labeler_app(LabelerSettings(**own))
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://labeler") as labeler, \
            httpx.AsyncClient(base_url=console) as accounts:
        assert (await labeler.get("/datasets", headers=bearer(tokens["lars"]))).status_code == 200
        assert (await labeler.get("/datasets", headers=bearer("dlf_forged"))).status_code == 401
        # an id no run or dataset can have is unknown at the console too: the labeler's own 404
        assert (await labeler.get("/datasets/no%20such%20id", headers=bearer(tokens["lars"]))).status_code == 404
        assert (await labeler.get("/datasets")).status_code == 401
        refused = await labeler.post("/datasets", headers=bearer(tokens["lars"]),
                                     files={"file": ("c.zip", cells_zip())})
        assert refused.status_code == 403
        made = await labeler.post("/datasets", headers=bearer(tokens["otto"]),
                                  files={"file": ("c.zip", cells_zip())},
                                  data={"dataset_id": "ds-s", "run_id": "run-s"})
        assert made.status_code == 201, made.text
        # the new dataset's project was recorded with the console service before the 201
        known = await accounts.get("/auth/resources/dataset/ds-s", headers=bearer(service_token))
        assert known.status_code == 200 and known.json()["project"] == "default"
        # the service token may introspect, and nothing else; a user token may not introspect
        assert (await labeler.get("/datasets", headers=bearer(service_token))).status_code == 403
        assert (await accounts.post("/auth/introspect", headers=bearer(tokens["otto"]),
                                    json={"token": tokens["lars"]})).status_code == 403
        looked = await accounts.post("/auth/introspect", headers=bearer(service_token), json={"token": tokens["lars"]})
        assert looked.json()["active"] is True and looked.json()["principal"]["name"] == "lars"
        # a token revoked at the console service stops working at the labeler (cache 0 s here)
        mine = (await accounts.get("/auth/tokens", headers=bearer(tokens["otto"]))).json()
        assert (await accounts.delete(f"/auth/tokens/{mine[0]['token_id']}",
                                      headers=bearer(tokens["otto"]))).status_code == 200
        assert (await labeler.get("/datasets", headers=bearer(tokens["otto"]))).status_code == 401
    tables = {t for (t,) in sqlite3.connect(tmp_path / "labeler" / "docs.db").execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not {t for t in tables if t.startswith("c_auth_users") or t.startswith("c_auth_tokens")}


async def test_a_wrong_service_token_is_a_503_not_a_pass(auth_settings: CommonSettings, console: str,
                                                         tmp_path: Path) -> None:
    tokens = await create_accounts(auth_settings, {"otto": {"default": "operator"}})
    settings = {**auth_settings.model_dump(), "docs": f"sqlite:///{tmp_path}/other.db", "auth_url": console,
                "auth_service_token": "dlf_not-a-service-token"}
    app = labeler_app(LabelerSettings(**settings))
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://labeler") as labeler:
        r = await labeler.get("/datasets", headers=bearer(tokens["otto"]))
        assert r.status_code == 503 and "DLFORGE_AUTH_SERVICE_TOKEN" in r.json()["detail"]


def test_the_auth_url_needs_a_service_token() -> None:
    with pytest.raises(Exception, match="DLFORGE_AUTH_SERVICE_TOKEN"):
        load_settings(auth_url="http://console:8000")
    with pytest.raises(Exception, match="DLFORGE_AUTH_URL"):
        load_settings(auth_url="ftp://console", auth_service_token="x")


async def test_the_project_map_follows_dataset_uploaded_and_run_deleted(auth_settings: CommonSettings) -> None:
    backends = Backends.from_settings(auth_settings)
    await backends.start()
    stop = asyncio.Event()
    worker = Worker(auth_routes.service, backends, deps=None)
    task = asyncio.create_task(worker.run(stop))
    store = AuthStore(backends.docs)

    def uploaded(dataset_id: str, project: str) -> DatasetUploaded:
        return DatasetUploaded(dataset_id=dataset_id, name="n", item_count=1, classes=["a"], labeled_count=0,
                               rejected_count=0, duplicate_count=0, manifest_key="k", spec=Spec(), project=project)

    async def until(what: str, probe: object) -> None:
        deadline = time.monotonic() + 30
        while not await probe():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"not reached: {what}"
            await asyncio.sleep(0.02)

    try:
        await backends.publish(Event.new(uploaded("ds-1", "line-4"), run_id="run-1"))
        await until("run-1 mapped", lambda: _is(store, "run", "run-1", "line-4"))
        assert await store.project_of("dataset", "ds-1") == "line-4"
        # the same run id from another project does not move it
        await backends.publish(Event.new(uploaded("ds-2", "other"), run_id="run-1"))
        await until("ds-2 mapped", lambda: _is(store, "dataset", "ds-2", "other"))
        assert await store.project_of("run", "run-1") == "line-4"
        await backends.publish(Event.new(RunDeleted(dataset_id="ds-1"), run_id="run-1"))
        await until("run-1 forgotten", lambda: _is(store, "run", "run-1", None))
        assert await store.project_of("dataset", "ds-1") is None
    finally:
        stop.set()
        await task
        await backends.stop()


async def _is(store: AuthStore, kind: str, resource_id: str, project: str | None) -> bool:
    return await store.project_of(kind, resource_id) == project


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


def test_cli_create_user_and_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DLFORGE_AUTH", "required")
    state = tmp_path / "state"
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    assert dlforge(["admin", "create-user", "lars", "--project", "line-4", "--role", "labeler",
                    "--workdir", str(state)]) == 0
    assert PASSWORD not in capsys.readouterr().out
    assert dlforge(["admin", "create-token", "lars", "--project", "line-4", "--role", "labeler", "--name", "bench",
                    "--expires-days", "2", "--workdir", str(state)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("dlf_") and len(token) > 40
    # more than the user holds: refused, exit 2
    assert dlforge(["admin", "create-token", "lars", "--project", "line-4", "--role", "operator",
                    "--workdir", str(state)]) == 2
    assert "cannot have more than its user" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert dlforge(["admin", "create-user", "bob", "--role", "viewer", "--workdir", str(state)]) == 2
    assert "no password" in capsys.readouterr().err

    async def check() -> None:
        docs = SqliteDocumentStore(state / "docs.db")
        store = AuthStore(docs)
        principal = await store.resolve(token)
        assert principal is not None and principal.name == "lars" and dict(principal.grants) == {"line-4": "labeler"}
        assert await store.check_password("lars", PASSWORD) is not None
        assert await store.check_password("bob", PASSWORD) is None
        await docs.close()

    asyncio.run(check())


def _env(**extra: str) -> dict[str, str]:
    paths = [str(p) for p in sorted((ROOT / "libs").glob("*/src")) + sorted((ROOT / "services").glob("*/src"))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]), **extra}


def test_dlforge_up_refuses_a_bad_auth_setting(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dlforge.cli.main", "up"], env=_env(DLFORGE_AUTH="maybe"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "DLFORGE_AUTH" in done.stderr and "'required' or 'off'" in done.stderr


def test_dlforge_up_creates_the_local_admin_once(tmp_path: Path) -> None:
    """The first start prints the admin's password; signing in with it works; a second start prints none."""
    port = free_port()
    env = _env(DLFORGE_AUTH="required", DLFORGE_HTTP_PORT=str(port), DLFORGE_BUS="memory://",
               DLFORGE_DOCS=f"sqlite:///{tmp_path}/docs.db", DLFORGE_OBJECTS=f"file://{tmp_path}/objects",
               DLFORGE_WORK_DIR=str(tmp_path / "work"), DLFORGE_PROPOSER_BUILD_ON_START="false",
               DLFORGE_PROPOSER_FASHION_MNIST_DIR=str(tmp_path / "none"),
               DLFORGE_PROPOSER_MNIST_PATH=str(tmp_path / "none.pkl.gz"))
    for start in (1, 2):
        proc = subprocess.Popen([sys.executable, "-m", "dlforge.cli.main", "up"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "dlforge up did not answer"
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            proc.terminate()
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        if start == 1:
            assert f"{base}/console/" in out and "user 'admin'" in out, out
            password = out.split("with password '", 1)[1].split("'", 1)[0]
            assert len(password) >= 12
        else:
            assert "password" not in out, out

    async def check() -> None:
        docs = SqliteDocumentStore(tmp_path / "docs.db")
        user = await AuthStore(docs).check_password("admin", password)
        assert user is not None and user["grants"] == {"*": "admin"}
        await docs.close()

    asyncio.run(check())


def test_the_console_accepts_the_shared_service_token(auth_settings: CommonSettings) -> None:
    """The deployments give every service one secret (DLFORGE_AUTH_SERVICE_TOKEN): the console service takes it
    as the service principal, which may introspect and nothing else."""
    from fastapi.testclient import TestClient

    shared = "a-shared-secret-of-the-deployment-0123456789"
    tokens = asyncio.run(create_accounts(auth_settings, {"lars": {"default": "labeler"}}))
    app = console_app(auth_settings.model_copy(update={"auth_service_token": SecretStr(shared)}))
    with TestClient(app) as client:
        me = client.get("/auth/me", headers=bearer(shared))
        assert me.status_code == 200 and me.json()["kind"] == "service" and me.json()["projects"] == {}
        looked = client.post("/auth/introspect", headers=bearer(shared), json={"token": tokens["lars"]})
        assert looked.status_code == 200 and looked.json()["principal"]["projects"] == {"default": "labeler"}
        assert client.post("/auth/introspect", headers=bearer(shared + "x"), json={"token": "x"}).status_code == 401
        assert client.get("/auth/users", headers=bearer(shared)).status_code == 403


def test_the_sdk_sends_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.sdk.transports import HttpTransport

    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer dlf_given":
            return httpx.Response(401, json={"detail": "the bearer token is unknown, revoked or expired"})
        return httpx.Response(202, json={"job_id": "j1"})

    transport = httpx.MockTransport(answer)
    assert HttpTransport(client=httpx.Client(transport=transport, base_url="http://t"), token="dlf_given") \
        .submit({}) == "j1"
    monkeypatch.setenv("DLFORGE_TOKEN", "dlf_given")
    assert HttpTransport(client=httpx.Client(transport=transport, base_url="http://t")).submit({}) == "j1"
    monkeypatch.setenv("DLFORGE_TOKEN", "dlf_wrong")
    with pytest.raises(PermissionError, match="DLFORGE_TOKEN"):
        HttpTransport(client=httpx.Client(transport=transport, base_url="http://t")).submit({})
    assert seen == ["Bearer dlf_given", "Bearer dlf_given", "Bearer dlf_wrong"]


async def test_audit_entries_answered_together_are_written_together(tmp_path: Path) -> None:
    from dlforge.common.auth.enforcement import AuditWriter

    docs = SqliteDocumentStore(tmp_path / "docs.db")
    store = AuthStore(docs)
    writer = AuditWriter(store)
    await asyncio.gather(*(writer.write({"who": f"u{i}", "route": "POST /labels", "status": 202}) for i in range(20)))
    await writer.write({"who": "last", "route": "POST /labels", "status": 202})
    rows = await docs.find("auth_audit")
    assert len(rows) == 2 and sorted(len(r["entries"]) for r in rows) == [1, 20]  # one write per group
    newest_first = [e["who"] for e in await store.audit_entries(limit=100)]
    assert newest_first == ["last", *(f"u{i}" for i in reversed(range(20)))]
    assert [e["who"] for e in await store.audit_entries(user="u3")] == ["u3"]
    await docs.close()


async def test_a_busy_auth_service_is_never_taken_for_an_inactive_token() -> None:
    from dlforge.common.auth.authenticator import IntrospectingAuthenticator
    from dlforge.common.errors import RetryableError

    answers = {"status": 429}
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if answers["status"] != 200:
            return httpx.Response(answers["status"], json={"detail": "too many requests"})
        if request.url.path == "/auth/introspect":
            return httpx.Response(200, json={"active": True, "principal": {
                "name": "lars", "token_id": "t1", "kind": "user", "projects": {"default": "labeler"},
                "expires_at": None}})
        return httpx.Response(200, json={"kind": "run", "id": "r1", "project": "p"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://auth")
    authenticator = IntrospectingAuthenticator("http://auth", "dlf_service", cache_seconds=60, client=client)
    for status in (429, 418, 500):
        answers["status"] = status
        with pytest.raises(RetryableError):
            await authenticator.authenticate("dlf_user")
        with pytest.raises(RetryableError):
            await authenticator.project_of("run", "r1")
        with pytest.raises(RetryableError):
            await authenticator.register("run", "r1", "p")
    answers["status"] = 200  # nothing of the refusals was kept: the next answer is the real one
    principal = await authenticator.authenticate("dlf_user")
    assert principal is not None and principal.name == "lars"
    assert await authenticator.project_of("run", "r1") == "p"
    assert calls.count("POST /auth/introspect") == 4
    await client.aclose()


def test_a_retryable_failure_answers_503(auth_settings: CommonSettings) -> None:
    from fastapi.testclient import TestClient

    from dlforge.cli.platform import service_parts
    from dlforge.common.app import create_app
    from dlforge.common.errors import RetryableError

    tokens = asyncio.run(create_accounts(auth_settings, {"vera": {"default": "viewer"}}))
    app = create_app(service_parts(), settings=auth_settings, mount_prefix=True, run_workers=False, title="dlforge")
    with TestClient(app) as client:
        async def busy(kind: str, resource_id: str) -> str | None:
            raise RetryableError("the auth service failed or is busy (429)")

        app.state.auth.authenticator.project_of = busy
        r = client.get("/runs/run-1", headers=bearer(tokens["vera"]))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "busy" in r.json()["detail"]


def test_services_are_not_rate_limited(auth_settings: CommonSettings) -> None:
    from fastapi.testclient import TestClient

    from dlforge.cli.platform import service_parts
    from dlforge.common.app import create_app

    settings = auth_settings.model_copy(update={"auth_rate": 0.01, "auth_burst": 2,
                                                "auth_service_token": SecretStr("dlf_shared-service-secret")})
    app = create_app(service_parts(), settings=settings, mount_prefix=True, run_workers=False, title="dlforge")
    with TestClient(app) as client:
        statuses = {client.post("/auth/introspect", headers=bearer("dlf_shared-service-secret"),
                                json={"token": "dlf_x"}).status_code for _ in range(10)}
        assert statuses == {200}


async def _sse_events(lines: Any) -> Any:
    """(event, data) of each server-sent event of a response's lines (comments skipped)."""
    name, data = "message", []
    async for line in lines:
        if line == "":
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())


async def test_a_revoked_token_stops_receiving_the_run_stream(auth_settings: CommonSettings,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from dlforge.cli.platform import service_parts
    from dlforge.common import runs
    from dlforge.common.app import create_app
    from dlforge.common.auth import enforcement

    monkeypatch.setattr(runs, "STREAM_RECHECK_SECONDS", 0.2)
    monkeypatch.setattr(enforcement, "MAX_STREAMS", 2)
    tokens = await create_accounts(auth_settings, {"vera": {"default": "viewer"}})
    docs = SqliteDocumentStore(Path(auth_settings.docs.removeprefix("sqlite:///")))
    await docs.insert("runs_view", {"_id": "run-live", "run_id": "run-live", "state": "running", "stages": {},
                                    "events": [], "counts": {}})
    await docs.close()
    port = free_port()
    app = create_app(service_parts(), settings=auth_settings, mount_prefix=True, run_workers=False, title="dlforge")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and not task.done(), "the app did not start"
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            vera = bearer(tokens["vera"])
            made = await client.post("/auth/tokens", headers=vera, json={"name": "watch"})
            watch = made.json()
            seen: list[tuple[str, dict[str, Any]]] = []
            async with client.stream("GET", "/runs/run-live/stream", headers=bearer(watch["token"])) as response, \
                    client.stream("GET", "/runs/run-live/stream", headers=vera) as second:
                assert response.status_code == 200 and second.status_code == 200
                # a third stream of vera's while two are open: refused
                third = await client.get("/runs/run-live/stream", headers=vera)
                assert third.status_code == 429 and "2 event streams" in third.json()["detail"], third.text
                started = None
                async with asyncio.timeout(15):  # fails, rather than hangs, if the stream went on
                    async for name, data in _sse_events(response.aiter_lines()):
                        seen.append((name, json.loads(data)))
                        if len(seen) == 1:
                            revoked = await client.delete(f"/auth/tokens/{watch['token_id']}", headers=vera)
                            assert revoked.status_code == 200
                            started = time.monotonic()
                assert started is not None and time.monotonic() - started < 10  # ended by itself, soon
            assert seen[0][0] == "run" and seen[-1] == ("end", {"state": "unauthorized"})
            # the streams closed: their slots are free again (counted down when each generator ends)
            deadline = time.monotonic() + 10
            while app.state.auth.streams:
                assert time.monotonic() < deadline, app.state.auth.streams
                await asyncio.sleep(0.05)
    finally:
        server.should_exit = True
        await task
