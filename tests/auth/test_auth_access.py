"""Access to the combined app of `dlforge up` with DLFORGE_AUTH=required: who may do what, in which project.

The app runs without its workers (nothing here needs a pipeline run): requests reach the routes and
their checks, and the answers are compared with the role table of the issue (viewer < labeler <
operator < admin; reads viewer, labels labeler, starting a run operator, rebuilding and accounts admin).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from auth_testkit import PASSWORD, ROLE_USERS, bearer, cells_zip, docs_path, seed_accounts
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dlforge.cli.platform import service_parts
from dlforge.common.app import create_app
from dlforge.common.settings import CommonSettings


def combined(settings: CommonSettings) -> FastAPI:
    return create_app(service_parts(), settings=settings, mount_prefix=True, run_workers=False, title="dlforge")


def upload(client: TestClient, token: str, *, project: str = "default", **fields: str) -> Any:
    return client.post("/labeler/datasets", headers=bearer(token),
                       files={"file": ("cells.zip", cells_zip(), "application/zip")},
                       data={"project": project, **fields})


# ------------------------------------------------------------------------------------------------
# tokens and passwords at rest; signing in
# ------------------------------------------------------------------------------------------------


def test_passwords_and_tokens_are_stored_only_as_hashes(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"ada": {"*": "admin"}})
    with TestClient(combined(auth_settings)) as client:
        login = client.post("/auth/login", json={"username": "ada", "password": PASSWORD})
        assert login.status_code == 200, login.text
        session = login.json()["token"]
        made = client.post("/auth/tokens", headers=bearer(session), json={"name": "ci"})
        assert made.status_code == 201, made.text
        api = made.json()["token"]
    raw = Path(docs_path(auth_settings)).read_bytes()
    for wal in Path(docs_path(auth_settings)).parent.glob("docs.db-wal"):
        raw += wal.read_bytes()
    for secret in (PASSWORD, tokens["ada"], session, api):
        assert secret.encode() not in raw, "a secret is stored in the clear"
    db = sqlite3.connect(docs_path(auth_settings))
    users = dict(db.execute("SELECT id, json_extract(body, '$.password_hash') FROM c_auth_users").fetchall())
    assert users["ada"].startswith("$argon2id$")
    hashes = {h for (h,) in db.execute("SELECT json_extract(body, '$.hash') FROM c_auth_tokens")}
    assert {hashlib.sha256(t.encode()).hexdigest() for t in (tokens["ada"], session, api)} <= hashes


def test_login_right_and_wrong(auth_settings: CommonSettings) -> None:
    seed_accounts(auth_settings, {"lars": {"default": "labeler"}})
    with TestClient(combined(auth_settings)) as client:
        before = datetime.now(UTC)
        ok = client.post("/auth/login", json={"username": "lars", "password": PASSWORD})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["user"] == {"name": "lars", "projects": {"default": "labeler"}, "disabled": False,
                                "service": False, "created_at": body["user"]["created_at"]}
        expires = datetime.fromisoformat(body["expires_at"])
        assert before + timedelta(hours=12) - timedelta(seconds=5) <= expires <= datetime.now(UTC) + timedelta(hours=12)
        me = client.get("/auth/me", headers=bearer(body["token"]))
        assert me.status_code == 200 and me.json()["name"] == "lars" and me.json()["projects"] == {"default": "labeler"}
        for wrong in ({"username": "lars", "password": "not the password"},
                      {"username": "nobody", "password": PASSWORD}):
            refused = client.post("/auth/login", json=wrong)
            assert refused.status_code == 401, refused.text
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
            assert "token" not in refused.json()
        # sign-out revokes the session token at once
        assert client.post("/auth/logout", headers=bearer(body["token"])).status_code == 200
        assert client.get("/auth/me", headers=bearer(body["token"])).status_code == 401


def test_an_expired_or_revoked_token_is_refused(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"ada": {"*": "admin"}, "otto": {"default": "operator"}})
    with TestClient(combined(auth_settings)) as client:
        made = client.post("/auth/tokens", headers=bearer(tokens["otto"]), json={"name": "short", "expires_days": 1})
        assert made.status_code == 201
        short = made.json()
        assert client.get("/runs", headers=bearer(short["token"])).status_code == 200
        # ada (admin of every project) revokes otto's token
        assert client.delete(f"/auth/tokens/{short['token_id']}", headers=bearer(tokens["ada"])).status_code == 200
        gone = client.get("/runs", headers=bearer(short["token"]))
        assert gone.status_code == 401 and 'error="invalid_token"' in gone.headers["WWW-Authenticate"]
    db = sqlite3.connect(docs_path(auth_settings))  # an expiry in the past: the token is refused
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    db.execute("UPDATE c_auth_tokens SET body = json_set(body, '$.expires_at', ?) WHERE "
               "json_extract(body, '$.user') = 'otto'", (past,))
    db.commit()
    with TestClient(combined(auth_settings)) as client:
        assert client.get("/runs", headers=bearer(tokens["otto"])).status_code == 401


# ------------------------------------------------------------------------------------------------
# roles
# ------------------------------------------------------------------------------------------------

# (action, the lowest role that may) — the table
MATRIX = {"read": "viewer", "label": "labeler", "start run": "operator", "admin": "admin"}
RANK = ["viewer", "labeler", "operator", "admin"]


def test_role_matrix(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {name: {"default": r} for name, r in ROLE_USERS.items()})
    with TestClient(combined(auth_settings)) as client:
        outcome: dict[tuple[str, str], int] = {}
        for name, held in ROLE_USERS.items():
            t = tokens[name]
            outcome[(held, "read")] = client.get("/runs", headers=bearer(t)).status_code
            outcome[(held, "label")] = client.post(
                "/labeler/labels", headers=bearer(t),
                json={"dataset_id": "ds-none", "batch_id": "b1", "labels": {"i1": "good"}}).status_code
            outcome[(held, "start run")] = upload(client, t, dataset_id=f"ds-{name}").status_code
            outcome[(held, "admin")] = client.get("/auth/users", headers=bearer(t)).status_code
            if held != "admin":  # the repository rebuild is admin's; not started here
                assert client.post("/proposer/models/rebuild", headers=bearer(t)).status_code == 403
    for (held, action), status in outcome.items():
        allowed = RANK.index(held) >= RANK.index(MATRIX[action])
        if allowed:
            # label: the dataset does not exist (404) — past the role check; start run: created
            expected = {"read": 200, "label": 404, "start run": 201}.get(action, 403)
            if action == "admin":
                expected = 403  # admin of 'default' only: user administration needs every project ('*')
            assert status == expected, (held, action, status)
        else:
            assert status == 403, (held, action, status)


def test_a_labeler_token_cannot_start_a_run(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"lars": {"default": "labeler"}, "ada": {"*": "admin"}})
    with TestClient(combined(auth_settings)) as client:
        refused = upload(client, tokens["lars"])
        assert refused.status_code == 403, refused.text
        assert "needs operator" in refused.json()["detail"]
        assert client.get("/labeler/datasets", headers=bearer(tokens["ada"])).json() == []  # nothing written
        assert client.get("/auth/users", headers=bearer(tokens["ada"])).status_code == 200


def test_no_token_gives_401_on_every_write_endpoint(auth_settings: CommonSettings) -> None:
    """Walk the combined app's OpenAPI: every operation but GET is tried without a token and with a bad one."""
    seed_accounts(auth_settings, {"ada": {"*": "admin"}})
    with TestClient(combined(auth_settings)) as client:
        doc = client.get("/openapi.json").json()
        tried = []
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if method not in ("post", "put", "patch", "delete"):
                    continue
                url = re.sub(r"\{[^}]+\}", "x1", path)
                if op.get("x-dlforge-role") == "public":
                    assert path == "/auth/login"
                    continue
                assert {"401", "403", "429"} <= set(op["responses"]), f"{method} {path} does not document them"
                for headers in ({}, {"Authorization": "Bearer dlf_not-a-token"}, {"Authorization": "Basic eDp5"}):
                    r = client.request(method.upper(), url, headers=headers, json={})
                    assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                    assert r.json()["detail"]
                tried.append(f"{method.upper()} {path}")
    assert len(tried) >= 15 and "POST /labeler/datasets" in tried and "POST /labeler/labels" in tried \
        and "DELETE /runs/{run_id}" in tried and "POST /proposer/models/rebuild" in tried, tried


def test_the_rate_limit_answers_429_after_the_burst(auth_settings: CommonSettings) -> None:
    settings = auth_settings.model_copy(update={"auth_rate": 0.01, "auth_burst": 5})
    tokens = seed_accounts(settings, {"vera": {"default": "viewer"}, "otto": {"default": "operator"}})
    with TestClient(combined(settings)) as client:
        statuses = [client.get("/runs", headers=bearer(tokens["vera"])).status_code for _ in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        limited = client.get("/runs", headers=bearer(tokens["vera"]))
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert "too many requests" in limited.json()["detail"]
        assert client.get("/runs", headers=bearer(tokens["otto"])).status_code == 200  # per token
        assert client.get("/healthz").status_code == 200  # open paths are not limited


def test_open_paths_need_no_token(auth_settings: CommonSettings) -> None:
    with TestClient(combined(auth_settings)) as client:
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/redoc", "/console/"):
            assert client.get(path).status_code in (200, 503), path
        assert client.get("/", follow_redirects=False).status_code == 307
        assert client.get("/runs").status_code == 401
        assert client.get("/nowhere").status_code == 401  # unknown paths are not told apart without a token


@pytest.mark.parametrize("bad", [{"project": "no spaces"}, {"project": "../x"}, {"project": ""}, {"project": "x" * 65}])
def test_a_bad_project_name_is_refused(auth_settings: CommonSettings, bad: dict[str, str]) -> None:
    tokens = seed_accounts(auth_settings, {"ada": {"*": "admin"}})
    with TestClient(combined(auth_settings)) as client:
        r = client.post("/labeler/datasets", headers=bearer(tokens["ada"]), json={"folder": "/tmp", **bad})
        assert r.status_code == 422, r.text
        assert "project" in r.text


def test_account_names_are_validated(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"ada": {"*": "admin"}})
    with TestClient(combined(auth_settings)) as client:
        for body in ({"name": "bad name", "password": PASSWORD}, {"name": "simulated", "password": PASSWORD},
                     {"name": "bob", "password": "short"}, {"name": "bob", "password": PASSWORD,
                                                            "projects": {"a/b": "viewer"}},
                     {"name": "bob", "password": PASSWORD, "projects": {"p": "owner"}}):
            r = client.post("/auth/users", headers=bearer(tokens["ada"]), json=body)
            assert r.status_code == 422, (body, r.text)
        r = client.post("/auth/tokens", headers=bearer(tokens["ada"]), json={"name": "<script>"})
        assert r.status_code == 422
        ok = client.post("/auth/users", headers=bearer(tokens["ada"]),
                         json={"name": "bob", "password": PASSWORD, "projects": {"line-4": "labeler"}})
        assert ok.status_code == 201 and ok.json()["projects"] == {"line-4": "labeler"}
        assert client.post("/auth/users", headers=bearer(tokens["ada"]),
                           json={"name": "bob", "password": PASSWORD}).status_code == 409


def test_a_token_never_exceeds_its_user(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"lars": {"default": "labeler"}, "ada": {"*": "admin"}})
    with TestClient(combined(auth_settings)) as client:
        over = client.post("/auth/tokens", headers=bearer(tokens["lars"]), json={"projects": {"default": "operator"}})
        assert over.status_code == 403
        narrow = client.post("/auth/tokens", headers=bearer(tokens["lars"]), json={"projects": {"default": "viewer"}})
        assert narrow.status_code == 201
        t = narrow.json()["token"]
        assert client.get("/auth/me", headers=bearer(t)).json()["projects"] == {"default": "viewer"}
        r = client.post("/labeler/labels", headers=bearer(t),
                        json={"dataset_id": "ds-none", "batch_id": "b1", "labels": {"i1": "good"}})
        assert r.status_code == 403  # the token is a viewer's though lars labels
        # lowering lars to viewer lowers his tokens at once
        assert client.put("/auth/users/lars/grants/default", headers=bearer(tokens["ada"]),
                          json={"role": "viewer"}).status_code == 200
        assert client.get("/auth/me", headers=bearer(tokens["lars"])).json()["projects"] == {"default": "viewer"}
        assert client.get("/auth/tokens", headers=bearer(tokens["lars"]), params={"user": "ada"}).status_code == 403


def test_a_limited_token_mints_no_more_than_itself(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"mia": {"p1": "admin", "p2": "operator"}})
    with TestClient(combined(auth_settings)) as client:
        made = client.post("/auth/tokens", headers=bearer(tokens["mia"]),
                           json={"name": "narrow", "projects": {"p2": "viewer"}, "expires_days": 1})
        assert made.status_code == 201, made.text
        narrow = made.json()
        # null projects from the narrow token: its own roles, not mia's (admin of p1); it expires no later
        child = client.post("/auth/tokens", headers=bearer(narrow["token"]), json={"name": "child"})
        assert child.status_code == 201, child.text
        assert child.json()["grants"] == {"p2": "viewer"}
        assert child.json()["expires_at"] is not None
        assert datetime.fromisoformat(child.json()["expires_at"]) <= datetime.fromisoformat(narrow["expires_at"])
        assert client.get("/auth/me", headers=bearer(child.json()["token"])).json()["projects"] == {"p2": "viewer"}
        longer = client.post("/auth/tokens", headers=bearer(narrow["token"]), json={"expires_days": 30}).json()
        assert datetime.fromisoformat(longer["expires_at"]) <= datetime.fromisoformat(narrow["expires_at"])
        # asking for more than the token holds (though mia holds it): 403
        for more in ({"p1": "viewer"}, {"p2": "operator"}):
            refused = client.post("/auth/tokens", headers=bearer(narrow["token"]), json={"projects": more})
            assert refused.status_code == 403, refused.text
        # the narrow token sees and revokes only itself and what it could have made, not mia's full token
        listed = {t["name"] for t in client.get("/auth/tokens", headers=bearer(narrow["token"])).json()}
        assert listed == {"narrow", "child", "api"}, listed
        full = [t for t in client.get("/auth/tokens", headers=bearer(tokens["mia"])).json() if t["name"] == "test"]
        assert len(full) == 1
        assert client.delete(f"/auth/tokens/{full[0]['token_id']}", headers=bearer(narrow["token"])).status_code == 404
        assert client.delete(f"/auth/tokens/{child.json()['token_id']}",
                             headers=bearer(narrow["token"])).status_code == 200
        # the unlimited token still mints tokens with all of mia's roles
        whole = client.post("/auth/tokens", headers=bearer(tokens["mia"]), json={"name": "whole"})
        assert whole.status_code == 201 and whole.json()["grants"] is None and whole.json()["expires_at"] is None


def test_minting_tokens_does_not_raise_the_rate(auth_settings: CommonSettings) -> None:
    settings = auth_settings.model_copy(update={"auth_rate": 0.01, "auth_burst": 5})
    tokens = seed_accounts(settings, {"vera": {"default": "viewer"}, "otto": {"default": "viewer"}})
    with TestClient(combined(settings)) as client:
        minted = [client.post("/auth/tokens", headers=bearer(tokens["vera"]), json={"name": f"m{i}"})
                  for i in range(3)]
        assert [m.status_code for m in minted] == [201] * 3
        ok = 0
        for token in [tokens["vera"]] + [m.json()["token"] for m in minted[:2]]:
            for _ in range(5):
                ok += client.get("/runs", headers=bearer(token)).status_code == 200
        # each token alone may burst 5, vera's tokens together twice that: 3 mints + 7 reads
        assert ok == 2 * 5 - 3, ok
        refused = client.get("/runs", headers=bearer(minted[2].json()["token"]))  # unused, yet refused
        assert refused.status_code == 429 and "the tokens of vera" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert client.get("/runs", headers=bearer(tokens["otto"])).status_code == 200


def test_token_minting_is_limited(auth_settings: CommonSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.common.auth import routes
    monkeypatch.setattr(routes, "MAX_LIVE_TOKENS", 3)
    settings = auth_settings.model_copy(update={"auth_rate": 1000, "auth_burst": 1000})
    tokens = seed_accounts(settings, {"vera": {"default": "viewer"}})
    with TestClient(combined(settings)) as client:
        made = [client.post("/auth/tokens", headers=bearer(tokens["vera"]), json={"name": f"m{i}"}) for i in range(3)]
        assert [m.status_code for m in made] == [201, 201, 409]  # the seeded one is live too
        assert "3 live tokens" in made[2].json()["detail"]
        assert client.delete(f"/auth/tokens/{made[0].json()['token_id']}", headers=bearer(tokens["vera"])).status_code \
            == 200
        assert client.post("/auth/tokens", headers=bearer(tokens["vera"]), json={}).status_code == 201
        monkeypatch.setattr(routes, "MAX_LIVE_TOKENS", 1000)
        statuses = [client.post("/auth/tokens", headers=bearer(tokens["vera"]), json={}).status_code
                    for _ in range(routes.MINT_BURST)]
        assert 429 in statuses  # 4 taken already of the burst
        assert statuses.index(429) == routes.MINT_BURST - 4
        late = client.post("/auth/tokens", headers=bearer(tokens["vera"]), json={})
        assert late.status_code == 429 and int(late.headers["Retry-After"]) >= 1


# ------------------------------------------------------------------------------------------------
# projects
# ------------------------------------------------------------------------------------------------


def test_project_isolation(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"pia": {"p": "operator"}, "quinn": {"q": "operator"},
                                           "vic": {"q": "viewer"}, "ada": {"*": "admin"}})
    with TestClient(combined(auth_settings)) as client:
        made = upload(client, tokens["quinn"], project="q", dataset_id="ds-q", run_id="run-q")
        assert made.status_code == 201, made.text
        assert made.json()["project"] == "q"
        assert upload(client, tokens["pia"], project="p", dataset_id="ds-p", run_id="run-p").status_code == 201
        pia, vic = bearer(tokens["pia"]), bearer(tokens["vic"])
        # p's operator cannot start a run in q, nor read or write q's dataset and run: they look unknown
        assert upload(client, tokens["pia"], project="q").status_code == 403
        assert client.get("/labeler/datasets/ds-q", headers=pia).status_code == 404
        assert client.get("/labeler/datasets/ds-q/queue", headers=pia).status_code == 404
        assert client.post("/runs/run-q/cancel", headers=pia).status_code == 404
        assert client.delete("/runs/run-q", headers=pia).status_code == 404
        assert client.put("/tuner/runs/run-q/tuning", headers=pia, json={}).status_code == 404
        assert client.post("/tuner/studies/dlforge-run-q/stop", headers=pia).status_code == 404
        # a viewer of q may read it but not act on it
        assert client.get("/labeler/datasets/ds-q", headers=vic).status_code == 200
        assert client.post("/runs/run-q/cancel", headers=vic).status_code == 403
        # ids taken in q cannot be reused from p
        assert upload(client, tokens["pia"], project="p", run_id="run-q").status_code == 409
        # a refused upload records no project for its ids: they stay free
        bad = client.post("/labeler/datasets", headers=pia, data={"project": "p", "dataset_id": "ds-x"},
                          files={"file": ("x.zip", b"not a zip", "application/zip")})
        assert bad.status_code == 415, bad.text
        resources = {r for (r,) in sqlite3.connect(docs_path(auth_settings)).execute("SELECT id FROM c_auth_resources")}
        assert resources == {"run:run-q", "dataset:ds-q", "run:run-p", "dataset:ds-p"}
        # lists show only the caller's projects
        listed = {d["dataset_id"]: d["project"] for d in client.get("/labeler/datasets", headers=pia).json()}
        assert listed == {"ds-p": "p"}
        everything = client.get("/labeler/datasets", headers=bearer(tokens["ada"])).json()
        assert {d["dataset_id"] for d in everything} == {"ds-p", "ds-q"}
        # an unknown id stays a 404 for whoever could see it
        assert client.get("/labeler/datasets/ds-none", headers=pia).status_code == 404
        assert client.get("/runs/run-none", headers=pia).status_code == 404


def test_the_audit_log_records_writes(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"otto": {"default": "operator"}, "ada": {"*": "admin"},
                                           "vera": {"default": "viewer"}})
    with TestClient(combined(auth_settings)) as client:
        assert upload(client, tokens["otto"], dataset_id="ds-a", run_id="run-a").status_code == 201
        assert upload(client, tokens["vera"]).status_code == 403
        assert client.post("/runs/run-a/cancel", headers=bearer(tokens["otto"])).status_code == 404  # no run view yet
        client.get("/runs", headers=bearer(tokens["otto"]))  # a read: not audited
        entries = client.get("/auth/audit", headers=bearer(tokens["ada"])).json()
        assert client.get("/auth/audit", headers=bearer(tokens["otto"])).status_code == 403
    seen = [(e["who"], e["route"], e["status"]) for e in reversed(entries)]
    assert seen == [("otto", "POST /labeler/datasets", 201), ("vera", "POST /labeler/datasets", 403),
                    ("otto", "POST /runs/{run_id}/cancel", 404)]
    first = entries[-1]
    assert first["detail"] == {"project": "default", "dataset_id": "ds-a", "run_id": "run-a"}
    assert first["token_id"] and first["method"] == "POST"
    assert entries[0]["path_params"] == {"run_id": "run-a"}


def test_studies_and_training_jobs_are_listed_by_project(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"pia": {"p": "viewer"}, "otto": {"p": "operator", "q": "operator"}})
    with TestClient(combined(auth_settings)) as client:
        for project in ("p", "q"):
            made = upload(client, tokens["otto"], project=project, dataset_id=f"ds-{project}", run_id=f"run-{project}")
            assert made.status_code == 201, made.text
        db = sqlite3.connect(docs_path(auth_settings))  # the tuner's and trainer's records of the two runs
        created = {"p": "2026-01-02", "q": "2026-01-03"}
        for project in ("p", "q"):
            db.execute("CREATE TABLE IF NOT EXISTS c_tuner_studies (id TEXT PRIMARY KEY, version INTEGER, body TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS c_trainer_jobs (id TEXT PRIMARY KEY, version INTEGER, body TEXT)")
            db.execute("INSERT INTO c_tuner_studies VALUES (?, 1, ?)",
                       (f"dlforge-run-{project}", f'{{"run_id": "run-{project}", "state": "running", '
                                                  f'"created_at": "{created[project]}"}}'))
            db.execute("INSERT INTO c_trainer_jobs VALUES (?, 1, ?)",
                       (f"job-{project}", f'{{"run_id": "run-{project}", "kind": "trial", "state": "running", '
                                          f'"created_at": "{created[project]}"}}'))
        for job, project in (("job-api", "p"), ("job-api-q", "q")):  # POST /trainer/jobs: the dataset's project
            db.execute("INSERT INTO c_trainer_jobs VALUES (?, 1, ?)",
                       (job, f'{{"run_id": null, "kind": "api", "project": "{project}", "state": "queued", '
                             '"created_at": "2026-01-05"}'))
        db.commit()
        pia, otto = bearer(tokens["pia"]), bearer(tokens["otto"])
        assert [s["_id"] for s in client.get("/tuner/studies", headers=pia).json()] == ["dlforge-run-p"]
        assert [s["_id"] for s in client.get("/tuner/studies", headers=otto).json()] == ["dlforge-run-q",
                                                                                         "dlforge-run-p"]
        assert [j["_id"] for j in client.get("/trainer/jobs", headers=pia).json()] == ["job-api", "job-p"]
        assert client.get("/tuner/studies/dlforge-run-q", headers=pia).status_code == 404


def test_an_unregistered_run_is_the_default_projects(auth_settings: CommonSettings) -> None:
    """A run the auth part never registered (made before auth was on) is not open to anyone with some role."""
    import asyncio

    from dlforge.common.docs.sqlite import SqliteDocumentStore

    tokens = seed_accounts(auth_settings, {"pia": {"p": "operator"}, "vera": {"default": "viewer"}})

    async def old_run() -> None:
        docs = SqliteDocumentStore(docs_path(auth_settings))
        await docs.insert("runs_view", {"_id": "run-old", "run_id": "run-old", "state": "running", "stages": {},
                                        "events": [], "counts": {}})
        await docs.close()

    asyncio.run(old_run())
    with TestClient(combined(auth_settings)) as client:
        pia, vera = bearer(tokens["pia"]), bearer(tokens["vera"])
        assert client.get("/runs/run-old", headers=pia).status_code == 404  # p's operator: not his
        assert client.post("/runs/run-old/cancel", headers=pia).status_code == 404
        assert client.get("/runs/run-old", headers=vera).status_code == 200  # the default project's viewer reads it
        assert client.post("/runs/run-old/cancel", headers=vera).status_code == 403  # and may not cancel it


def test_wrong_passwords_slow_down_that_user_name_only(auth_settings: CommonSettings) -> None:
    from dlforge.common.auth import routes
    from dlforge.common.auth.ratelimit import LoginBackoff

    clock = {"now": 1000.0}
    tokens = seed_accounts(auth_settings, {"lars": {"default": "labeler"}, "vera": {"default": "viewer"},
                                           "ada": {"*": "admin"}})
    with TestClient(combined(auth_settings)) as client:
        client.app.state.auth.logins = LoginBackoff(clock=lambda: clock["now"])  # a clock moved by hand
        wrong = {"username": "lars", "password": "not the password"}
        assert [client.post("/auth/login", json=wrong).status_code for _ in range(5)] == [401] * 5
        # the 5th failure in a row: lars waits 1 s, even with the right password
        held = client.post("/auth/login", json={"username": "lars", "password": PASSWORD})
        assert held.status_code == 429 and held.headers["Retry-After"] == "1", held.text
        assert "wrong passwords for lars" in held.json()["detail"]
        # others behind the same address are not held up (10+ bad attempts do not lock the address)
        assert client.post("/auth/login", json={"username": "vera", "password": PASSWORD}).status_code == 200
        clock["now"] += 1.0
        assert client.post("/auth/login", json=wrong).status_code == 401  # the 6th: now 2 s
        clock["now"] += 1.0
        assert client.post("/auth/login", json={"username": "lars", "password": PASSWORD}).status_code == 429
        clock["now"] += 1.0
        assert client.post("/auth/login", json={"username": "lars", "password": PASSWORD}).status_code == 200
        assert client.post("/auth/login", json=wrong).status_code == 401  # a success cleared the count
        # every attempt is audited, never with the password
        entries = client.get("/auth/audit", headers=bearer(tokens["ada"]), params={"limit": 50}).json()
        logins = [(e["who"], e["status"], e["detail"]["outcome"]) for e in entries if e["route"] == "POST /auth/login"]
        assert logins[::-1] == [("lars", 401, "wrong user name or password")] * 5 + [
            ("lars", 429, "user name throttled"), ("vera", 200, "signed in"),
            ("lars", 401, "wrong user name or password"), ("lars", 429, "user name throttled"),
            ("lars", 200, "signed in"), ("lars", 401, "wrong user name or password")]
        assert "not the password" not in str(entries) and PASSWORD not in str(entries)
    assert routes.LOGIN_BURST >= 100  # one address (a proxy) may carry many users' sign-ins


def test_a_token_without_roles_is_refused_everywhere_but_its_own_account(auth_settings: CommonSettings) -> None:
    """Walk every operation of the combined app with a valid token that holds no role: each must answer 403 or
    404 (the role check ran), except the routes declared public or for any signed-in principal."""
    tokens = seed_accounts(auth_settings, {"nobody-much": {}})
    with TestClient(combined(auth_settings)) as client:
        doc = client.get("/openapi.json").json()
        tried, open_to_all = [], []
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if method not in ("get", "post", "put", "patch", "delete"):
                    continue
                if op.get("x-dlforge-role") in ("public", "signed-in") or path.startswith("/console/") \
                        or path in ("/", "/healthz", "/readyz"):
                    open_to_all.append(f"{method.upper()} {path}")
                    continue
                url = re.sub(r"\{[^}]+\}", "x1", path)
                r = client.request(method.upper(), url, headers=bearer(tokens["nobody-much"]), json={})
                assert r.status_code in (403, 404), (method, path, r.status_code, r.text[:300])
                tried.append(f"{method.upper()} {path}")
    assert len(tried) >= 30 and "GET /runs" in tried and "GET /runs/{run_id}/stream" in tried, tried
    assert all(p.startswith(("GET /auth", "POST /auth", "DELETE /auth", "GET /console", "GET /healthz", "GET /readyz",
                             "GET /")) for p in open_to_all), open_to_all


def test_every_route_of_the_combined_app_has_the_authorizer(auth_settings: CommonSettings) -> None:
    """Every API route of the combined app (each part's router and the labeler's root router) runs the
    authorizer: an own dependency, or one of the router it was included with."""
    from fastapi.routing import APIRoute

    from dlforge.common.auth.enforcement import is_open

    def authorizes(dependencies: Any) -> bool:
        return any(getattr(getattr(d, "dependency", None) or getattr(d, "call", None), "__name__", "") == "authorize"
                   for d in dependencies)

    checked: dict[str, bool] = {}

    def walk(routes: Any, inherited: bool) -> None:
        for r in routes:
            context = getattr(r, "include_context", None)
            if context is not None:  # a router included lazily (FastAPI >= 0.16x): its routes and dependencies
                walk([c.original_route if hasattr(c, "original_route") else c for c in r.effective_candidates()],
                     inherited or authorizes(context.dependencies))
            elif isinstance(r, APIRoute) and not is_open(r.path):
                checked[f"{sorted(r.methods)} {r.path}"] = inherited or authorizes(r.dependant.dependencies)

    walk(combined(auth_settings).routes, False)
    missing = [route for route, ok in checked.items() if not ok]
    assert len(checked) >= 40 and not missing, missing
    assert "['POST'] /runs/{run_id}/rerun" in checked, sorted(checked)  # the labeler's root router


def test_the_ids_are_reserved_before_the_import(auth_settings: CommonSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another project taking the run id while the upload imports cannot win: the id was reserved before."""
    import asyncio

    from dlforge.common.auth.store import AuthStore
    from dlforge.common.docs.sqlite import SqliteDocumentStore
    from dlforge.labeler import app as labeler_app

    tokens = seed_accounts(auth_settings, {"pia": {"p": "operator"}})
    imported = labeler_app.import_dataset
    raced: list[str] = []

    async def racing_import(*args: Any, **kwargs: Any) -> Any:
        docs = SqliteDocumentStore(docs_path(auth_settings))
        try:
            await AuthStore(docs).register("run", "run-raced", "q")  # the other creator, meanwhile
            raced.append("q won")
        except Exception as exc:
            raced.append(f"q refused: {getattr(exc, 'status_code', exc)}")
        finally:
            await docs.close()
        return await imported(*args, **kwargs)

    monkeypatch.setattr(labeler_app, "import_dataset", racing_import)
    with TestClient(combined(auth_settings)) as client:
        made = upload(client, tokens["pia"], project="p", dataset_id="ds-raced", run_id="run-raced")
        assert made.status_code == 201, made.text
        assert raced == ["q refused: 409"]
    project = asyncio.run(_project_of(auth_settings, "run", "run-raced"))
    assert project == "p"


async def _project_of(settings: CommonSettings, kind: str, resource_id: str) -> str | None:
    from dlforge.common.auth.store import AuthStore
    from dlforge.common.docs.sqlite import SqliteDocumentStore

    docs = SqliteDocumentStore(docs_path(settings))
    try:
        return await AuthStore(docs).project_of(kind, resource_id)
    finally:
        await docs.close()


def test_changing_ones_password_and_disabling_a_user(auth_settings: CommonSettings) -> None:
    tokens = seed_accounts(auth_settings, {"lars": {"default": "labeler"}, "ada": {"*": "admin"}})
    new = "a new and long passphrase"
    with TestClient(combined(auth_settings)) as client:
        lars, ada = bearer(tokens["lars"]), bearer(tokens["ada"])
        wrong = client.post("/auth/password", headers=lars, json={"old_password": "nope", "new_password": new})
        assert wrong.status_code == 401
        short = client.post("/auth/password", headers=lars, json={"old_password": PASSWORD, "new_password": "x"})
        assert short.status_code == 422
        ok = client.post("/auth/password", headers=lars, json={"old_password": PASSWORD, "new_password": new})
        assert ok.status_code == 200, ok.text
        assert client.post("/auth/login", json={"username": "lars", "password": PASSWORD}).status_code == 401
        assert client.post("/auth/login", json={"username": "lars", "password": new}).status_code == 200
        # only an admin of every project disables; lars's tokens stop at once, and he cannot sign in
        assert client.put("/auth/users/ada/disabled", headers=lars, json={"disabled": True}).status_code == 403
        assert client.put("/auth/users/ada/disabled", headers=ada, json={"disabled": True}).status_code == 409
        off = client.put("/auth/users/lars/disabled", headers=ada, json={"disabled": True})
        assert off.status_code == 200 and off.json()["disabled"] is True
        assert client.get("/auth/me", headers=lars).status_code == 401
        assert client.post("/auth/login", json={"username": "lars", "password": new}).status_code == 401
        assert client.put("/auth/users/lars/disabled", headers=ada, json={"disabled": False}).status_code == 200
        assert client.get("/auth/me", headers=lars).status_code == 200


def test_a_training_job_starts_only_from_weights_the_caller_may_see(auth_settings: CommonSettings) -> None:
    """A raw ``weights_key`` is a shared repository candidate or a visible model's checkpoint: not another
    project's checkpoint, nor any other object (only a principal of every project may name those)."""
    tokens = seed_accounts(auth_settings, {"pia": {"p": "operator"}, "ada": {"*": "admin"}})
    with TestClient(combined(auth_settings)) as client:
        backends = client.app.state.backends  # type: ignore[attr-defined]
        for key in ("trainer/jobs/job-p/model.pt", "trainer/jobs/job-q/model.pt", "secrets/notes.bin",
                    "proposer/models/small.pt"):
            backends.objects.put_bytes(key, b"weights")
        for project in ("p", "q"):  # a model trained by POST /trainer/jobs in each project
            client.portal.call(backends.docs.upsert, "trainer_jobs",  # type: ignore[union-attr]
                               {"_id": f"job-{project}", "kind": "api", "run_id": None, "project": project})
            client.portal.call(backends.docs.upsert, "trainer_models",  # type: ignore[union-attr]
                               {"_id": f"job-{project}", "job_id": f"job-{project}", "run_id": None,
                                "checkpoint_key": f"trainer/jobs/job-{project}/model.pt"})

        def post(token: str, weights_key: str) -> Any:
            body = {"weights_key": weights_key, "manifest_key": "none/manifest.json", "classes": ["a", "b"]}
            return client.post("/trainer/jobs", headers=bearer(token), json=body)

        refused = "neither a repository candidate"
        for key in ("trainer/jobs/job-q/model.pt", "secrets/notes.bin"):
            r = post(tokens["pia"], key)
            assert r.status_code == 422 and refused in r.json()["detail"], (key, r.text)
        # past the weights check, each stops at the next one: the manifest does not exist
        for token, key in ((tokens["pia"], "trainer/jobs/job-p/model.pt"), (tokens["pia"], "proposer/models/small.pt"),
                           (tokens["ada"], "secrets/notes.bin"), (tokens["ada"], "trainer/jobs/job-q/model.pt")):
            r = post(token, key)
            assert r.status_code == 422 and "manifest_key 'none/manifest.json': no such object" in r.json()["detail"], \
                (key, r.text)
        # nothing was started or half-written: the two seeded jobs are all there is
        listed = client.get("/trainer/jobs", headers=bearer(tokens["ada"])).json()
        assert sorted(j["_id"] for j in listed) == ["job-p", "job-q"]
