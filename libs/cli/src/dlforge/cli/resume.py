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

from dlforge.common.errors import ConfigError
from dlforge.common.events import PipelineOptions, Spec

INDEX = "runs.json"


class StartedRun(BaseModel):
    """A run ``dlforge run`` started: its ids and what it was started on."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    dataset_id: str
    folder: str
    fingerprint: str


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
    h.update(options.model_dump_json().encode())
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
