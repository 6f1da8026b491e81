"""Bad input to any service of the combined app: unknown ids are 404 everywhere (every route with an id
in its path), values beyond their bounds are 422 naming the field; either way nothing is written (no
document, object or event)."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dlforge.cli.platform import service_parts
from dlforge.common.app import create_app
from dlforge.common.events import Topic
from dlforge.common.objects.fs import FsObjectStore
from dlforge.common.settings import load_settings

UNKNOWN = "nope-4711"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


# what a route needs besides its path to get past request validation to the id lookup
REQUESTS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/labeler/datasets/{dataset_id}/similar"): {"params": {"item": "x"}},
    ("POST", "/proposer/proposals/{dataset_id}/rerank"): {"json": {"weights": {}}},
    ("POST", "/optimizer/models/{dataset_id}/predict"): {"files": {"file": ("a.png", _png(), "image/png")}},
    ("PUT", "/tuner/runs/{run_id}/tuning"): {"json": {}},
    ("PUT", "/auth/users/{name}/grants/{project}"): {"json": {"role": "viewer"}},
    ("PUT", "/auth/users/{name}/disabled"): {"json": {"disabled": True}},
    ("POST", "/labeler/datasets/{dataset_id}/rerun"): {"json": {}},
    ("POST", "/runs/{run_id}/rerun"): {"json": {}},
}
# routes whose unknown-id rule another test owns: recording a resource's project creates it
# (tests/auth/test_auth_services.py)
ELSEWHERE: set[tuple[str, str]] = {("PUT", "/auth/resources/{kind}/{resource_id}")}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("DLFORGE_PROPOSER_BUILD_ON_START", "false")
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/objects",
                             docs=f"sqlite:///{tmp_path}/docs.db", work_dir=str(tmp_path / "work"))
    app = create_app(service_parts(), settings=settings, mount_prefix=True, run_workers=False)
    with TestClient(app) as c:
        yield c


def _routes_with_ids(client: TestClient) -> list[tuple[str, str]]:
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    return [(method.upper(), path) for path, ops in sorted(paths.items()) if "{" in path for method in sorted(ops)]


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        return sum(db.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables
                   if not t.startswith("sqlite_"))


def _events(client: TestClient) -> int:
    bus = client.app.state.backends.bus  # type: ignore[attr-defined]

    async def count() -> int:
        sub = await bus.subscribe(group=f"probe-{uuid4().hex}", topics=list(Topic))
        try:
            return len(await sub.get_batch(10_000, timeout=0))
        finally:
            await sub.close()

    assert client.portal is not None
    return int(client.portal.call(count))


def test_every_route_with_an_id_answers_404_for_unknown_ids_and_writes_nothing(
    client: TestClient, tmp_path: Path
) -> None:
    routes = _routes_with_ids(client)
    assert len(routes) >= 15  # every service's id routes are there
    before_rows = _rows(tmp_path / "docs.db")
    called = []
    for method, path in routes:
        if (method, path) in ELSEWHERE:
            continue
        url = path
        for name in ("dataset_id", "item_id", "model_id", "name", "job_id", "run_id", "token_id", "resource_id",
                     "project", "path"):
            url = url.replace("{" + name + "}", UNKNOWN)
        url = url.replace("{kind}", "run")
        assert "{" not in url, f"{method} {path}: a path parameter this test does not know"
        r = client.request(method, url, **REQUESTS.get((method, path), {}))
        assert r.status_code == 404, f"{method} {url}: {r.status_code} {r.text}"
        assert UNKNOWN in r.json()["detail"], f"{method} {url}: {r.text}"
        called.append((method, path))
    assert ("POST", "/proposer/proposals/{dataset_id}/rerank") in called
    assert ("GET", "/labeler/datasets/{dataset_id}/items/{item_id}/image") in called
    assert _rows(tmp_path / "docs.db") == before_rows
    assert list(FsObjectStore(tmp_path / "objects").list("")) == []
    assert _events(client) == 0


def _nothing_written(client: TestClient, tmp_path: Path, rows: int) -> None:
    assert _rows(tmp_path / "docs.db") == rows
    assert list(FsObjectStore(tmp_path / "objects").list("")) == []
    assert _events(client) == 0


@pytest.mark.parametrize(
    ("method", "url", "request_args", "words"),
    [
        ("POST", "/trainer/jobs", {"json": {"manifest_key": "m.json", "classes": ["good", "bad\x1b"]}},
         "not a valid class name"),
        ("POST", "/trainer/jobs", {"json": {"manifest_key": "m" * 2000, "classes": ["a", "b"]}}, "manifest_key"),
        ("POST", "/trainer/jobs", {"json": {"manifest_key": "m.json", "classes": ["a", "b"],
                                            "hparams": {"epochs": 10**9}}}, "less than or equal to 1000"),
        ("POST", "/trainer/jobs", {"json": {"manifest_key": "m.json", "classes": ["a", "b"],
                                            "hparams": {"seed": -1}}}, "greater than or equal to 0"),
        ("POST", "/trainer/jobs", {"json": {"manifest_key": "m.json", "classes": ["a", "b"],
                                            "run_config": {"checkpoint_every_steps": 10**12}}}, "1000000"),
        ("GET", "/trainer/jobs", {"params": {"state": "x" * 10_000}}, "state"),
        ("POST", "/proposer/proposals/d1/rerank", {"json": {"weights": {f"w{i}": 1.0 for i in range(51)}}},
         "at most 50 items"),
        ("POST", "/proposer/proposals/d1/rerank", {"json": {"weights": {"accuracy": 1e300}}},
         "less than or equal to 1000000"),
        ("GET", "/augmenter/datasets/d1/samples", {"params": {"label": "bad\nlabel"}}, "not a valid class name"),
        ("GET", "/labeler/datasets", {"params": {"state": "s" * 1000}}, "at most 32 characters"),
        ("GET", "/optimizer/reports/d1", {"params": {"model_id": "m" * 1000}}, "at most 200 characters"),
    ],
    ids=["job-class-control-chars", "job-key-length", "job-epochs", "job-seed", "job-checkpoint-steps",
         "jobs-state", "rerank-too-many-weights", "rerank-huge-weight", "samples-label", "datasets-state",
         "report-model-id"],
)
def test_values_beyond_their_bounds_are_422_and_nothing_is_written(
    client: TestClient, tmp_path: Path, method: str, url: str, request_args: dict[str, Any], words: str
) -> None:
    rows = _rows(tmp_path / "docs.db")
    r = client.request(method, url, **request_args)
    assert r.status_code == 422, r.text
    assert words in r.text
    _nothing_written(client, tmp_path, rows)
