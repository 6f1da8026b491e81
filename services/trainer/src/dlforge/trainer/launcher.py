"""The Kubernetes launcher: a data-parallel run's workers as the pods of an indexed Job.

With ``DLFORGE_TRAINER_LAUNCHER=kubernetes``, a run of ``no_of_workers=N`` > 1 is not spawned on this
machine: :class:`KubernetesEngine` writes the job to the object store, creates a headless Service and
an indexed Job of N pods through the Kubernetes API (:func:`render_worker_job`), each pod running
``torchrun --nnodes N --node-rank <its completion index>`` with the rendezvous at pod 0
(``<job>-0.<service>``, static torchrun rendezvous) and :mod:`dlforge.trainer.pod` as the program. It
follows the Job with the API's watch, and rank 0's reports (step losses, epochs, checkpoints, states to
resume from) through the object store, answering each epoch with go-on/stop as the local engine does;
at the end, whether the run succeeded, failed or was interrupted, it copies the pods' logs to
``<key_prefix>/logs/<attempt>/<pod>.log`` and deletes the Job (its pods with it), the Service and the
job's files. Before it starts, it deletes what an earlier attempt of the same job left (a trainer killed
during the run cannot clean up; the job then resumes from its last state on the new pods). The
trainer's service account needs ``create``, ``list``, ``watch`` and ``delete`` on ``jobs`` (batch) and
``services``, and ``list`` on ``pods`` and ``get`` on ``pods/log``, in the namespace
(``k8s/trainer-launcher.yaml``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import torch

from dlforge.common.errors import ConfigError
from dlforge.common.objects import ObjectStore
from dlforge.common.recovery import delete_prefix
from dlforge.trainer.engines import Engine, FitJob, _write_job
from dlforge.trainer.params import EpochMetrics
from dlforge.trainer.pod import reply_key
from dlforge.trainer.training import FitListener, FitResult, FitState

log = logging.getLogger(__name__)

RDZV_PORT = 29500
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class KubernetesConfig:
    """Where and how the worker pods run (``DLFORGE_TRAINER_K8S_…``)."""

    image: str
    namespace: str = "dlforge"
    api_url: str = "https://kubernetes.default.svc"
    token_file: str | None = str(SERVICE_ACCOUNT_DIR / "token")
    ca_file: str | None = str(SERVICE_ACCOUNT_DIR / "ca.crt")
    cpu: str = "1"
    memory: str = "2Gi"
    gpus_per_worker: int = 0  # with the device auto; device cuda requests at least 1, device cpu none
    env_from: tuple[str, ...] = ("configmap/dlforge-config", "secret/dlforge-objects")
    threads: int = 1
    poll_seconds: float = 1.0
    ttl_seconds: int = 3600  # Kubernetes removes a finished Job this long after, should the trainer not
    labels: dict[str, str] = field(default_factory=lambda: {"app.kubernetes.io/part-of": "dlforge"})


def pod_gpus(config: KubernetesConfig, device: str) -> int:
    """``nvidia.com/gpu`` each worker pod requests for a run on ``device`` (auto | cpu | cuda)."""
    if device == "cuda":
        return max(1, config.gpus_per_worker)
    if device == "cpu":
        return 0
    return config.gpus_per_worker


def job_name(job_id: str, attempt: str) -> str:
    """A DNS-1123 label for the Job and its Service (pod hostnames ``<name>-<index>`` stay under 63)."""
    digest = hashlib.sha256(f"{job_id}|{attempt}".encode()).hexdigest()[:12]
    return f"dlforge-train-{digest}"


def train_of(job_id: str) -> str:
    """The label value that marks every Job (and Service) of one training job, whatever its attempt."""
    return hashlib.sha256(job_id.encode()).hexdigest()[:16]


def _env_from(refs: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for ref in refs:
        kind, _, name = ref.partition("/")
        if kind not in ("configmap", "secret") or not name:
            raise ConfigError(f"DLFORGE_TRAINER_K8S_ENV_FROM: {ref!r} is not configmap/NAME or secret/NAME")
        out.append({"configMapRef": {"name": name}} if kind == "configmap" else {"secretRef": {"name": name}})
    return out


def render_worker_job(name: str, *, workers: int, launch_prefix: str, config: KubernetesConfig,
                      train_of: str = "") -> list[dict[str, Any]]:
    """The headless Service and the indexed Job of ``workers`` pods (in the order to create them);
    ``train_of`` marks them as the training job's (see :func:`train_of`)."""
    labels = {**config.labels, "app.kubernetes.io/name": "trainer-worker", "dlforge.io/train-job": name,
              **({"dlforge.io/train-of": train_of} if train_of else {})}
    resources: dict[str, dict[str, str]] = {"requests": {"cpu": config.cpu, "memory": config.memory},
                                            "limits": {"memory": config.memory}}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": name,  # <name>-<index>.<name>: the rendezvous address of pod 0
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
        "containers": [{
            "name": "worker",
            "image": config.image,
            "command": ["torchrun", "--nnodes", str(workers), "--nproc-per-node", "1",
                        "--node-rank", "$(NODE_RANK)", "--master-addr", f"{name}-0.{name}",
                        "--master-port", str(RDZV_PORT), "-m", "dlforge.trainer.pod", launch_prefix],
            "env": [
                {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                {"name": "OMP_NUM_THREADS", "value": str(config.threads)},
            ],
            "envFrom": _env_from(config.env_from),
            "ports": [{"name": "rdzv", "containerPort": RDZV_PORT}],
            "resources": resources,
        }],
    }
    if config.gpus_per_worker:
        resources["limits"]["nvidia.com/gpu"] = str(config.gpus_per_worker)
        pod_spec["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {"dlforge.io/train-job": name},
                 "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            "backoffLimit": 0,  # a worker that fails fails the run; the job resumes from its last state
            "ttlSecondsAfterFinished": config.ttl_seconds,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    return [service, job]


class KubernetesApi:
    """The few Kubernetes API calls the launcher makes (create, watch, delete), over HTTPS with a bearer token."""

    def __init__(self, config: KubernetesConfig, *, client: httpx.Client | None = None) -> None:
        self.namespace = config.namespace
        if client is None:
            headers = {}
            if config.token_file:
                try:
                    headers["Authorization"] = f"Bearer {Path(config.token_file).read_text().strip()}"
                except OSError as exc:
                    raise ConfigError(f"DLFORGE_TRAINER_K8S_TOKEN_FILE: cannot read {config.token_file}: {exc}") \
                        from exc
            verify: Any = config.ca_file if config.ca_file and Path(config.ca_file).exists() else True
            client = httpx.Client(base_url=config.api_url, headers=headers, verify=verify, timeout=30.0)
        self.client = client

    def _path(self, kind: str, name: str | None = None) -> str:
        base = (f"/apis/batch/v1/namespaces/{self.namespace}/jobs" if kind == "Job"
                else f"/api/v1/namespaces/{self.namespace}/services")
        return base if name is None else f"{base}/{name}"

    @staticmethod
    def _check(r: httpx.Response, what: str) -> None:
        if r.status_code >= 400:
            raise RuntimeError(f"kubernetes: {what}: HTTP {r.status_code}: {r.text[:500]}")

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        r = self.client.post(self._path(kind), json=manifest)
        self._check(r, f"create {kind} {name}")
        created: dict[str, Any] = r.json()
        return created

    def watch_job(self, name: str, *, resource_version: str | None, timeout_seconds: int,
                  ) -> list[dict[str, Any]]:
        """The Job's watch events after ``resource_version`` (the server ends the watch after the timeout)."""
        params: dict[str, str | int] = {"watch": 1, "fieldSelector": f"metadata.name={name}",
                                        "timeoutSeconds": timeout_seconds}
        if resource_version is not None:
            params["resourceVersion"] = resource_version
        events = []
        with self.client.stream("GET", self._path("Job"), params=params,
                                timeout=httpx.Timeout(30.0, read=timeout_seconds + 30.0)) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r, f"watch Job {name}")
            for line in r.iter_lines():
                if line.strip():
                    events.append(json.loads(line))
        return events

    def names(self, kind: str, selector: str) -> list[str]:
        """The names of the ``kind`` objects that match the label ``selector``."""
        r = self.client.get(self._path(kind), params={"labelSelector": selector})
        self._check(r, f"list {kind} {selector}")
        return [item["metadata"]["name"] for item in r.json().get("items", [])]

    def pod_logs(self, selector: str) -> dict[str, str]:
        """The log of each pod that matches the label ``selector``, by pod name."""
        r = self.client.get(f"/api/v1/namespaces/{self.namespace}/pods", params={"labelSelector": selector})
        self._check(r, f"list pods {selector}")
        logs = {}
        for pod in r.json().get("items", []):
            name = pod["metadata"]["name"]
            got = self.client.get(f"/api/v1/namespaces/{self.namespace}/pods/{name}/log")
            self._check(got, f"log of pod {name}")
            logs[name] = got.text
        return logs

    def delete(self, kind: str, name: str) -> None:
        """Delete (the Job's pods with it); gone already is fine."""
        r = self.client.delete(self._path(kind, name), params={"propagationPolicy": "Background"})
        if r.status_code != 404:
            self._check(r, f"delete {kind} {name}")


def _finished(status: dict[str, Any]) -> str | None:
    """'Complete' or 'Failed' (with the reason) once the Job has ended, else None."""
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            if cond["type"] == "Failed":
                return f"Failed: {cond.get('reason', '')} {cond.get('message', '')}".strip()
            return "Complete"
    return None


class KubernetesEngine(Engine):
    """Trains ``job.no_of_workers`` workers as the pods of an indexed Job (see the module docstring)."""

    name = "kubernetes"

    def __init__(self, config: KubernetesConfig, *, objects: ObjectStore, key_prefix: str, job_id: str,
                 api: KubernetesApi | None = None) -> None:
        self.config = config
        self.objects = objects
        self.key_prefix = key_prefix
        self.job_id = job_id
        self.api = api or KubernetesApi(config)

    def run(self, job: FitJob, listener: FitListener) -> FitResult:
        attempt = f"{time.time_ns():x}"
        name = job_name(self.job_id, attempt)
        launch = f"{self.key_prefix}/launch/{attempt}"
        with tempfile.TemporaryDirectory(dir=job.work_dir, prefix="k8s-") as tmp:
            job_dir = Path(tmp) / "job"
            _write_job(FitJob(**{**job.__dict__, "threads": self.config.threads}), job_dir)
            for f in sorted(job_dir.iterdir()):
                self.objects.put_file(f"{launch}/job/{f.name}", f)
            config = replace(self.config, gpus_per_worker=pod_gpus(self.config, job.device))
            manifests = render_worker_job(name, workers=job.no_of_workers, launch_prefix=launch, config=config,
                                          train_of=train_of(self.job_id))
            self._remove_earlier_attempts(launch)
            created: list[tuple[str, str]] = []
            try:
                for manifest in manifests:
                    self.api.create(manifest)
                    created.append((manifest["kind"], name))
                log.info("kubernetes: job %s: %d worker pods in %s", name, job.no_of_workers, self.config.namespace)
                return self._follow(name, launch, job, listener, Path(tmp))
            finally:
                if created:
                    self._keep_logs(name, attempt)
                for kind, n in reversed(created):
                    try:
                        self.api.delete(kind, n)
                    except (RuntimeError, httpx.HTTPError) as exc:  # the TTL removes the Job should this fail
                        log.warning("kubernetes: could not delete %s %s: %s", kind, n, exc)
                delete_prefix(self.objects, f"{launch}/")

    def _remove_earlier_attempts(self, launch: str) -> None:
        """Delete the Jobs and Services an earlier attempt of this training job left (its trainer was killed
        before it could): their pods would wait for answers nobody gives; and the files it wrote for its pods
        (the job, its state, the reports) under another prefix than this attempt's ``launch``."""
        selector = f"dlforge.io/train-of={train_of(self.job_id)}"
        for kind in ("Job", "Service"):
            for old in self.api.names(kind, selector):
                log.info("kubernetes: deleting %s %s of an earlier attempt of job %s", kind, old, self.job_id)
                self.api.delete(kind, old)
        for info in list(self.objects.list(f"{self.key_prefix}/launch/")):
            if not info.key.startswith(f"{launch}/"):
                self.objects.delete(info.key)

    def _keep_logs(self, name: str, attempt: str) -> None:
        """Copy the worker pods' logs to ``<key_prefix>/logs/<attempt>/<pod>.log`` before the pods are deleted."""
        try:
            logs = self.api.pod_logs(f"dlforge.io/train-job={name}")
        except (RuntimeError, httpx.HTTPError) as exc:
            log.warning("kubernetes: could not read the logs of job %s: %s", name, exc)
            return
        for pod, text in logs.items():
            self.objects.put_bytes(f"{self.key_prefix}/logs/{attempt}/{pod}.log", text.encode(),
                                   content_type="text/plain")

    def _follow(self, name: str, launch: str, job: FitJob, listener: FitListener, tmp: Path) -> FitResult:
        seen = 0
        version: str | None = None
        ended: str | None = None
        done: FitResult | None = None
        while True:
            for event in self.api.watch_job(name, resource_version=version,
                                            timeout_seconds=max(1, round(self.config.poll_seconds))):
                if event.get("type") == "ERROR":  # e.g. 410 Gone: the version is too old; watch from now
                    version = None
                    continue
                obj = event.get("object") or {}
                version = (obj.get("metadata") or {}).get("resourceVersion", version)
                ended = _finished(obj.get("status") or {}) or ended
                if event.get("type") == "DELETED" and ended is None:  # by hand, or by another attempt of the job:
                    ended = "was deleted before it ended"  # no event about it will come again
            for info in list(self.objects.list(f"{launch}/reports/")):
                seq = int(info.key.rsplit("/", 1)[-1].split(".")[0])
                if seq <= seen:
                    continue
                seen = seq
                done = self._dispatch(json.loads(self.objects.get_bytes(info.key)), launch, job, listener,
                                      tmp) or done
            if done is not None and ended is not None:
                if ended != "Complete":
                    log.warning("kubernetes: job %s ended %s after training had finished; the result stands",
                                name, ended)
                return done
            if ended is not None:  # every report was written before the pods ended, and has been read
                raise RuntimeError(f"kubernetes: job {name} {ended}" if ended != "Complete"
                                   else f"kubernetes: job {name} completed without a result from rank 0")

    def _dispatch(self, report: dict[str, Any], launch: str, job: FitJob, listener: FitListener,
                  tmp: Path) -> FitResult | None:
        kind = report["kind"]

        def tensors() -> Any:
            local = self.objects.get_file(report["file"], tmp / "report.pt")
            try:
                return torch.load(local, map_location="cpu", weights_only=kind != "state")  # from GPU pods too
            finally:
                local.unlink(missing_ok=True)

        if kind == "step":
            listener.on_step(int(report["step"]), float(report["loss"]))
        elif kind == "epoch":
            metrics = EpochMetrics.model_validate(report["metrics"])
            go_on = bool(listener.on_epoch(metrics))
            self.objects.put_bytes(reply_key(launch, metrics.epoch), json.dumps({"go_on": go_on}).encode(),
                                   content_type="application/json")
        elif kind == "checkpoint":
            listener.on_checkpoint(int(report["step"]), int(report["epoch"]), tensors())
        elif kind == "state":
            if job.on_state is not None:
                job.on_state(FitState.from_dict(tensors()))
        elif kind == "done":
            job.tail.load_state_dict(tensors())
            payload = report["result"]
            payload["epochs"] = [EpochMetrics.model_validate(m) for m in payload["epochs"]]
            return FitResult(**payload)
        return None


__all__ = ["KubernetesApi", "KubernetesConfig", "KubernetesEngine", "job_name", "render_worker_job", "train_of"]
