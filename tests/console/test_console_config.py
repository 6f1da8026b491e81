"""GET /console-config: the trace viewer's URL template from DLFORGE_CONSOLE_TRACE_URL, checked at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dlforge.common.errors import ConfigError
from dlforge.common.settings import load_settings
from dlforge.console.app import ConsoleSettings, create_app


def _settings(tmp_path: Path) -> object:
    return load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db")


def test_the_trace_url_template_is_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_CONSOLE_TRACE_URL", "http://127.0.0.1:6006/trace/{trace_id}")
    with TestClient(create_app(_settings(tmp_path))) as client:  # type: ignore[arg-type]
        assert client.get("/console-config").json() == {"trace_url": "http://127.0.0.1:6006/trace/{trace_id}"}


def test_no_trace_viewer_is_null(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DLFORGE_CONSOLE_TRACE_URL", raising=False)
    with TestClient(create_app(_settings(tmp_path))) as client:  # type: ignore[arg-type]
        assert client.get("/console-config").json() == {"trace_url": None}


@pytest.mark.parametrize("url", ["http://viewer/trace/", "javascript:alert(1)//{trace_id}"])
def test_a_template_without_the_placeholder_or_not_http_is_refused(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLFORGE_CONSOLE_TRACE_URL", url)
    with pytest.raises(ConfigError, match="DLFORGE_CONSOLE_TRACE_URL"):
        load_settings(ConsoleSettings)
