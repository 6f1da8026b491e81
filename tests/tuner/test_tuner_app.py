"""The tuner's REST API: defaults, a run's override, studies and their trial tables, stopping."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
from accounts import create_accounts
from fastapi.testclient import TestClient

from dlforge.common.bus import Delivery
from dlforge.common.events import CandidateScore, DatasetUploaded, Event, ModelProposed, PipelineOptions, Spec, encode
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


def uploaded(client: TestClient, run_id: str) -> None:
    """The tuner sees the run's dataset.uploaded (as its worker would)."""
    event = Event.new(DatasetUploaded(dataset_id="d", name="n", item_count=4, classes=["a", "b"], labeled_count=0,
                                      rejected_count=0, duplicate_count=0, manifest_key="m.json", spec=Spec()),
                      run_id=run_id)
    worker = Worker(service, client.app.state.backends,  # type: ignore[attr-defined]
                    deps=client.app.state.deps["tuner"])  # type: ignore[attr-defined]
    client.portal.call(worker.process, Delivery(topic=event.event_type.value, key=run_id,  # type: ignore[union-attr]
                                                value=encode(event)))


def test_the_tuning_of_an_unknown_run_is_refused_and_nothing_is_written(client: TestClient) -> None:
    backends = client.app.state.backends  # type: ignore[attr-defined]
    refused = client.put("/runs/r-unknown/tuning", json={"sampler": {"name": "random"}})
    assert refused.status_code == 404 and "no run 'r-unknown'" in refused.json()["detail"]
    assert client.portal.call(backends.docs.get, "tuner_configs", "r-unknown") is None  # type: ignore[union-attr]
    uploaded(client, "r-unknown")
    assert client.put("/runs/r-unknown/tuning", json={"sampler": {"name": "random"}}).status_code == 200


def test_override_is_validated_and_used_by_the_run(client: TestClient) -> None:
    uploaded(client, "r1")
    defaults = client.get("/tuning/defaults").json()
    assert defaults["sampler"]["name"] == "tpe" and defaults["pruner"]["name"] == "none"
    assert defaults["sample_method"] == "k_center" and defaults["fidelity_ladder"] == [0.25, 0.5, 1.0]
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
    assert study["best"] is None and "storage_url" not in study  # the tuner's database stays its own

    assert client.put("/runs/r1/tuning", json={"sample_fraction": 0.3}).status_code == 409
    stopped = client.post("/studies/dlforge-r1/stop").json()
    assert stopped["stop_requested"] is True
    assert client.get("/studies/nope").status_code == 404
    assert client.post("/studies/nope/stop").status_code == 404


def test_a_retry_study_is_checked_against_its_runs_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry's study (`dlforge-<run>-retry1`) belongs to the run it stores, whatever its name says."""
    monkeypatch.setenv("DLFORGE_TUNER_STORAGE", f"sqlite:///{tmp_path}/tuner.db")
    monkeypatch.setenv("DLFORGE_AUTH", "required")
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
                             auth="required")
    tokens = asyncio.run(create_accounts(settings.docs, {"olga": {"beta": "operator"}, "vic": {"alpha": "viewer"},
                                                   "amy": {"alpha": "operator"}}, {("run", "r1"): "alpha"}))
    with TestClient(create_app(settings)) as client:
        backends = client.app.state.backends  # type: ignore[attr-defined]
        worker = Worker(service, backends, deps=client.app.state.deps["tuner"])  # type: ignore[attr-defined]
        cand = CandidateScore(model_id="m", arch="small_cnn", source_dataset="mnist", weights_key="w.pt", scores={},
                              total=1.0)

        def proposed() -> None:
            event = Event.new(ModelProposed(dataset_id="d", manifest_key="m.json", classes=["a", "b"],
                                            ranking=[cand], chosen_model_id="m", weights={}, spec=Spec(),
                                            options=PipelineOptions(hpo_trials=2, hpo_parallel=1)), run_id="r1")
            client.portal.call(worker.process, Delivery(  # type: ignore[union-attr]
                topic=event.event_type.value, key="r1", value=encode(event)))

        proposed()
        first = client.portal.call(backends.docs.get, "tuner_studies", "dlforge-r1")  # type: ignore[union-attr]
        client.portal.call(functools.partial(backends.docs.update, "tuner_studies", "dlforge-r1",  # type: ignore
                                             {"state": "failed"}, expected_version=first["_version"]))
        proposed()  # the run's retry
        retry = "dlforge-r1-retry1"
        assert client.portal.call(backends.docs.get, "tuner_studies", retry)["run_id"] == "r1"  # type: ignore

        def auth(name: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {tokens[name]}"}

        # no role in the run's project: as if there were no such study
        for path, call in ((f"/studies/{retry}", client.get), (f"/studies/{retry}/stop", client.post)):
            refused = call(path, headers=auth("olga"))
            assert refused.status_code == 404 and f"no study {retry!r}" in refused.json()["detail"], refused.text
        assert [s["_id"] for s in client.get("/studies", headers=auth("olga")).json()] == []
        # a viewer there sees it but may not stop it; an operator there may
        assert client.get(f"/studies/{retry}", headers=auth("vic")).status_code == 200
        assert client.post(f"/studies/{retry}/stop", headers=auth("vic")).status_code == 403
        stopped = client.post(f"/studies/{retry}/stop", headers=auth("amy"))
        assert stopped.status_code == 200 and stopped.json()["stop_requested"] is True


def test_a_bad_fidelity_ladder_in_an_override_is_refused_with_what_is_wrong(client: TestClient) -> None:
    uploaded(client, "r-ladder")
    for ladder, words in (([0.5, 0.5], "strictly increasing (0.5 after 0.5)"), ([0.25, 2], "2.0 is not a fraction")):
        refused = client.put("/runs/r-ladder/tuning", json={"fidelity_ladder": ladder})
        assert refused.status_code == 422 and words in refused.json()["detail"]
    assert client.put("/runs/r-ladder/tuning", json={"sample_method": "stratified"}).status_code == 422
    ok = client.put("/runs/r-ladder/tuning", json={"fidelity_ladder": [0.25, 0.5, 1], "sample_method": "herding"})
    assert ok.status_code == 200
    assert (ok.json()["config"]["fidelity_ladder"], ok.json()["config"]["sample_method"]) == ([0.25, 0.5, 1.0],
                                                                                            "herding")
