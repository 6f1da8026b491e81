"""Typed exceptions that decide what the runtime does with a failing event or a bad setting."""

from __future__ import annotations


class DlforgeError(Exception):
    """Base class of dlforge's own errors."""


class ConfigError(DlforgeError):
    """A setting is missing or malformed; the message names the variable."""


class RetryableError(DlforgeError):
    """A transient failure: the runtime retries the handler with exponential backoff."""


class PoisonMessage(DlforgeError):
    """The event can never be handled: the runtime dead-letters it with this reason and goes on."""


class NotFound(DlforgeError):
    """A document or object that was asked for does not exist."""


class Conflict(DlforgeError):
    """An optimistic-concurrency or unique-key conflict in the document store."""


class Unauthorized(DlforgeError):
    """The request carries no valid credentials (HTTP 401 with ``WWW-Authenticate: Bearer``)."""


class Forbidden(DlforgeError):
    """The caller is known but may not do this (HTTP 403); ``details`` says what it holds and needs."""

    def __init__(self, message: str, *, details: object | None = None) -> None:
        super().__init__(message)
        self.details = details


class InvalidInput(DlforgeError):
    """User input was refused; the message says what was wrong (becomes an HTTP 4xx)."""

    def __init__(self, message: str, *, status_code: int = 422, details: object | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.details = details
        self.headers = headers  # e.g. Retry-After of a 429
