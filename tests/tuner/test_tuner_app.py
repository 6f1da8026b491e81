"""The tuner's REST API: defaults, a run's override, studies and their trial tables, stopping."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dlforge.common.bus import Delivery
from dlforge.common.events import CandidateScore, Event, ModelProposed, PipelineOptions, Spec, encode
from dlforge.common.runtime import Worker
from dlforge.common.settings import load_settings
from dlforge.tuner.app import create_app
from dlforge.tuner.worker import service


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("DLFORGE_TUNER_STORAGE", f"sqlite:///{tmp_path}/tuner.db")
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db")
    with TestClient(create_app(settings)) as c:
        yield c


def test_override_is_validated_and_used_by_the_run(client: TestClient) -> None:
    defaults = client.get("/tuning/defaults").json()
    assert defaults["sampler"]["name"] == "tpe" and defaults["pruner"]["name"] == "median"
    assert defaults["sample_fraction"] == 0.5 and len(defaults["space"]["params"]) == 7
    bad = client.put("/runs/r1/tuning", json={"space": {"params": [{"kind": "float", "name": "lr", "low": 1,
                                                                     "high": 0.1}]}})
    assert bad.status_code == 422 and "must be below high" in bad.json()["detail"]
    assert client.put("/runs/r1/tuning", json={"sampler": {"name": "nope"}}).status_code == 422
    ok = client.put("/runs/r1/tuning", json={"sampler": {"name": "random"}, "sample_fraction": 0.25})
    assert ok.status_code == 200 and ok.json()["config"]["sampler"]["name"] == "random"

    # the run reaches the tuner: its study uses the override
    cand = CandidateScore(model_id="m", arch="small_cnn", source_dataset="mnist", weights_key="w.pt", scores={},
                          total=1.0)
    event = Event.new(ModelProposed(dataset_id="d", manifest_key="m.json", classes=["a", "b"], ranking=[cand],
                                    chosen_model_id="m", weights={}, spec=Spec(),
                                    options=PipelineOptions(hpo_trials=3, hpo_parallel=2)), run_id="r1")
    backends = client.app.state.backends  # type: ignore[attr-defined]
    worker = Worker(service, backends, deps=client.app.state.deps["tuner"])  # type: ignore[attr-defined]
    client.portal.call(worker.process, Delivery(topic=event.event_type.value, key="r1",  # type: ignore[union-attr]
                                                value=encode(event)))

    studies = client.get("/studies").json()
    assert [s["_id"] for s in studies] == ["dlforge-r1"] and studies[0]["state"] == "running"
    study = client.get("/studies/dlforge-r1").json()
    assert [t["state"] for t in study["trials"]] == ["running", "running"]
    assert study["config"]["sampler"]["name"] == "random" and study["config"]["sample_fraction"] == 0.25
    assert study["best"] is None and study["storage_url"].startswith("sqlite:////")

    assert client.put("/runs/r1/tuning", json={"sample_fraction": 0.3}).status_code == 409
    stopped = client.post("/studies/dlforge-r1/stop").json()
    assert stopped["stop_requested"] is True
    assert client.get("/studies/nope").status_code == 404
    assert client.post("/studies/nope/stop").status_code == 404
