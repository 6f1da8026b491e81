"""The Kubernetes launcher: the rendered indexed Job and headless Service, and its create / watch / delete calls.

What is real here and what is not:

* the manifests are checked against the Kubernetes 1.33 OpenAPI schemas kubernetes-validate ships (strict);
* the launcher's calls are real HTTP (its own httpx client, bearer token from a file) to a stand-in of the
  API server written below (``http.server`` on 127.0.0.1): it implements only the calls the launcher makes
  (create a Service and a Job, watch the Job with ``fieldSelector``/``resourceVersion``/``timeoutSeconds``,
  delete both), not the API's validation, admission or scheduling;
* the stand-in "schedules" the Job's pods by running each pod's container command from the created Job on
  this machine, with ``$(NODE_RANK)`` set to the pod's completion index, ``OMP_NUM_THREADS`` from the
  container's env, ``DLFORGE_OBJECTS`` as the pods' config map would give it, and the rendezvous host
  (``<job>-0.<service>``, cluster DNS) replaced by 127.0.0.1 with a free port. So ``torchrun``, the pod
  program, the gloo rendezvous and the reports through the object store are real; a cluster is not.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
import torch

from dlforge.common.objects import ObjectStore
from dlforge.trainer.engines import FitJob
from dlforge.trainer.handlers import TrainerConfig, TrainingRequest, run_training
from dlforge.trainer.launcher import KubernetesApi, KubernetesConfig, KubernetesEngine, render_worker_job, train_of
from dlforge.trainer.params import EpochMetrics, RunOptions, TrainParams
from dlforge.trainer.training import FitListener

KUBERNETES_VERSION = "1.33"  # as tests/deploy/test_k8s.py
TOKEN = "stand-in-token"
CLASSES = ["defect", "good"]


def test_the_job_for_four_workers_is_valid_and_wired_for_torchrun() -> None:
    config = KubernetesConfig(image="dlforge/trainer:0.1.0-gpu", gpus_per_worker=1)
    service, job = render_worker_job("dlforge-train-abc", workers=4, launch_prefix="trainer/jobs/j/launch/1",
                                     config=config)
    for doc in (service, job):
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    pod = spec["template"]["spec"]
    # the headless Service gives pod 0 the DNS name the other pods rendezvous at
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"] == "dlforge-train-abc"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    [container] = pod["containers"]
    command = container["command"]
    assert command[0] == "torchrun" and command[-3:] == ["-m", "dlforge.trainer.pod", "trainer/jobs/j/launch/1"]
    args = dict(zip(command[1:-3:2], command[2:-3:2], strict=True))
    assert args == {"--nnodes": "4", "--nproc-per-node": "1", "--node-rank": "$(NODE_RANK)",
                    "--master-addr": "dlforge-train-abc-0.dlforge-train-abc", "--master-port": "29500"}
    [rank_env] = [e for e in container["env"] if e["name"] == "NODE_RANK"]
    assert rank_env["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["envFrom"] == [{"configMapRef": {"name": "dlforge-config"}},
                                    {"secretRef": {"name": "dlforge-objects"}}]
    for breakage in ({"completions": "four"}, {"parallelizm": 4}):  # the check can fail: a type, a misspelt field
        broken = json.loads(json.dumps(job))
        broken["spec"].update(breakage)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_launcher_settings_are_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.common.errors import ConfigError
    from dlforge.common.settings import load_settings
    from dlforge.trainer.settings import TrainerSettings

    monkeypatch.setenv("DLFORGE_TRAINER_LAUNCHER", "kubernetes")
    with pytest.raises(ConfigError, match="DLFORGE_TRAINER_K8S_IMAGE is required"):
        load_settings(TrainerSettings)
    monkeypatch.setenv("DLFORGE_TRAINER_K8S_IMAGE", "dlforge/trainer:0.1.0")
    monkeypatch.setenv("DLFORGE_TRAINER_K8S_ENV_FROM", "configmap/dlforge-config,vault/objects")
    with pytest.raises(ConfigError, match="'vault/objects': give configmap/NAME or secret/NAME"):
        load_settings(TrainerSettings)
    monkeypatch.setenv("DLFORGE_TRAINER_K8S_ENV_FROM", "secret/objects")
    k8s = TrainerConfig.from_settings(load_settings(TrainerSettings)).kubernetes
    assert k8s is not None and k8s.image == "dlforge/trainer:0.1.0" and k8s.env_from == ("secret/objects",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ApiStandIn:
    """The part of a Kubernetes API server the launcher uses, with pods run as local processes (see above)."""

    def __init__(self, pod_env: dict[str, str], logs: Path) -> None:
        self.pod_env, self.logs = pod_env, logs
        self.calls: list[tuple[str, str, dict[str, list[str]]]] = []
        self.created: list[dict[str, Any]] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.pods: list[subprocess.Popen[bytes]] = []
        self.version = 0
        self.changed = threading.Condition()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                """Quiet."""

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self) -> tuple[str, str, str | None, dict[str, list[str]]] | None:
                url = urlsplit(self.path)
                m = re.fullmatch(r"/(?:apis/batch/v1|api/v1)/namespaces/([^/]+)/(jobs|services|pods)"
                                 r"(?:/([^/]+)(?:/log)?)?", url.path)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._reply(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                    return None
                if m is None:
                    self._reply(404, {"kind": "Status", "code": 404})
                    return None
                query = parse_qs(url.query)
                stand_in.calls.append((self.command, url.path, query))
                return m.group(1), m.group(2), m.group(3), query

            def do_POST(self) -> None:
                route = self._route()
                if route is None:
                    return
                _, plural, _, _ = route
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.created.append(body)
                with stand_in.changed:
                    stand_in.version += 1
                    body["metadata"]["resourceVersion"] = str(stand_in.version)
                    (stand_in.jobs if plural == "jobs" else stand_in.services)[body["metadata"]["name"]] = body
                if plural == "jobs":
                    stand_in.start_pods(body)
                self._reply(201, body)

            def _pods(self, pod: str | None, query: dict[str, list[str]]) -> None:
                """The pod list (by the Job's label) or one pod's log (its process's output)."""
                if pod is None:
                    job = query["labelSelector"][0].removeprefix("dlforge.io/train-job=")
                    self._reply(200, {"kind": "PodList", "items": [
                        {"metadata": {"name": f"{job}-{i}-x7k2p"}} for i in range(len(stand_in.pods))]})
                    return
                data = (stand_in.logs / f"pod-{int(pod.split('-')[-2])}.out").read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_DELETE(self) -> None:
                route = self._route()
                if route is None:
                    return
                _, plural, name, _ = route
                store = stand_in.jobs if plural == "jobs" else stand_in.services
                if name not in store:
                    self._reply(404, {"kind": "Status", "code": 404})
                    return
                if plural == "jobs":
                    stand_in.stop_pods()
                with stand_in.changed:
                    del store[name]
                self._reply(200, {"kind": "Status", "status": "Success"})

            def do_GET(self) -> None:
                route = self._route()
                if route is None:
                    return
                _, plural, pod, query = route
                if plural == "pods":
                    self._pods(pod, query)
                    return
                if "watch" not in query:  # a list by label selector
                    key, _, value = query["labelSelector"][0].partition("=")
                    store = stand_in.jobs if plural == "jobs" else stand_in.services
                    self._reply(200, {"kind": "List", "items": [
                        o for o in store.values() if o["metadata"]["labels"].get(key) == value]})
                    return
                assert plural == "jobs" and query.get("watch") == ["1"], query
                name = query["fieldSelector"][0].removeprefix("metadata.name=")
                since = int(query.get("resourceVersion", ["0"])[0])
                deadline = time.monotonic() + int(query["timeoutSeconds"][0])
                with stand_in.changed:
                    stand_in.changed.wait_for(lambda: stand_in.job_version(name) > since,
                                              timeout=max(0.0, deadline - time.monotonic()))
                    job = stand_in.jobs.get(name)
                    events = [] if job is None or int(job["metadata"]["resourceVersion"]) <= since else [
                        {"type": "MODIFIED" if since else "ADDED", "object": json.loads(json.dumps(job))}]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                for event in events:  # one JSON object a line; the watch ends with the response
                    self.wfile.write(json.dumps(event).encode() + b"\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def job_version(self, name: str) -> int:
        job = self.jobs.get(name)
        return int(job["metadata"]["resourceVersion"]) if job else 0

    def start_pods(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        [container] = job["spec"]["template"]["spec"]["containers"]
        port = str(_free_port())
        env = {**self.pod_env, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
        for index in range(job["spec"]["completions"]):
            command = [{f"{name}-0.{name}": "127.0.0.1", "29500": port, "$(NODE_RANK)": str(index)}.get(a, a)
                       for a in container["command"]]
            assert command[0] == "torchrun"
            with (self.logs / f"pod-{index}.out").open("wb") as out:
                self.pods.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *command[1:]],
                                                  env=env, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
        threading.Thread(target=self._follow_pods, args=(name,), daemon=True).start()

    def _follow_pods(self, name: str) -> None:
        codes = [p.wait() for p in self.pods]
        with self.changed:
            job = self.jobs.get(name)
            if job is None:
                return
            ok = all(c == 0 for c in codes)
            self.version += 1
            job["metadata"]["resourceVersion"] = str(self.version)
            job["status"] = {"succeeded": sum(c == 0 for c in codes), "failed": sum(c != 0 for c in codes),
                             "conditions": [{"type": "Complete" if ok else "Failed", "status": "True",
                                             **({} if ok else {"reason": "BackoffLimitExceeded",
                                                               "message": "Job has reached the backoff limit"})}]}
            self.changed.notify_all()

    def stop_pods(self) -> None:
        for p in self.pods:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=60)

    def __enter__(self) -> ApiStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_pods()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[ApiStandIn, KubernetesConfig]]:
    (tmp_path / "token").write_text(TOKEN + "\n")
    pod_env = {**{k: v for k, v in os.environ.items() if not k.startswith("DLFORGE_")},
               "PYTHONPATH": os.pathsep.join(sys.path), "DLFORGE_OBJECTS": f"file://{tmp_path}/objects",
               "GLOO_SOCKET_IFNAME": "lo"}
    with ApiStandIn(pod_env, tmp_path) as api:
        yield api, KubernetesConfig(image="dlforge/trainer:test", api_url=api.url, token_file=str(tmp_path / "token"),
                                    ca_file=None, poll_seconds=1.0)


def _request(workers: int) -> TrainingRequest:
    return TrainingRequest(weights_key="proposer/models/small_cnn-mnist.pt", manifest_key="testdata/manifest.json",
                           classes=CLASSES, hparams=TrainParams(lr=0.005, batch_size=8, epochs=2, unfreeze=2,
                                                                dropout=0.0),
                           run_config=RunOptions(no_of_workers=workers, checkpoint_every_steps=5,
                                                 summary_every_steps=1))


@pytest.mark.slow
def test_the_launcher_creates_follows_and_deletes_the_job(
    objects: ObjectStore, manifest_key: str, weights_key: str, config: TrainerConfig,
    kube: tuple[ApiStandIn, KubernetesConfig],
) -> None:
    api, k8s = kube
    reference = run_training(objects, _request(1), job_id="local", key_prefix="trainer/jobs/local", config=config)
    # what an earlier attempt of this job left when its trainer was killed (its pods are not run here)
    for doc in render_worker_job("dlforge-train-earlier", workers=2, launch_prefix="trainer/jobs/k8s/launch/0",
                                 config=k8s, train_of=train_of("k8s")):
        (api.jobs if doc["kind"] == "Job" else api.services)[doc["metadata"]["name"]] = doc
    seen: list[int] = []

    def on_epoch(m: EpochMetrics) -> bool:
        seen.append(m.epoch)
        return True

    launched = TrainerConfig(**{**config.__dict__, "kubernetes": k8s})
    out = run_training(objects, _request(2), job_id="k8s", key_prefix="trainer/jobs/k8s", config=launched,
                       on_epoch=on_epoch)

    # the calls, in order: remove the earlier attempt's Job and Service, create the Service and the Job, watch the
    # Job, list its pods and read their logs, delete the Job (its pods) and the Service
    methods = [(m, p.split("/namespaces/dlforge/")[1].split("/")[0]) for m, p, _ in api.calls]
    watches = [q for m, p, q in api.calls if m == "GET" and p.endswith("/jobs") and "watch" in q]
    assert api.calls[0][2] == api.calls[2][2] == {"labelSelector": [f"dlforge.io/train-of={train_of('k8s')}"]}
    assert [(m, p.rsplit("/", 1)[-1]) for m, p, _ in (api.calls[1], api.calls[3])] == [
        ("DELETE", "dlforge-train-earlier")] * 2
    assert methods[:4] == [("GET", "jobs"), ("DELETE", "jobs"), ("GET", "services"), ("DELETE", "services")]
    del methods[:4]
    assert methods[:2] == [("POST", "services"), ("POST", "jobs")]
    assert methods[-5:] == [("GET", "pods")] * 3 + [("DELETE", "jobs"), ("DELETE", "services")]  # list, 2 logs
    assert set(methods[2:-5]) == {("GET", "jobs")} and len(watches) >= 1
    assert all(q["fieldSelector"] == [f"metadata.name={api.created[1]['metadata']['name']}"] for q in watches)
    assert [q.get("propagationPolicy") for m, _, q in api.calls if m == "DELETE"] == [["Background"]] * 4
    assert api.jobs == {} and api.services == {}  # cleaned up
    assert api.created[1]["spec"]["completions"] == 2
    for doc in api.created:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    launch = api.created[1]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert launch.startswith("trainer/jobs/k8s/launch/") and list(objects.list(launch + "/")) == []
    # the pods' logs were kept before they were deleted
    attempt = launch.rsplit("/", 1)[-1]
    name = api.created[1]["metadata"]["name"]
    logs = {i.key: objects.get_bytes(i.key).decode() for i in objects.list("trainer/jobs/k8s/logs/")}
    assert sorted(logs) == [f"trainer/jobs/k8s/logs/{attempt}/{name}-{i}-x7k2p.log" for i in (0, 1)]
    assert all(text == (api.logs / f"pod-{i}.out").read_text() for i, text in enumerate(logs.values()))

    # the run came back through the reports: epochs answered, checkpoints kept, the trained weights returned
    assert out.state == "completed" and seen == [1, 2] and out.no_of_workers == 2
    assert out.steps == reference.steps == 2 * -(-out.train_rows // 8)
    assert out.checkpoints == [f"trainer/jobs/k8s/checkpoints/step-{s:07d}.pt" for s in range(5, out.steps + 1, 5)]
    # 2 pods train the 1-process gradient of each global batch (see dlforge.trainer.training): the same run
    assert [m.train_loss for m in out.epochs] == pytest.approx([m.train_loss for m in reference.epochs], rel=1e-4)
    for a, b in zip(out.model.state_dict().values(), reference.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_a_failed_job_fails_the_run_and_is_still_deleted(
    objects: ObjectStore, manifest_key: str, weights_key: str, config: TrainerConfig,
    kube: tuple[ApiStandIn, KubernetesConfig],
) -> None:
    api, k8s = kube
    del api.pod_env["DLFORGE_OBJECTS"]  # the pods cannot reach the object store: they exit with status 2
    # the files an earlier attempt wrote for its pods (the job, the state to resume from, a report) when its
    # trainer was killed before it could delete them
    for name in ("job/tail.pt", "job/resume.pt", "reports/000000001.json"):
        objects.put_bytes(f"trainer/jobs/k8s/launch/0/{name}", b"left by a killed attempt")
    launched = TrainerConfig(**{**config.__dict__, "kubernetes": k8s})
    with pytest.raises(RuntimeError, match="Failed: BackoffLimitExceeded"):
        run_training(objects, _request(2), job_id="k8s", key_prefix="trainer/jobs/k8s", config=launched)
    assert [(m, p.rsplit("/", 2)[-2]) for m, p, _ in api.calls if m == "DELETE"] == [("DELETE", "jobs"),
                                                                                      ("DELETE", "services")]
    assert api.created[1]["metadata"]["labels"]["dlforge.io/train-of"] == train_of("k8s")
    # the pods' logs say why they failed
    logs = [objects.get_bytes(i.key).decode() for i in objects.list("trainer/jobs/k8s/logs/")]
    assert len(logs) == 2 and all("DLFORGE_OBJECTS is not set" in text for text in logs)
    assert api.jobs == {} and api.services == {}
    assert list(objects.list("trainer/jobs/k8s/launch/")) == []


def test_the_trainers_role_grants_the_calls_the_launcher_makes() -> None:
    """k8s/trainer-launcher.yaml lets the trainer's service account make each call of launcher.KubernetesApi."""
    import yaml

    k8s_dir = Path(__file__).resolve().parents[2] / "k8s"
    docs = [d for d in yaml.safe_load_all((k8s_dir / "trainer-launcher.yaml").read_text()) if d]
    role = next(d for d in docs if d["kind"] == "Role")
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {("batch", "jobs", v) for v in ("create", "list", "watch", "delete")} | {
        ("", "services", v) for v in ("create", "list", "delete")} | {("", "pods", "list"), ("", "pods/log", "get")}
    assert needed <= granted
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trainer", "namespace": "dlforge"}]
    trainer = next(d for d in yaml.safe_load_all((k8s_dir / "services.yaml").read_text())
                   if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "trainer")
    assert trainer["spec"]["template"]["spec"]["serviceAccountName"] == "trainer"


class _DeletedJobApi:
    """An API whose watch says the Job was deleted (by hand, or by another trainer's attempt of the same job)
    before it ended; then it has nothing more to say about it."""

    def __init__(self) -> None:
        self.watches = 0

    def watch_job(self, name: str, *, resource_version: str | None, timeout_seconds: int) -> list[dict[str, Any]]:
        self.watches += 1
        if self.watches > 5:
            raise AssertionError(f"still following Job {name} after it was deleted")
        if self.watches > 1:
            return []
        return [{"type": "DELETED", "object": {"metadata": {"name": name, "resourceVersion": "7"},
                                               "status": {"active": 2}}}]


def test_a_job_deleted_before_it_ended_fails_the_run(objects: ObjectStore, tmp_path: Path) -> None:
    api = _DeletedJobApi()
    engine = KubernetesEngine(KubernetesConfig(image="dlforge/trainer:test"), objects=objects,
                              key_prefix="trainer/jobs/gone", job_id="gone", api=cast(KubernetesApi, api))
    with pytest.raises(RuntimeError, match="dlforge-train-gone was deleted"):
        engine._follow("dlforge-train-gone", "trainer/jobs/gone/launch/1", cast(FitJob, None),
                       cast(FitListener, None), tmp_path)
    assert api.watches == 1
