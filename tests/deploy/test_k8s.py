"""k8s/: core manifests against the Kubernetes OpenAPI schemas shipped by kubernetes-validate,
KEDA ScaledObjects against tests/deploy/assets/keda-scaledobject.schema.json, plus wiring rules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

# A schema set that kubernetes-validate ships (kubernetes_validate.utils.all_versions()).
KUBERNETES_VERSION = "1.33"
REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CORE_MANIFESTS = sorted(
    path.relative_to(REPO).as_posix()
    for path in K8S.rglob("*.yaml")
    if path.name != "kustomization.yaml" and "keda" not in path.relative_to(K8S).parts
)
KEDA_MANIFESTS = sorted(path.relative_to(REPO).as_posix() for path in (K8S / "keda").glob("*.yaml"))
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


def _documents(relpath: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((REPO / relpath).read_text(encoding="utf-8")) if doc]


@pytest.fixture(scope="module")
def core_documents() -> list[dict[str, Any]]:
    return [doc for relpath in CORE_MANIFESTS for doc in _documents(relpath)]


@pytest.fixture(scope="module")
def scaled_objects() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for relpath in KEDA_MANIFESTS for doc in _documents(relpath)}


@pytest.fixture(scope="module")
def keda_validator(load_json) -> jsonschema.protocols.Validator:
    schema = load_json("keda-scaledobject.schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def deployment_problems(deployment: dict[str, Any], *, gpu: bool) -> list[str]:
    """What is wrong with one service Deployment (empty when it is right)."""
    name = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    container = only_container(deployment)
    problems = []
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http_get = container.get(probe, {}).get("httpGet", {})
        if http_get.get("path") != path or http_get.get("port") not in ("http", 8000):
            problems.append(f"{name}: {probe} must GET {path} on port 8000")
    sources = {(kind, ref["name"]) for source in container.get("envFrom", []) for kind, ref in source.items()}
    if not {("configMapRef", "dlforge-config"), ("secretRef", "dlforge-objects"), ("secretRef", "dlforge-auth")} \
            <= sources:
        problems.append(f"{name}: envFrom must take dlforge-config, dlforge-objects and dlforge-auth")
    if {"name": "OTEL_SERVICE_NAME", "value": name} not in container.get("env", []):
        problems.append(f"{name}: OTEL_SERVICE_NAME is not {name}")
    resources = container.get("resources", {})
    for section in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(resources.get(section, {})):
            problems.append(f"{name}: resources.{section} needs cpu and memory")
    gpus = resources.get("limits", {}).get("nvidia.com/gpu")
    if gpu:
        if str(gpus) != "1":
            problems.append(f"{name}: limits must request nvidia.com/gpu: 1")
        if not pod.get("nodeSelector") or not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
            problems.append(f"{name}: needs a GPU nodeSelector and an nvidia.com/gpu toleration")
    elif gpus is not None:
        problems.append(f"{name}: must not request a GPU")
    return problems


@pytest.mark.parametrize("relpath", CORE_MANIFESTS)
def test_manifest_matches_kubernetes_schema(relpath):
    documents = _documents(relpath)
    assert documents
    for document in documents:
        # Raises ValidationError for a bad field and SchemaNotFoundError for an unknown kind.
        assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.__setitem__("readinesProbe", c.pop("readinessProbe")), id="misspelt-field"),
        pytest.param(lambda c: c["ports"][0].__setitem__("containerPort", "eight-thousand"), id="wrong-type"),
        pytest.param(lambda c: c.pop("name"), id="missing-required"),
    ],
)
def test_kubernetes_validate_rejects_a_broken_deployment(core_documents, breakage):
    broken = copy.deepcopy(find(core_documents, "Deployment", "labeler"))
    breakage(only_container(broken))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_rejects_an_unknown_kind():
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(
            {"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}}, KUBERNETES_VERSION, strict=True
        )


def test_service_deployment_is_complete(core_documents, gpu_services, service_name):
    deployment = find(core_documents, "Deployment", service_name)
    assert deployment_problems(deployment, gpu=service_name in gpu_services) == []
    assert only_container(deployment)["command"] == ["python", "-m", f"dlforge.{service_name}"]


def test_deployment_checks_catch_missing_probes_and_gpu(core_documents):
    trainer = copy.deepcopy(find(core_documents, "Deployment", "trainer"))
    container = only_container(trainer)
    del container["livenessProbe"]
    del container["resources"]["limits"]["nvidia.com/gpu"]
    problems = deployment_problems(trainer, gpu=True)
    assert len(problems) == 2, problems
    assert "livenessProbe" in problems[0] and "nvidia.com/gpu" in problems[1]
    labeler = find(core_documents, "Deployment", "labeler")
    assert any("GPU" in p or "nvidia" in p for p in deployment_problems(labeler, gpu=True))


def test_every_service_selects_a_workload_with_its_named_ports(core_documents):
    workloads = [d for d in core_documents if d["kind"] in WORKLOAD_KINDS]
    for service in (d for d in core_documents if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        selected = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        port_names = {p.get("name") for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)


def test_configuration_matches_compose(core_documents, yaml_documents):
    config = find(core_documents, "ConfigMap", "dlforge-config")["data"]
    secret = find(core_documents, "Secret", "dlforge-objects")["stringData"]
    auth = find(core_documents, "Secret", "dlforge-auth")["stringData"]
    (compose,) = yaml_documents("docker-compose.yml")
    compose_keys = set(compose["services"]["labeler"]["environment"]) - {"OTEL_SERVICE_NAME"}
    assert set(config) | set(secret) | set(auth) == compose_keys
    assert not set(config) & set(secret) and not (set(config) | set(secret)) & set(auth)
    assert config["DLFORGE_AUTH"] == "required" and config["DLFORGE_AUTH_URL"].startswith("http://console.")
    assert auth == {"DLFORGE_AUTH_SERVICE_TOKEN": ""}  # no secret is committed: it must be set to start
    assert config["DLFORGE_BUS"].startswith("kafka://")
    assert secret["DLFORGE_OBJECTS"].startswith("s3://")


def test_kafka_statefulset_runs_kraft_and_advertises_the_bus_address(core_documents):
    kafka = find(core_documents, "StatefulSet", "kafka")
    env = {e["name"]: e["value"] for e in only_container(kafka)["env"]}
    bus_host = find(core_documents, "ConfigMap", "dlforge-config")["data"]["DLFORGE_BUS"].removeprefix("kafka://")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{bus_host}"
    assert kafka["spec"]["template"]["spec"]["enableServiceLinks"] is False
    assert find(core_documents, "Service", "kafka")["spec"]["publishNotReadyAddresses"] is True


def test_kustomization_lists_every_manifest(repo):
    kustomization = yaml.safe_load((repo / "k8s" / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    on_disk = {path.relative_to(K8S).as_posix() for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk)
    assert kustomization["namespace"] == "dlforge"


def test_namespaced_resources_live_in_dlforge(core_documents, scaled_objects):
    for document in [*core_documents, *scaled_objects.values()]:
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == "dlforge", document["metadata"]["name"]


@pytest.mark.parametrize("relpath", KEDA_MANIFESTS)
def test_scaled_objects_match_keda_schema(keda_validator, relpath):
    documents = _documents(relpath)
    assert documents
    for document in documents:
        errors = [e.message for e in keda_validator.iter_errors(document)]
        assert errors == [], (document["metadata"]["name"], errors)


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda so: so["spec"]["triggers"][0]["metadata"].pop("consumerGroup"), "consumerGroup"),
        (lambda so: so["spec"]["triggers"][0]["metadata"].__setitem__("lagThreshold", 10), "10"),
        (lambda so: so["spec"].__setitem__("maxReplicas", 3), "maxReplicas"),
        (lambda so: so["spec"]["scaleTargetRef"].pop("name"), "name"),
        (lambda so: so.__setitem__("apiVersion", "keda.k8s.io/v1alpha1"), "keda.sh/v1alpha1"),
    ],
)
def test_keda_schema_rejects_broken_scaled_objects(keda_validator, scaled_objects, breakage, expected):
    broken = copy.deepcopy(scaled_objects["labeler"])
    breakage(broken)
    messages = [e.message for e in keda_validator.iter_errors(broken)]
    assert any(expected in message for message in messages), messages


def test_scaled_object_follows_consumer_lag(core_documents, scaled_objects, services, service_name):
    _, topics = services[service_name]
    scaled = scaled_objects[service_name]
    spec = scaled["spec"]
    bus_host = find(core_documents, "ConfigMap", "dlforge-config")["data"]["DLFORGE_BUS"].removeprefix("kafka://")
    assert spec["scaleTargetRef"]["name"] == find(core_documents, "Deployment", service_name)["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert sorted(t["metadata"]["topic"] for t in spec["triggers"]) == sorted(topics)
    for trigger in spec["triggers"]:
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == f"dlforge.{service_name}"
        assert trigger["metadata"]["bootstrapServers"] == bus_host


def test_one_scaled_object_per_service(scaled_objects, services):
    assert set(scaled_objects) == set(services)


def test_only_the_tuner_reaches_its_study_storage_and_it_is_on_its_own_claim(core_documents, scaled_objects, services):
    config = find(core_documents, "ConfigMap", "dlforge-config")["data"]
    assert not any("TUNER" in key for key in config)
    for name in services:
        container = only_container(find(core_documents, "Deployment", name))
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if name != "tuner":
            assert not any("TUNER" in key for key in env), name
            continue
        tuner = find(core_documents, "Deployment", "tuner")
        folder = env["DLFORGE_TUNER_STORAGE"].removeprefix("sqlite:///").rsplit("/", 1)[0]
        mounts = {m["mountPath"]: m["name"] for m in only_container(tuner)["volumeMounts"]}
        volumes = {v["name"]: v for v in tuner["spec"]["template"]["spec"]["volumes"]}
        claim = volumes[mounts[folder]]["persistentVolumeClaim"]["claimName"]
        assert find(core_documents, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
        # a SQLite file on a ReadWriteOnce claim: one pod at a time, also while rolling out
        assert tuner["spec"]["strategy"]["type"] == "Recreate"
        assert scaled_objects["tuner"]["spec"]["maxReplicaCount"] == 1


def test_no_service_leaves_the_cluster(core_documents):
    for service in (d for d in core_documents if d["kind"] == "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert not any("nodePort" in p for p in service["spec"]["ports"]), service["metadata"]["name"]


def test_the_console_service_holds_the_accounts(core_documents):
    console = find(core_documents, "Deployment", "console")
    assert deployment_problems(console, gpu=False) == []
    container = only_container(console)
    assert container["command"] == ["python", "-m", "dlforge.console"]
    # it reads the accounts itself: its DLFORGE_AUTH_URL (from the ConfigMap) is blanked
    assert {"name": "DLFORGE_AUTH_URL", "value": ""} in container["env"]
    find(core_documents, "Service", "console")
