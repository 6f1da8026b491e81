"""Fixtures for the deployment-manifest tests: expected facts and loaded manifests.

Everything here is read from the working tree; no network, Docker engine or cluster is used.
Test modules take what they need as fixtures (nothing is imported from this file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(__file__).resolve().parent / "assets"

# service -> (host port in docker-compose.yml, topics its main consumer group dlforge.<service> consumes;
# the trainer's decision consumer, group dlforge.trainer-decisions, reads hpo.trial.decision and is not scaled on)
SERVICES: dict[str, tuple[int, tuple[str, ...]]] = {
    "labeler": (8001, ("dataset.uploaded", "labels.submitted")),
    "augmenter": (8002, ("dataset.labeled",)),
    "proposer": (8003, ("dataset.augmented",)),
    "tuner": (8004, ("dataset.uploaded", "model.proposed", "hpo.trial.reported", "hpo.trial.completed")),
    "trainer": (8005, ("hpo.trial", "hpo.completed")),
    "optimizer": (8006, ("model.trained",)),
}
GPU_SERVICES = frozenset({"trainer", "optimizer"})


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


@pytest.fixture(params=sorted(SERVICES))
def service_name(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over the six services."""
    return request.param


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def services() -> dict[str, tuple[int, tuple[str, ...]]]:
    return SERVICES


@pytest.fixture(scope="session")
def gpu_services() -> frozenset[str]:
    return GPU_SERVICES


@pytest.fixture(scope="session")
def load_json():
    return lambda name: json.loads((ASSETS / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def yaml_documents():
    """Returns a loader: repo-relative path -> list of non-empty YAML documents."""
    return lambda relpath: _yaml_documents(REPO / relpath)
