"""Settings: a bad backend URL stops the process at start with a message naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlforge.common.backends import open_bus, open_docs, open_objects
from dlforge.common.bus.kafka import KafkaBus
from dlforge.common.bus.sqlite import SqliteBus, SqliteBusOptions
from dlforge.common.errors import ConfigError
from dlforge.common.settings import CommonSettings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("DLFORGE_") or var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("DLFORGE_OBJECTS", f"file://{tmp_path}/objects")
    monkeypatch.setenv("DLFORGE_DOCS", f"sqlite:///{tmp_path}/docs.db")


BAD = [
    ("DLFORGE_BUS", "rabbitmq://localhost", "scheme must be one of sqlite://, memory://, kafka://"),
    ("DLFORGE_BUS", "sqlite://", "a file path is required"),
    ("DLFORGE_BUS", "sqlite:///", "a file path is required"),
    ("DLFORGE_BUS", "sqlite://host/bus.db", "a file path after three slashes is required"),
    ("DLFORGE_BUS", "sqlite:///:memory:", "use memory:// for an in-process bus"),
    ("DLFORGE_BUS", "sqlite:///bus.db?partitions=0", "partitions must be an integer >= 1, got '0'"),
    ("DLFORGE_BUS", "sqlite:///bus.db?poll_ms=fast", "poll_ms must be an integer >= 1, got 'fast'"),
    ("DLFORGE_BUS", "sqlite:///bus.db?synchronous=off", "synchronous must be one of normal, full, got 'off'"),
    ("DLFORGE_BUS", "sqlite:///bus.db?partiton=2", "unknown option 'partiton'"),
    ("DLFORGE_BUS", "kafka://", "a host is required"),
    ("DLFORGE_BUS", "kafka://broker", "each broker must be host:port"),
    ("DLFORGE_BUS", "kafka://broker:9092,other", "each broker must be host:port"),
    ("DLFORGE_BUS", "kafka://broker:9092?partitions=three", "partitions must be a positive integer"),
    ("DLFORGE_BUS", "kafka://broker:9092?partitons=3", "unknown option 'partitons'"),
    ("DLFORGE_OBJECTS", "ftp://host/bucket", "scheme must be one of file://, s3://, s3s://"),
    ("DLFORGE_OBJECTS", "s3://key:secret@host:9000", "the bucket is missing"),
    ("DLFORGE_OBJECTS", "s3://host:9000/bucket", "credentials missing"),
    ("DLFORGE_OBJECTS", "s3://key:secret@host:port/bucket", "the port is not a number"),
    ("DLFORGE_OBJECTS", "file://", "a folder is required"),
    ("DLFORGE_DOCS", "postgres://localhost/db", "scheme must be one of sqlite://, mongodb://"),
    ("DLFORGE_DOCS", "sqlite://", "a file path is required"),
    ("DLFORGE_DOCS", "mongodb:///db", "a host is required"),
    ("DLFORGE_HTTP_PORT", "eighty", "DLFORGE_HTTP_PORT"),
    ("DLFORGE_RETRY_ATTEMPTS", "0", "greater than or equal to 1"),
]


@pytest.mark.parametrize(("var", "value", "why"), BAD, ids=[f"{v}={x}" for v, x, _ in BAD])
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, why: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert f"{var}:" in message and why in message, message
    for other in ("DLFORGE_BUS", "DLFORGE_OBJECTS", "DLFORGE_DOCS"):
        if other != var:
            assert f"{other}:" not in message  # only the bad one is blamed


def test_several_bad_values_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_BUS", "nats://x")
    monkeypatch.setenv("DLFORGE_DOCS", "redis://x")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "DLFORGE_BUS:" in str(err.value) and "DLFORGE_DOCS:" in str(err.value)


def test_good_values_load_and_open(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DLFORGE_BUS", "kafka://b1:9092,b2:9093?partitions=6&topic_prefix=prod.&fetch_max_wait_ms=50")
    monkeypatch.setenv("DLFORGE_OBJECTS", "s3://key:secret@minio:9000/dlforge/prefix")
    monkeypatch.setenv("DLFORGE_HTTP_PORT", "8123")
    settings = load_settings()
    assert isinstance(settings, CommonSettings) and settings.http_port == 8123
    bus = open_bus(settings.bus)
    assert isinstance(bus, KafkaBus)
    assert bus.options.bootstrap_servers == "b1:9092,b2:9093"
    assert (bus.options.partitions, bus.options.topic_prefix, bus.options.fetch_max_wait_ms) == (6, "prod.", 50)
    store = open_objects(settings.objects)
    assert (store.bucket, store.prefix) == ("dlforge", "prefix/")  # type: ignore[attr-defined]
    open_docs(f"sqlite:///{tmp_path}/d.db")


def test_the_default_bus_is_the_durable_sqlite_log() -> None:
    settings = load_settings()
    assert settings.bus == "sqlite:///./.dlforge/bus.db"
    bus = open_bus(settings.bus)
    assert isinstance(bus, SqliteBus)
    assert bus.options == SqliteBusOptions(path="./.dlforge/bus.db", partitions=1, poll_ms=50,
                                           heartbeat_interval_ms=1000, session_timeout_ms=10_000,
                                           retention_hours=168, synchronous="normal")


def test_sqlite_bus_urls_take_relative_and_absolute_paths_and_options() -> None:
    bus = open_bus(load_settings(bus="sqlite:////srv/dlforge/bus.db?partitions=4&poll_ms=20&retention_hours=0"
                                     "&synchronous=FULL&session_timeout_ms=3000&heartbeat_interval_ms=500").bus)
    assert isinstance(bus, SqliteBus)
    assert bus.options == SqliteBusOptions(path="/srv/dlforge/bus.db", partitions=4, poll_ms=20,
                                           heartbeat_interval_ms=500, session_timeout_ms=3000, retention_hours=0,
                                           synchronous="full")
    relative = open_bus("sqlite:///state/bus.db")
    assert isinstance(relative, SqliteBus) and relative.options.path == "state/bus.db"


def test_s3_credentials_may_come_from_the_aws_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_OBJECTS", "s3://minio:9000/bucket")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert load_settings().objects == "s3://minio:9000/bucket"


def test_overrides_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="DLFORGE_BUS:"):
        load_settings(bus="http://nope")


def test_an_unknown_scheme_at_open_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DLFORGE_DOCS: no docs backend for scheme 'postgres'"):
        open_docs("postgres://x/y")


def _check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DLFORGE_", "AWS_", "OTEL_"))}
    return subprocess.run([sys.executable, "-m", "dlforge.common.check_settings", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("var", "value"), [("DLFORGE_BUS", "kafka://"), ("DLFORGE_OBJECTS", "s3://h:1/"),
                                            ("DLFORGE_DOCS", "postgres://db")])
def test_check_settings_exits_non_zero_naming_the_variable(tmp_path: Path, var: str, value: str) -> None:
    env = {"DLFORGE_OBJECTS": f"file://{tmp_path}/o", "DLFORGE_DOCS": f"sqlite:///{tmp_path}/d.db", var: value}
    result = _check(env)
    assert result.returncode == 2, result
    assert f"{var}:" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_settings_reports_an_unreachable_backend(tmp_path: Path) -> None:
    env = {"DLFORGE_BUS": "kafka://127.0.0.1:9", "DLFORGE_OBJECTS": f"file://{tmp_path}/o",
           "DLFORGE_DOCS": f"sqlite:///{tmp_path}/d.db"}
    result = _check(env, "--timeout", "3")
    assert result.returncode == 2
    assert "DLFORGE_BUS: cannot reach kafka://127.0.0.1:9" in result.stderr


@pytest.mark.parametrize("bus", ["memory://", "sqlite:///{tmp}/state/bus.db"])
def test_check_settings_passes_and_redacts_secrets(tmp_path: Path, bus: str) -> None:
    env = {"DLFORGE_BUS": bus.format(tmp=tmp_path), "DLFORGE_OBJECTS": f"file://{tmp_path}/o",
           "DLFORGE_DOCS": f"sqlite:///{tmp_path}/d.db"}
    result = _check(env)
    assert result.returncode == 0, result.stderr
    assert "settings ok" in result.stdout
    secret = _check({**env, "DLFORGE_OBJECTS": "s3://key:topsecret@127.0.0.1:9/b"}, "--no-connect")
    assert secret.returncode == 0 and "topsecret" not in secret.stdout and "key:***@" in secret.stdout
