"""``Experiment.run(...)`` and the ``Job`` it returns."""

from __future__ import annotations

import time
from typing import Any

from dlforge.sdk.config import Estimator, HParams, RunConfig, job_request
from dlforge.sdk.transports import FINISHED, InProcessTransport, ServesTensorBoard, Transport


class JobFailed(RuntimeError):
    """``wait_until_finish(raise_on_failure=True)`` on a job that failed or diverged."""


class Job:
    """A submitted training job; every property reads its current status from the transport."""

    def __init__(self, job_id: str, *, experiment_name: str, transport: Transport, description: str | None = None):
        self.job_id = job_id
        self.experiment_name = experiment_name
        self.description = description
        self.transport = transport

    def __repr__(self) -> str:
        return f"Job({self.job_id!r}, experiment={self.experiment_name!r})"

    def status(self) -> dict[str, Any]:
        return self.transport.status(self.job_id)

    @property
    def state(self) -> str:
        state: str = self.status()["state"]
        return state

    def has_finished(self) -> bool:
        return self.state in FINISHED

    def wait_until_finish(self, timeout: float | None = None, *, poll_seconds: float = 0.5,
                          raise_on_failure: bool = False) -> Job:
        """Block until the job ends (TimeoutError after ``timeout`` seconds); returns the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status["state"] in FINISHED:
                if raise_on_failure and status["state"] in ("failed", "diverged"):
                    raise JobFailed(f"job {self.job_id} {status['state']}: {status.get('error')}")
                return self
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.job_id} is still {status['state']} after {timeout}s")
            time.sleep(poll_seconds)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """One dict per finished epoch: train_loss, val_loss, val_accuracy, val_recall, seconds, ..."""
        epochs: list[dict[str, Any]] = self.status().get("epochs", [])
        return epochs

    @property
    def final_metrics(self) -> dict[str, float]:
        """The finished job's flat metrics (val/test accuracy, per-class recall, timings)."""
        metrics: dict[str, float] = self.status().get("metrics") or {}
        return metrics

    @property
    def error(self) -> str | None:
        error: str | None = self.status().get("error")
        return error

    @property
    def checkpoints(self) -> list[str]:
        return list(self.status().get("checkpoints") or [])

    @property
    def model_key(self) -> str | None:
        """Object key of the trained model (a save_checkpoint file) once the job completed."""
        key: str | None = self.status().get("model_key")
        return key

    def get_tensorboard_logdir(self) -> str:
        """Object-store prefix of the job's TensorBoard event files."""
        prefix: str = self.status()["logs_prefix"]
        return prefix

    def get_tensorboard_url(self) -> str:
        """The URL where the trainer serves the job's TensorBoard scalars (``GET /jobs/{id}/tensorboard``:
        ``{tag: [[wall_time, step, value], ...]}``; the transport's token goes in the Authorization header).

        Only a trainer service serves them: in process, read the event files under
        :meth:`get_tensorboard_logdir` with ``tensorboard --logdir`` on a copy.
        """
        if not isinstance(self.transport, ServesTensorBoard):
            raise ValueError(f"{type(self.transport).__name__} serves no TensorBoard URL (only a trainer service "
                             f"does: HttpTransport); the event files are at {self.get_tensorboard_logdir()!r}")
        return self.transport.tensorboard_url(self.job_id)

    def get_single_job(self) -> Job:
        """The Brightics notebooks' ``experiment.get_single_job()``: an experiment here is one job."""
        return self


class Experiment:
    """Entry point: ``Experiment.run(experiment_name=..., estimator=..., hyper_parameters=..., run_config=...)``."""

    @staticmethod
    def run(
        *,
        experiment_name: str,
        estimator: Estimator,
        hyper_parameters: HParams | None = None,
        run_config: RunConfig | None = None,
        description: str | None = None,
        transport: Transport | None = None,
    ) -> Job:
        """Validate, submit and return the running job (in this process unless a transport is given)."""
        if not experiment_name.strip():
            raise ValueError("experiment_name must not be empty")
        body = job_request(estimator, hyper_parameters or HParams(), run_config or RunConfig())
        chosen = transport or InProcessTransport()
        if not isinstance(chosen, InProcessTransport):
            body["name"] = experiment_name
        job_id = chosen.submit(body)
        return Job(job_id, experiment_name=experiment_name, transport=chosen, description=description)
