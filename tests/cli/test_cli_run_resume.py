"""``dlforge run`` killed while labeling and started again follows the run it started, on a durable bus."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(900)]


def _datasets(db: Path) -> list[dict[str, object]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute('SELECT id, body FROM "c_labeler_datasets"').fetchall()
    except sqlite3.OperationalError:  # the table is not there yet
        return []
    return [{**json.loads(body), "_id": doc_id} for doc_id, body in rows]


def _wait(what: str, condition, deadline: float = 300.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}")


class Command:
    """One ``dlforge run`` in a process group of its own; its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], out: Path) -> None:
        self.out = out
        with out.open("wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "dlforge.cli.main", "run", *args], env=env, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


def test_run_killed_while_labeling_is_followed_again_not_uploaded_again(
    tmp_path: Path, kafka_url: str, s3_url: str,
) -> None:
    from dlforge.labeler.demo_data import materialize_elpv

    folder = tmp_path / "cells"
    truth = materialize_elpv(folder, limit=60)
    answers = tmp_path / "answers.csv"
    with answers.open("w", newline="") as f:
        csv.writer(f).writerows([("file", "label"), *sorted(truth.items())])
    db = tmp_path / "docs.db"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DLFORGE_")},
           "PYTHONPATH": os.pathsep.join(sys.path), "DLFORGE_BUS": kafka_url, "DLFORGE_OBJECTS": s3_url,
           "DLFORGE_DOCS": f"sqlite:///{db}", "DLFORGE_WORK_DIR": str(tmp_path / "work"),
           "DLFORGE_TUNER_STORAGE": f"sqlite:///{tmp_path}/tuner.db", "DLFORGE_PROPOSER_BUILD_ON_START": "false",
           "DLFORGE_POLL_SECONDS": "0.2"}
    args = [str(folder), "--answers", str(answers), "--configured", "--spec", "recall=0.5,positive=defect",
            "--hpo-trials", "1", "--train-epochs", "1"]

    first = Command(args, env, tmp_path / "first.out")
    try:
        _wait("the labeler to be at work", lambda: any(d["state"] in ("embedding", "labeling") for d in _datasets(db)))
    finally:
        first.kill()
    [started] = json.loads((tmp_path / "work" / "runs.json").read_text()).values()
    run_id, dataset_id = started["run_id"], started["dataset_id"]

    again = Command(args, env, tmp_path / "again.out")
    try:
        _wait("the same command to follow the run", lambda: f"following run {run_id}" in again.text())
        # the interrupted labeling goes on: the next batch is asked (or the data set is labeled)
        _wait("the labeling to go on", lambda: any(d["_id"] == dataset_id and (len(d.get("rounds", [])) >= 2
                                                                               or d["state"] == "labeled")
                                                   for d in _datasets(db)))
    finally:
        again.kill()
    assert [d["_id"] for d in _datasets(db)] == [dataset_id]  # not uploaded a second time
    assert len(json.loads((tmp_path / "work" / "runs.json").read_text())) == 1

    named = Command([*args, "--resume", run_id], env, tmp_path / "named.out")
    try:
        _wait("--resume to follow the run", lambda: f"following run {run_id}" in named.text())
    finally:
        named.kill()
    unknown = subprocess.run([sys.executable, "-m", "dlforge.cli.main", "run", *args, "--resume", "no-such-run"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "no run 'no-such-run'" in unknown.stderr
    assert [d["_id"] for d in _datasets(db)] == [dataset_id]
