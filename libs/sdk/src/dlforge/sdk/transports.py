"""Where a job runs: in this process, or on a trainer service over HTTP. One interface for both."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

log = logging.getLogger(__name__)

FINISHED = frozenset({"completed", "stopped", "pruned", "diverged", "failed"})


class Transport(Protocol):
    """Submits a job (the trainer's ``POST /jobs`` body) and reads its status back."""

    def submit(self, request: dict[str, Any]) -> str:
        """Start the job; its id. Raises ValueError when the request is refused (with the reason)."""

    def status(self, job_id: str) -> dict[str, Any]:
        """At least ``state``, ``epochs`` (per-epoch metrics), ``metrics`` (final, flat), ``error``."""


@runtime_checkable
class ServesTensorBoard(Protocol):
    """A transport whose jobs' TensorBoard scalars are served over HTTP (an optional capability)."""

    def tensorboard_url(self, job_id: str) -> str:
        """The URL of the job's scalars (KeyError for an unknown job)."""


class HttpTransport:
    """A trainer service's REST API (``python -m dlforge.trainer``, or ``/trainer`` under ``dlforge up``).

    Requests carry ``Authorization: Bearer <token>``: the ``token`` argument, else ``DLFORGE_TOKEN``
    (a token of an operator: ``dlforge admin create-token USER --role operator``); none if neither is set.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, client: httpx.Client | None = None,
                 timeout: float = 30.0, token: str | None = None) -> None:
        token = token if token is not None else os.environ.get("DLFORGE_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = client or httpx.Client(base_url=base_url, timeout=timeout, headers=headers)
        if client is not None and token:
            self.client.headers["Authorization"] = f"Bearer {token}"

    def submit(self, request: dict[str, Any]) -> str:
        r = self.client.post("/jobs", json=request)
        if r.status_code in (401, 403):
            raise PermissionError(f"the trainer refused the token ({r.status_code}): {r.json().get('detail', r.text)} "
                                  "(set DLFORGE_TOKEN or pass token=)")
        if r.status_code in (400, 404, 409, 422):
            raise ValueError(f"the trainer refused the job: {r.json().get('detail', r.text)}")
        r.raise_for_status()
        job_id: str = r.json()["job_id"]
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/jobs/{job_id}")
        if r.status_code == 404:
            raise KeyError(f"the trainer has no job {job_id!r}")
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def tensorboard_url(self, job_id: str) -> str:
        """``<trainer>/jobs/<id>/tensorboard``: the job's scalars as JSON (send the same Authorization header)."""
        self.status(job_id)  # an unknown job (or one the token may not see) is a KeyError here, not a dead link
        return str(self.client.base_url.join(f"jobs/{job_id}/tensorboard"))


class InProcessTransport:
    """Runs the trainer's training core in a background thread of this process (notebooks, tests).

    ``objects`` is an ObjectStore or a URL (default: ``DLFORGE_OBJECTS``); the trainer's settings
    (``DLFORGE_TRAINER_…``) apply. Needs the trainer package: ``pip install 'dlforge-sdk[local]'``.
    """

    def __init__(self, objects: Any = None, *, work_dir: str | Path | None = None) -> None:
        try:
            from dlforge.common.backends import open_objects
            from dlforge.common.settings import load_settings
            from dlforge.trainer.handlers import TrainerConfig
            from dlforge.trainer.settings import TrainerSettings
        except ImportError as exc:
            raise ImportError(
                f"the in-process transport runs the trainer here: pip install 'dlforge-sdk[local]' ({exc})"
            ) from exc
        settings = load_settings(TrainerSettings)
        self.objects = open_objects(objects or settings.objects) if objects is None or isinstance(objects, str) \
            else objects
        config = TrainerConfig.from_settings(settings)
        if work_dir is not None:
            config = TrainerConfig(**{**config.__dict__, "work_dir": Path(work_dir)})
        self.config = config
        self._jobs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def submit(self, request: dict[str, Any]) -> str:
        from pydantic import ValidationError

        from dlforge.trainer.handlers import TrainingRequest

        if "model_id" in request:
            raise ValueError("model_id needs the trainer service's model registry: use weights_key in process")
        try:
            training = TrainingRequest.model_validate(request)
        except ValidationError as exc:
            raise ValueError(f"invalid training job: {exc}") from exc
        if not self.objects.exists(training.manifest_key):
            raise ValueError(f"manifest_key {training.manifest_key!r}: no such object")
        job_id = uuid.uuid4().hex
        key_prefix = f"trainer/jobs/{job_id}"
        with self._lock:
            self._jobs[job_id] = {"_id": job_id, "state": "queued", "epochs": [], "metrics": {}, "error": None,
                                  "checkpoints": [], "logs_prefix": f"{key_prefix}/tensorboard/", "model_key": None}
        thread = threading.Thread(target=self._run, args=(job_id, training, key_prefix), name=f"dlforge-job-{job_id}",
                                  daemon=True)
        thread.start()
        return job_id

    def _set(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            self._jobs[job_id].update(changes)

    def _run(self, job_id: str, training: Any, key_prefix: str) -> None:
        from dlforge.trainer.handlers import flat_metrics, run_training, save_model

        self._set(job_id, state="running")

        def on_epoch(m: Any) -> bool:
            with self._lock:
                self._jobs[job_id]["epochs"].append(m.model_dump())
            return True

        try:
            outcome = run_training(self.objects, training, job_id=job_id, key_prefix=key_prefix, config=self.config,
                                   on_epoch=on_epoch)
            model_key = save_model(self.objects, outcome, f"{key_prefix}/model.pt", work_dir=self.config.work_dir)
            self._set(job_id, state="diverged" if outcome.state == "diverged" else "completed",
                      metrics=flat_metrics(outcome), checkpoints=outcome.checkpoints, model_key=model_key,
                      result=outcome.summary())
        except Exception as exc:  # the job's failure is reported through its status
            log.exception("in-process job %s failed", job_id)
            self._set(job_id, state="failed", error=f"{type(exc).__name__}: {exc}")

    def status(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise KeyError(f"no job {job_id!r} in this process")
            return {**job, "epochs": list(job["epochs"])}
