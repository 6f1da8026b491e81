"""Fixtures of the auth tests: apps with DLFORGE_AUTH=required on embedded backends (helpers: auth_testkit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlforge.common.settings import CommonSettings, load_settings


@pytest.fixture
def auth_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CommonSettings:
    """Auth required; memory bus, SQLite documents, file objects in a fresh folder; services that would build
    or read real data are pointed at nothing."""
    monkeypatch.setenv("DLFORGE_AUTH", "required")
    monkeypatch.setenv("DLFORGE_PROPOSER_BUILD_ON_START", "false")
    monkeypatch.setenv("DLFORGE_PROPOSER_FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist"))
    monkeypatch.setenv("DLFORGE_PROPOSER_MNIST_PATH", str(tmp_path / "no-mnist.pkl.gz"))
    (tmp_path / "imports").mkdir()
    monkeypatch.setenv("DLFORGE_LABELER_IMPORT_ROOTS", str(tmp_path / "imports"))
    return load_settings(bus="memory://", objects=f"file://{tmp_path}/objects", docs=f"sqlite:///{tmp_path}/docs.db",
                         work_dir=str(tmp_path / "work"), poll_seconds=0.05, auth="required")
