"""Settings shared by every service (environment variables prefixed ``DLFORGE_``).

Backends are chosen by URL. A bad value stops the process at start with a message that names
the variable (see :func:`load_settings`).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dlforge.common.errors import ConfigError

BUS_SCHEMES = ("sqlite", "memory", "kafka")
OBJECT_SCHEMES = ("file", "s3", "s3s")
DOC_SCHEMES = ("sqlite", "mongodb", "mongodb+srv")


KAFKA_INT_OPTIONS = ("partitions", "replication_factor", "session_timeout_ms", "heartbeat_interval_ms",
                     "max_poll_interval_ms", "fetch_max_wait_ms")
KAFKA_STR_OPTIONS = ("client_id", "topic_prefix")


def _check_url(value: str, schemes: tuple[str, ...], *, need_host: bool) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ValueError(f"{value!r}: the scheme must be one of {', '.join(s + '://' for s in schemes)}")
    if need_host and not parts.hostname:
        raise ValueError(f"{value!r}: a host is required")
    if parts.scheme != "kafka":  # kafka:// may list several host:port pairs, checked below
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"{value!r}: the port is not a number") from exc
    return value


def _check_kafka(value: str) -> None:
    parts = urlsplit(value)
    for server in parts.netloc.split(","):
        host, sep, port = server.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r}: each broker must be host:port, got {server!r}")
    for key, values in parse_qs(parts.query, keep_blank_values=True).items():
        if key in KAFKA_INT_OPTIONS:
            if not values[-1].isdigit() or int(values[-1]) <= 0:
                raise ValueError(f"{value!r}: {key} must be a positive integer, got {values[-1]!r}")
        elif key not in KAFKA_STR_OPTIONS:
            known = ", ".join(KAFKA_INT_OPTIONS + KAFKA_STR_OPTIONS)
            raise ValueError(f"{value!r}: unknown option {key!r} (known: {known})")


class CommonSettings(BaseSettings):
    """Configuration every dlforge process reads."""

    model_config = SettingsConfigDict(env_prefix="DLFORGE_", extra="ignore")

    bus: str = Field(
        default="sqlite:///./.dlforge/bus.db",
        description="sqlite:///path/bus.db[?partitions=1&poll_ms=50&...] (durable, one machine), memory:// "
        "(in-process, for tests) or kafka://host:port[,host:port][?partitions=3&topic_prefix=...&fetch_max_wait_ms=...]",
    )
    objects: str = Field(
        default="file://./.dlforge/objects",
        description="file:///path or s3://KEY:SECRET@host:port/bucket[/prefix] (s3s:// for TLS)",
    )
    docs: str = Field(default="sqlite:///./.dlforge/docs.db", description="sqlite:///path.db or mongodb://host/db")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    http_access_log: bool = Field(default=False, description="log every HTTP request (uvicorn's access log); off by "
                                  "default: a line per request costs more than a label submission's handling")
    retry_attempts: int = Field(default=5, ge=1, le=100)
    retry_base_seconds: float = Field(default=0.2, gt=0, le=60)
    retry_max_seconds: float = Field(default=30.0, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    work_dir: str = Field(default="./.dlforge/work", description="local scratch space")
    auth: Literal["required", "off"] = Field(
        default="required", description="'required': every API request but health, sign-in and the console's files "
        "needs a bearer token with the right role; 'off': no checks (tests, trusted single-user machines)")
    auth_rate: float = Field(default=20.0, gt=0, le=1_000_000,
                             description="requests per second one token may send on average (token bucket)")
    auth_burst: int = Field(default=100, ge=1, le=1_000_000, description="requests one token may send at once")
    auth_session_hours: float = Field(default=12.0, gt=0, le=24 * 30,
                                      description="how long a token from POST /auth/login lasts")
    auth_cache_seconds: float = Field(default=5.0, ge=0, le=300,
                                      description="how long a process keeps a token's answer (a revocation reaches "
                                      "other processes within this time)")
    auth_url: str | None = Field(default=None, description="the console service's URL: verify tokens there "
                                 "(POST /auth/introspect) instead of in the document store (split deployment)")
    auth_service_token: SecretStr | None = Field(
        default=None, description="with DLFORGE_AUTH_URL: this service's token for it (the console service's own "
        "DLFORGE_AUTH_SERVICE_TOKEN, or one from dlforge admin create-token NAME --service); without: a token this "
        "process accepts as the service principal (the console service of the split deployment)")

    @field_validator("auth_url")
    @classmethod
    def _auth_url(cls, v: str | None) -> str | None:
        if v:
            _check_url(v, ("http", "https"), need_host=True)
        return v or None

    @model_validator(mode="after")
    def _auth_service(self) -> CommonSettings:
        if self.auth_url and not (self.auth_service_token and self.auth_service_token.get_secret_value()):
            raise ValueError("DLFORGE_AUTH_URL is set but DLFORGE_AUTH_SERVICE_TOKEN is not: a service needs its "
                             "own token to ask the auth service")
        return self

    @field_validator("bus")
    @classmethod
    def _bus(cls, v: str) -> str:
        _check_url(v, BUS_SCHEMES, need_host=v.startswith("kafka"))
        if urlsplit(v).scheme == "kafka":
            _check_kafka(v)
        if urlsplit(v).scheme == "sqlite":
            from dlforge.common.bus.sqlite import SqliteBusOptions

            SqliteBusOptions.from_url(v)  # raises ValueError saying what is wrong
        return v

    @field_validator("objects")
    @classmethod
    def _objects(cls, v: str) -> str:
        parts = urlsplit(v)
        _check_url(v, OBJECT_SCHEMES, need_host=parts.scheme != "file")
        if parts.scheme == "file" and not (parts.netloc + parts.path):
            raise ValueError(f"{v!r}: a folder is required")
        if parts.scheme in ("s3", "s3s"):
            if not parts.path.strip("/"):
                raise ValueError(f"{v!r}: the bucket is missing (s3://KEY:SECRET@host:port/bucket)")
            if parts.username is None or parts.password is None:
                import os

                if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
                    raise ValueError(
                        f"{v!r}: credentials missing (s3://KEY:SECRET@... or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
                    )
        return v

    @field_validator("docs")
    @classmethod
    def _docs(cls, v: str) -> str:
        parts = urlsplit(v)
        _check_url(v, DOC_SCHEMES, need_host=parts.scheme.startswith("mongodb"))
        if parts.scheme == "sqlite" and not parts.path:
            raise ValueError(f"{v!r}: a file path is required (sqlite:///path.db)")
        return v


S = TypeVar("S", bound=CommonSettings)


def load_settings(cls: type[S] = CommonSettings, **overrides: Any) -> S:  # type: ignore[assignment]
    """Read settings from the environment; raise ConfigError naming each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "?"
            problems.append(f"{prefix}{field.upper()}: {err['msg']}" if err["loc"] else err["msg"])
        raise ConfigError("invalid settings: " + "; ".join(problems)) from exc
