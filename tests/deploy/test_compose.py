"""docker-compose.yml and docker-compose.gpu.yml against the compose-spec schema and our own rules."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
INFRASTRUCTURE = ("kafka", "mongo", "minio", "jaeger")
HEALTHY_DEPENDENCIES = ("kafka", "mongo", "minio")
EXPECTED_ENV = {
    "DLFORGE_BUS": "kafka://kafka:9092",
    "DLFORGE_OBJECTS": "s3://minioadmin:minioadmin@minio:9000/dlforge",
    "DLFORGE_DOCS": "mongodb://mongo:27017/dlforge",
    "DLFORGE_HTTP_HOST": "0.0.0.0",
    "DLFORGE_HTTP_PORT": "8000",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318",
    "DLFORGE_AUTH": "required",
    "DLFORGE_AUTH_URL": "http://console:8000",
}
# the secret comes from .env; compose refuses to start without it (no default is committed)
SERVICE_TOKEN = "${DLFORGE_AUTH_SERVICE_TOKEN:?"


@pytest.fixture(scope="module")
def compose_validator(load_json) -> jsonschema.protocols.Validator:
    schema = load_json("compose-spec.json")
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


@pytest.fixture(scope="module")
def compose(yaml_documents) -> dict[str, Any]:
    (document,) = yaml_documents("docker-compose.yml")
    return document


def schema_errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def service_problems(compose: dict[str, Any], name: str, host_port: int) -> list[str]:
    """What is wrong with one dlforge service's entry (empty when it is right)."""
    service = compose.get("services", {}).get(name)
    if service is None:
        return [f"service {name} is missing"]
    problems = []
    build = service.get("build", {})
    if build != {"context": ".", "dockerfile": f"services/{name}/Dockerfile"}:
        problems.append(f"{name}: build is {build!r}")
    environment = service.get("environment", {})
    if not isinstance(environment, dict):
        return [*problems, f"{name}: environment must be a mapping"]
    for key, value in {**EXPECTED_ENV, "OTEL_SERVICE_NAME": name}.items():
        if str(environment.get(key)) != value:
            problems.append(f"{name}: {key}={environment.get(key)!r}, expected {value!r}")
    if not str(environment.get("DLFORGE_AUTH_SERVICE_TOKEN", "")).startswith(SERVICE_TOKEN):
        problems.append(f"{name}: DLFORGE_AUTH_SERVICE_TOKEN must be required from the environment")
    depends_on = service.get("depends_on", {})
    for dependency in HEALTHY_DEPENDENCIES:
        condition = depends_on.get(dependency, {}).get("condition") if isinstance(depends_on, dict) else None
        if condition != "service_healthy":
            problems.append(f"{name}: depends_on {dependency} condition is {condition!r}")
    if service.get("ports") != [f"127.0.0.1:{host_port}:8000"]:
        problems.append(f"{name}: ports are {service.get('ports')!r}, expected ['127.0.0.1:{host_port}:8000']")
    test = service.get("healthcheck", {}).get("test", [])
    if not any("/healthz" in str(part) for part in test):
        problems.append(f"{name}: healthcheck does not hit /healthz")
    if service.get("command", ["python", "-m", f"dlforge.{name}"]) != ["python", "-m", f"dlforge.{name}"]:
        problems.append(f"{name}: command is {service.get('command')!r}")
    return problems


@pytest.mark.parametrize("filename", COMPOSE_FILES)
def test_compose_file_matches_compose_spec(filename, compose_validator, yaml_documents):
    (document,) = yaml_documents(filename)
    assert schema_errors(compose_validator, document) == []
    assert "version" not in document, "the compose spec dropped the top-level version key"


def test_schema_rejects_broken_compose_files(compose_validator, compose):
    bad_condition = copy.deepcopy(compose)
    bad_condition["services"]["labeler"]["depends_on"]["kafka"]["condition"] = "service_ready"
    misspelt_key = copy.deepcopy(compose)
    misspelt_key["services"]["mongo"]["helthcheck"] = misspelt_key["services"]["mongo"].pop("healthcheck")
    bad_build = copy.deepcopy(compose)
    bad_build["services"]["tuner"]["build"]["dockerfiles"] = "services/tuner/Dockerfile"

    assert any("service_ready" in e for e in schema_errors(compose_validator, bad_condition))
    assert any("helthcheck" in e for e in schema_errors(compose_validator, misspelt_key))
    assert any("dockerfiles" in e for e in schema_errors(compose_validator, bad_build))


def test_each_service_is_wired_to_the_infrastructure(compose, services, service_name):
    host_port, _ = services[service_name]
    assert service_problems(compose, service_name, host_port) == []


def test_service_checks_catch_a_miswired_service(compose):
    broken = copy.deepcopy(compose)
    trainer = broken["services"]["trainer"]
    del trainer["environment"]["DLFORGE_DOCS"]
    trainer["depends_on"]["mongo"]["condition"] = "service_started"
    trainer["ports"] = ["8001:8000"]
    del broken["services"]["optimizer"]

    trainer_problems = service_problems(broken, "trainer", 8005)
    assert len(trainer_problems) == 3, trainer_problems
    assert service_problems(broken, "optimizer", 8006) == ["service optimizer is missing"]


def test_only_known_services_and_no_host_port_clashes(compose, services):
    assert set(compose["services"]) == {*INFRASTRUCTURE, "minio-init", "console", *services}
    published = [
        str(port).rsplit(":", 1)[0] for service in compose["services"].values() for port in service.get("ports", [])
    ]
    assert len(published) == len(set(published)), published


def test_no_port_is_published_to_the_world(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_the_console_service_holds_the_accounts(compose):
    console = compose["services"]["console"]
    assert console["build"] == {"context": ".", "dockerfile": "services/console/Dockerfile"}
    assert console["command"] == ["python", "-m", "dlforge.console"]
    assert console["ports"] == ["127.0.0.1:8000:8000"]
    env = console["environment"]
    # it verifies tokens in the document store itself, and accepts the services' shared token
    assert env["DLFORGE_AUTH_URL"] == "" and env["DLFORGE_AUTH"] == "required"
    assert env["DLFORGE_DOCS"] == EXPECTED_ENV["DLFORGE_DOCS"]
    assert str(env["DLFORGE_AUTH_SERVICE_TOKEN"]).startswith(SERVICE_TOKEN)


def test_infrastructure_has_healthchecks_and_kafka_runs_kraft(compose):
    services = compose["services"]
    for name in HEALTHY_DEPENDENCIES:
        assert services[name]["healthcheck"]["test"], name
    kafka_env = services["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    # KRaft cluster ids are 16 bytes in URL-safe base64 without padding.
    assert len(kafka_env["CLUSTER_ID"]) == 22
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "127.0.0.1:4318:4318" in services["jaeger"]["ports"]


def test_bucket_job_creates_the_bucket_before_services_start(compose, services):
    job = compose["services"]["minio-init"]
    assert job["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mb --ignore-existing dlforge/dlforge" in " ".join(job["command"])
    for name in services:
        assert compose["services"][name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_gpu_override_gives_the_trainer_every_gpu_and_the_optimizer_one(yaml_documents, gpu_services):
    (override,) = yaml_documents("docker-compose.gpu.yml")
    assert set(override["services"]) == gpu_services
    counts = {"trainer": "all", "optimizer": 1}  # DDP: one worker per GPU over NCCL, in the trainer's container
    for name in gpu_services:
        service = override["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "count": counts[name], "capabilities": ["gpu"]}
        assert "TORCH_INDEX_URL" in service["build"]["args"]
    assert override["services"]["trainer"]["environment"]["DLFORGE_TRAINER_DEVICE"].startswith("${")
    assert override["services"]["optimizer"]["build"]["target"] == "gpu"  # the stage with the `gpu` extra


def test_build_targets_exist(compose, repo, services):
    for name in services:
        build = compose["services"][name]["build"]
        assert (repo / build["context"] / build["dockerfile"]).is_file(), name


def test_only_the_tuner_reaches_its_study_storage_and_it_is_on_a_volume(compose, services):
    services_ = compose["services"]
    for name in services:
        if name != "tuner":
            assert not any("TUNER" in key for key in services_[name]["environment"]), name
            assert not services_[name].get("volumes"), f"{name} needs no volume of its own"
    url = services_["tuner"]["environment"]["DLFORGE_TUNER_STORAGE"]
    assert url.startswith("sqlite:////")
    folder = url.removeprefix("sqlite:///").rsplit("/", 1)[0]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in services_["tuner"]["volumes"]}
    assert folder in volumes and volumes[folder] in compose["volumes"]  # a named volume: it outlives the container
