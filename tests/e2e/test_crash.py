"""Crash recovery: one small run of ``dlforge up`` is killed (SIGKILL, whole process group) once in each
stage -- labeler, augmenter, proposer, tuner mid-trial, trainer mid-epoch, optimizer -- and restarted
each time; it completes with what an uninterrupted run of the same data set produces:

* the same number of events of each type. "Count" is the number of distinct event ids per type
  as a consumer reads them from the bus: a copy re-published after a crash keeps its event id
  (outbox) and every consumer skips it by its processed-marker, so copies are not events;
  a second *distinct* event (a duplicate request, trial or completion) would be counted;
* the same object keys (same data set and run id in both runs, each run on its own prefix);
* the same number of documents in every collection (markers included: one per consumer and event);
* the same Optuna trials (number and states) in the run's study;
* and the final training went on from its last epoch instead of starting again.

The uninterrupted run is the reference; both runs use the same ``dataset_id`` and ``run_id`` on
separate topics, object prefixes and document files.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(1500)]

DATASET_ID = "crash-ds-0001"
RUN_ID = "crash-run-0001"
FINAL_EPOCHS = 60  # ~0.3 s each on 2 cores: a window of seconds for the kill mid-epoch
ITEMS = 160


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(what: str, condition: Callable[[], Any], *, deadline: float, every: float = 0.2) -> Any:
    """``condition()``'s first truthy value, polled until ``deadline`` seconds pass (then fail, saying what)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}")


@dataclass
class Platform:
    """``dlforge up --simulated-annotator`` in a process group of its own, on the given backends."""

    env: dict[str, str]
    log: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**self.env, "DLFORGE_HTTP_HOST": "127.0.0.1", "DLFORGE_HTTP_PORT": str(self.port)}
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts + 1} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "dlforge.cli.main", "up", "--simulated-annotator"],
                                         env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, \
                f"dlforge up exited with {self.proc.returncode if self.proc else None}; see {self.log}"
            try:
                return httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        _wait("dlforge up to be ready", ready, deadline=180, every=0.5)

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and any training processes it started)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        self.proc = None

    def get(self, path: str) -> Any:
        try:
            response = httpx.get(f"{self.base}{path}", timeout=10)
        except httpx.TransportError:
            return None
        return response.json() if response.status_code == 200 else None


def _run(platform: Platform) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = platform.get(f"/runs/{RUN_ID}")
    return doc


def _stage(platform: Platform, stage: str) -> str | None:
    run = _run(platform)
    return None if run is None else str(run["stages"][stage]["state"])


def _running_job(platform: Platform, kind: str, *, min_epochs: int = 0) -> bool:
    jobs = platform.get(f"/trainer/jobs?kind={kind}&state=running") or []
    return any((j.get("epochs_done") or 0) >= min_epochs for j in jobs)


# stage -> the condition that shows the stage at work (checked every 0.2 s)
KILL_POINTS: list[tuple[str, Callable[[Platform], bool]]] = [
    ("labeler", lambda p: _stage(p, "labeler") == "running"),
    ("augmenter", lambda p: _stage(p, "augmenter") == "running"),
    ("proposer", lambda p: _stage(p, "proposer") == "running"),
    ("tuner mid-trial", lambda p: _stage(p, "tuner") == "running" and _running_job(p, "trial")),
    ("trainer mid-epoch", lambda p: _stage(p, "trainer") == "running" and _running_job(p, "final", min_epochs=2)),
    ("optimizer", lambda p: _stage(p, "optimizer") == "running"),
]


@dataclass
class Outcome:
    run: dict[str, Any]
    events: Counter[str]
    objects: set[str]
    documents: dict[str, int]
    trials: list[tuple[int, str]]
    log: str


def _env(tmp: Path, *, bus: str, objects: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLFORGE_")}
    return {
        **env,
        "PYTHONPATH": os.pathsep.join(sys.path),
        # access control is not what this test is about (tests/auth, and the console's browser test runs
        # dlforge up with auth required through a whole run); with it on, the audit log, which outlives a
        # deleted run by design, would count as documents of the run
        "DLFORGE_AUTH": "off",
        "DLFORGE_BUS": bus,
        "DLFORGE_OBJECTS": objects,
        "DLFORGE_DOCS": f"sqlite:///{tmp}/docs.db",
        "DLFORGE_WORK_DIR": str(tmp / "work"),
        "DLFORGE_TUNER_STORAGE": f"sqlite:///{tmp}/tuner.db",
        "DLFORGE_POLL_SECONDS": "0.2",
        "DLFORGE_LOG_LEVEL": "INFO",
        "DLFORGE_LABELER_IMPORT_ROOTS": str(tmp.parent),
        "DLFORGE_OPTIMIZER_ROUNDS": "1",
        "DLFORGE_OPTIMIZER_ITERATIONS": "5",
        "DLFORGE_OPTIMIZER_WARMUP": "1",
        "DLFORGE_OPTIMIZER_BATCH_SIZES": "[1]",
        "DLFORGE_OPTIMIZER_CALIBRATION_IMAGES": "16",
        "DLFORGE_OPTIMIZER_CALIBRATION_METHODS": '["minmax"]',
        "DLFORGE_OPTIMIZER_BENCHMARK_TORCH": "false",
        "DLFORGE_OPTIMIZER_GPU": "false",
        # one repository model, put there before the start (see _seed_repository): building the two
        # small CNNs on their source data sets takes minutes
        "DLFORGE_PROPOSER_BUILD_ON_START": "false",
        "DLFORGE_PROPOSER_FINETUNE_STEPS": "6",
        "DLFORGE_PROPOSER_TRAIN_SAMPLE": "64",
        "DLFORGE_PROPOSER_VAL_SAMPLE": "32",
        "DLFORGE_PROPOSER_SPEED_SECONDS": "0.3",
        # a final training whose length does not depend on time or on early stopping
        "DLFORGE_TRAINER_FINAL_EPOCHS": str(FINAL_EPOCHS),
        "DLFORGE_TRAINER_FINAL_PATIENCE": "0",
        "DLFORGE_TRAINER_FINAL_MAX_SECONDS": "0",
        "DLFORGE_TRAINER_FINAL_VIEWS": "none",
    }


def _seed_repository(tmp: Path, objects_url: str) -> None:
    """The proposer's repository with its pretrained EfficientNet-Lite0 entry only."""
    import asyncio

    from dlforge.common.backends import open_docs, open_objects
    from dlforge.proposer.repository import DEFAULT_RECIPES, build_repository

    async def build() -> None:
        docs = open_docs(f"sqlite:///{tmp}/docs.db")
        try:
            [result] = await build_repository(open_objects(objects_url), docs, recipes=DEFAULT_RECIPES[:1],
                                              work_dir=tmp / "work" / "proposer")
            assert result.action != "failed", result.error
        finally:
            await docs.close()

    asyncio.run(build())


def _upload(platform: Platform, folder: Path, truth: dict[str, str], objects_url: str) -> None:
    from small_run import OPTIONS, SPEC

    from dlforge.common.backends import open_objects
    from dlforge.labeler import simulated

    simulated.register_answers(open_objects(objects_url), DATASET_ID, truth)
    response = httpx.post(f"{platform.base}/labeler/datasets", timeout=300, json={
        "folder": str(folder), "name": "crash", "spec": SPEC.model_dump(), "options": OPTIONS.model_dump(),
        "dataset_id": DATASET_ID, "run_id": RUN_ID})
    assert response.status_code == 201, response.text


def _events(bus_url: str) -> Counter[str]:
    """Distinct event ids per type of the run, read from the start of every topic by a group of our own."""
    import asyncio

    from dlforge.common.backends import open_bus
    from dlforge.common.events import Topic, decode

    async def read() -> Counter[str]:
        bus = open_bus(bus_url)
        await bus.start()
        seen: dict[str, str] = {}
        try:
            topics = [t for t in Topic if t is not Topic.DEAD_LETTER]
            sub = await bus.subscribe(group="crash-test-reader", topics=topics)
            try:
                idle_until = time.monotonic() + 10
                while time.monotonic() < idle_until:
                    delivery = await sub.get(timeout=1.0)
                    if delivery is None:
                        continue
                    idle_until = time.monotonic() + 3  # drained once nothing came for 3 s
                    event = decode(delivery.value)
                    if event.run_id == RUN_ID:
                        seen[event.event_id] = event.event_type.value
                    await sub.commit(delivery)
            finally:
                await sub.close()
        finally:
            await bus.stop()
        return Counter(seen.values())

    return asyncio.run(read())


def _documents(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: int(conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]) for t in tables}


def _run_documents(db: Path) -> dict[str, int]:
    """Documents that name the run (``run_id``) or its data set, per collection; markers of run.deleted left out."""
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'c_%'")]
        counts = {}
        for t in tables:
            n = conn.execute(f"SELECT COUNT(*) FROM \"{t}\" WHERE (json_extract(body, '$.run_id') = ? OR "
                             "json_extract(body, '$.dataset_id') = ? OR id = ?) AND "
                             "COALESCE(json_extract(body, '$.topic'), '') != 'run.deleted'",
                             (RUN_ID, DATASET_ID, DATASET_ID)).fetchone()[0]
            if n:
                counts[t] = int(n)
        return counts


# content-addressed stores every run shares (evicted by size, not by run) and the proposer's repository
SHARED_PREFIXES = ("proposer/models/", "features/", "trainer/cache/")


def _objects(objects_url: str) -> set[str]:
    from dlforge.common.backends import open_objects

    return {info.key for info in open_objects(objects_url).list("")}


def _finish(platform: Platform, tmp: Path, *, bus: str, objects: str) -> Outcome:
    run = _wait("the run to finish", lambda: (r := _run(platform)) is not None and r["state"] != "running" and r,
                deadline=900, every=0.5)
    study = platform.get(f"/tuner/studies/dlforge-{RUN_ID}")
    platform.stop()
    return Outcome(run=run, events=_events(bus), objects=_objects(objects), documents=_documents(tmp / "docs.db"),
                   trials=[(t["number"], t["state"]) for t in study["trials"]], log=platform.log.read_text())


@pytest.fixture(scope="module")
def elpv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    from dlforge.labeler.demo_data import materialize_elpv

    root = tmp_path_factory.mktemp("crash-data")
    truth = materialize_elpv(root / "elpv", limit=ITEMS)
    return root / "elpv", truth


def _root_conftest() -> Any:
    """tests/conftest.py by its path: a bare ``import conftest`` finds whichever conftest module the
    session imported under that name first (e.g. tests/tuner/conftest.py in a whole-suite run)."""
    import importlib.util

    name = "dlforge_tests_root_conftest"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _kafka(name: str) -> str:
    c = _root_conftest()
    broker = c.require_service(c.KAFKA_ENV, "Kafka broker")
    return f"kafka://{broker}?{c.KAFKA_TEST_QUERY}&topic_prefix={c.unique(name)}."


def _s3(name: str) -> str:
    c = _root_conftest()
    return f"{c.require_service(c.S3_ENV, 'S3 server').rstrip('/')}/{c.unique(name)}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, elpv: tuple[Path, dict[str, str]]) -> Iterator[Outcome]:
    """The reference: the same run, never killed."""
    folder, truth = elpv
    tmp = tmp_path_factory.mktemp("uninterrupted")
    bus, objects = _kafka("ref"), _s3("ref")
    _seed_repository(tmp, objects)
    platform = Platform(_env(tmp, bus=bus, objects=objects), tmp / "dlforge.log")
    try:
        platform.start()
        _upload(platform, folder, truth, objects)
        yield _finish(platform, tmp, bus=bus, objects=objects)
    finally:
        platform.stop()


def _backends(variant: str, tmp: Path) -> tuple[str, str]:
    """(bus URL, objects URL) of a variant: the embedded default, or Kafka + S3."""
    if variant == "embedded":
        try:
            import dlforge.common.bus.sqlite  # noqa: F401
        except ImportError:
            pytest.skip("the durable embedded bus (sqlite://) is not in this tree")
        return f"sqlite:///{tmp}/bus.db", f"file://{tmp}/objects"
    return _kafka("crash"), _s3("crash")


@pytest.mark.parametrize("variant", ["embedded", "kafka+s3"])
def test_a_run_killed_in_every_stage_completes_as_if_it_had_not_been(
    variant: str, tmp_path: Path, elpv: tuple[Path, dict[str, str]], uninterrupted: Outcome,
) -> None:
    folder, truth = elpv
    bus, objects = _backends(variant, tmp_path)
    _seed_repository(tmp_path, objects)
    platform = Platform(_env(tmp_path, bus=bus, objects=objects), tmp_path / "dlforge.log")
    killed: list[str] = []
    try:
        platform.start()
        _upload(platform, folder, truth, objects)
        for stage, at_work in KILL_POINTS:
            _wait(f"the {stage} stage at work", lambda at_work=at_work: at_work(platform), deadline=600)
            platform.kill()
            killed.append(stage)
            platform.start()
        crashed = _finish(platform, tmp_path, bus=bus, objects=objects)
    finally:
        platform.stop()

    assert killed == [s for s, _ in KILL_POINTS]
    assert uninterrupted.run["state"] == "succeeded", uninterrupted.run.get("failure")
    assert crashed.run["state"] == "succeeded", crashed.run.get("failure")
    # the same events, counted as distinct event ids per type
    assert crashed.events == uninterrupted.events, (crashed.events, uninterrupted.events)
    assert crashed.events["hpo.trial"] == 2 and crashed.events["model.optimized"] == 1
    # no duplicated side effects
    assert crashed.objects == uninterrupted.objects, {
        "only after crashes": sorted(crashed.objects - uninterrupted.objects)[:20],
        "only uninterrupted": sorted(uninterrupted.objects - crashed.objects)[:20]}
    assert crashed.documents == uninterrupted.documents
    assert crashed.trials == uninterrupted.trials
    # the final training went on from its last epoch after the kill, and trained every epoch once
    assert "resuming after epoch" in crashed.log
    assert crashed.run["stages"]["trainer"]["summary"]["metrics"]["epochs"] == FINAL_EPOCHS
    assert json.dumps(crashed.run["stages"]["optimizer"]["state"]) == '"succeeded"'

    # deleting the run removes every service's documents and objects of it; the run view then 404s
    platform.start()
    try:
        assert httpx.delete(f"{platform.base}/runs/{RUN_ID}", timeout=30).status_code == 202
        _wait("the run view to forget the run",
              lambda: httpx.get(f"{platform.base}/runs/{RUN_ID}", timeout=10).status_code == 404, deadline=120)
        _wait("every service to delete its documents of the run",
              lambda: not _run_documents(tmp_path / "docs.db"), deadline=120)
        _wait("every service to delete its objects of the run",
              lambda: all(k.startswith(SHARED_PREFIXES) for k in _objects(objects)), deadline=120)
        assert httpx.get(f"{platform.base}/labeler/datasets/{DATASET_ID}", timeout=10).status_code == 404
        assert httpx.get(f"{platform.base}/tuner/studies/dlforge-{RUN_ID}", timeout=10).status_code == 404
    finally:
        platform.stop()
