"""Which run ``dlforge run`` started for a folder, so that running it again resumes that run.

The work dir keeps ``runs.json``: a fingerprint of the request (the folder's resolved path, the
relative path, size and modification time of every file in it, the spec and the options) mapped to
the run and data set ids it started. Running the same command again after a crash finds the run
and follows it instead of uploading the folder a second time; a changed folder, spec or options
is another run. ``--resume RUN_ID`` names the run explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from dlforge.common.errors import ConfigError, DlforgeError
from dlforge.common.events import PipelineOptions, Spec

INDEX = "runs.json"


class StartedRun(BaseModel):
    """A run ``dlforge run`` started: its ids and what it was started on."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    dataset_id: str
    folder: str
    fingerprint: str


LATER_OPTIONS = ("domain_adaptation",)  # PipelineOptions fields newer than the first run index


def fingerprint(folder: Path, *, spec: Spec, options: PipelineOptions) -> str:
    """A digest of the folder's path and files (relative path, size, mtime) and of the spec and options."""
    root = folder.resolve()
    h = hashlib.sha256()
    h.update(str(root).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.stat()
            h.update(f"\0{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    h.update(spec.model_dump_json().encode())
    # options added since a run was started leave its digest as it was while they are unset
    h.update(options.model_dump_json(exclude={k for k in LATER_OPTIONS if getattr(options, k) is None}).encode())
    return h.hexdigest()


class RunIndex:
    """``<work dir>/runs.json``: fingerprint -> the run started for it."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / INDEX

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.path} is unreadable ({exc}); remove it to start afresh") from exc
        return data if isinstance(data, dict) else {}

    def find(self, fp: str) -> StartedRun | None:
        raw = self._read().get(fp)
        return StartedRun.model_validate(raw) if raw else None

    def by_run(self, run_id: str) -> StartedRun | None:
        for raw in self._read().values():
            if raw.get("run_id") == run_id:
                return StartedRun.model_validate(raw)
        return None

    def remember(self, run: StartedRun) -> None:
        """Record ``run`` (atomically: a crash leaves the old file or the new one)."""
        data = self._read()
        data[run.fingerprint] = run.model_dump()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)


async def run_to_follow(client: Any, index: RunIndex, *, fp: str, resume_run: str | None, folder: Path
                        ) -> dict[str, Any] | None:
    """``{"run_id", "dataset_id"}`` of the run to follow instead of uploading, or None to start a new one.

    ``client`` is an httpx client of the combined app. The run named by ``resume_run`` (an error if
    the app does not know it), else the one this request started before if it is still going or
    succeeded; a failed or cancelled one, or an upload that was cut short, gives None.
    """
    known = index.by_run(resume_run) if resume_run else index.find(fp)
    run_id = resume_run or (known.run_id if known else None)
    if run_id is None:
        return None
    view = await client.get(f"/runs/{run_id}")
    if view.status_code == 200:
        state = view.json()["state"]
        dataset_id = known.dataset_id if known else view.json().get("dataset_id")
        if resume_run or state in ("running", "succeeded"):
            print(f"following run {run_id} ({state}), started on {folder} before")
            return {"run_id": run_id, "dataset_id": dataset_id}
        print(f"run {run_id} started on {folder} before is {state}: starting a new run")
        return None
    if known is not None:  # not in the run view yet: the upload may have been cut short
        dataset = await client.get(f"/labeler/datasets/{known.dataset_id}")
        if dataset.status_code == 200 and dataset.json().get("state") not in ("failed", "ingesting"):
            print(f"following run {run_id}, started on {folder} before")
            return {"run_id": run_id, "dataset_id": known.dataset_id}
    if resume_run:
        raise DlforgeError(f"--resume: no run {resume_run!r} in this work dir's backends")
    return None
