"""The proposer on the memory bus: dataset.augmented -> (repository built on demand) -> model.proposed; REST."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from proposer_testdata import bars, blobs, synthetic_source, write_target

from dlforge.common.app import create_app
from dlforge.common.bus import Delivery
from dlforge.common.events import (
    AugmentationCount,
    DatasetAugmented,
    Event,
    ModelProposed,
    PipelineOptions,
    Spec,
    Topic,
    decode,
    encode,
)
from dlforge.common.runtime import Backends, Outcome, Worker
from dlforge.proposer import worker as proposer_worker
from dlforge.proposer.app import build_repository_on_start, part
from dlforge.proposer.repository import MODELS, ModelRecipe, SourceProvider
from dlforge.proposer.settings import DEFAULT_WEIGHTS, ProposerSettings
from dlforge.proposer.worker import ProposerDeps

RECIPES = (
    ModelRecipe(model_id="efficientnet_lite0-imagenet", arch="efficientnet_lite0", source="imagenet", pretrained=True),
    ModelRecipe(model_id="small_cnn-synth_bars", arch="small_cnn", source="synth_bars", epochs=1, train_items=64,
                test_items=32, batch_size=16, source_sample_items=32),
    ModelRecipe(model_id="small_cnn-synth_blobs", arch="small_cnn", source="synth_blobs", epochs=1, train_items=64,
                test_items=32, batch_size=16, source_sample_items=32),
)
RAW_SUB_SCORES = {"logme", "probe_bacc", "loss_auc", "finetune_bacc", "fps_b1", "fps_b32", "fps_spec_b1"}


def synthetic_sources() -> dict[str, SourceProvider]:
    return {"synth_bars": synthetic_source("synth_bars", bars), "synth_blobs": synthetic_source("synth_blobs", blobs)}


async def synthetic_deps(backends: Backends, recipes: tuple[ModelRecipe, ...] = RECIPES, **changes: Any
                         ) -> ProposerDeps:
    """The proposer's deps with a repository of ImageNet + two small CNNs trained on synthetic sources."""
    settings = backends.settings
    assert isinstance(settings, ProposerSettings)
    return await proposer_worker.build_deps(settings.model_copy(update=changes), backends, recipes=recipes,
                                            sources=synthetic_sources())


def augmented(manifest_key: str) -> Event:
    payload = DatasetAugmented(
        dataset_id="synth", manifest_key=manifest_key, classes=["defect", "good"],
        augmentation=[AugmentationCount(label="defect", real=20, generated=0, kept=0)],
        spec=Spec(positive_class="defect", min_fps=1.0, input_size=64), options=PipelineOptions(seed=0),
    )
    return Event.new(payload, run_id="run-1")


async def test_dataset_augmented_to_model_proposed(backends: Backends, tmp_path: Path) -> None:
    manifest_key, _ = write_target(backends.objects, n=40)
    event = augmented(manifest_key)
    sub = await backends.bus.subscribe(group="test", topics=[Topic.MODEL_PROPOSED, Topic.RUN_FAILED])
    worker = Worker(proposer_worker.service, backends, deps=await synthetic_deps(backends))
    delivery = Delivery(topic=Topic.DATASET_AUGMENTED.value, key="run-1", value=encode(event))

    assert await worker.process(delivery) == Outcome.HANDLED
    got = await sub.get(timeout=2)
    assert got is not None and got.topic == Topic.MODEL_PROPOSED.value
    out = decode(got.value)
    assert out.causation_id == event.event_id and out.run_id == "run-1"
    proposed = out.payload
    assert isinstance(proposed, ModelProposed)
    # the data set's fingerprint for warm starts: per feature, the mean and the spread of the ImageNet trunk's
    # L2-normalised 1280-d features of the target sample (they are non-negative after the head's ReLU6)
    assert proposed.fingerprint_model == "efficientnet_lite0-imagenet" and proposed.fingerprint is not None
    assert len(proposed.fingerprint) == 2 * 1280
    mean, spread = np.array(proposed.fingerprint[:1280]), np.array(proposed.fingerprint[1280:])
    assert (mean >= 0).all() and (spread >= 0).all() and 0.5 < float(np.linalg.norm(mean)) <= 1.0 + 1e-6

    # the empty repository was built on demand from the recipes
    assert {m["model_id"] for m in await backends.docs.find(MODELS)} == {r.model_id for r in RECIPES}

    proposal = await backends.docs.get(proposer_worker.PROPOSALS, "synth")
    assert proposal is not None
    ties = set(proposal["ties"])
    assert [c.model_id for c in proposed.ranking] == [c["model_id"] for c in proposal["ranking"]]
    assert {c.model_id for c in proposed.ranking} == {r.model_id for r in RECIPES}
    for cand in proposed.ranking:
        expected = RAW_SUB_SCORES | ({"domain_sim"} if cand.arch == "small_cnn" else set())
        assert expected <= set(cand.scores), cand.model_id
        for name in expected - {"fps_spec_b1"} - ties:
            assert 0.0 <= cand.scores[f"{name}_norm"] <= 1.0
        assert cand.scores["fps_b1"] > 0 and cand.scores["fps_b32"] > 0
        assert -5 < cand.scores["logme"] < 5 and 0 <= cand.scores["probe_bacc"] <= 1
        assert 0 < cand.scores["loss_auc"] < 3 and 0 <= cand.scores["finetune_bacc"] <= 1
        # the speed gate: batch-1 frames per second at the spec's size against its min_fps of 1.0 (a timing, so
        # the flag is checked against the measured speed, not assumed to pass on a loaded machine)
        assert cand.scores["gate_passed"] == (1.0 if cand.scores["fps_spec_b1"] >= 1.0 else 0.0)
        assert 0.0 <= cand.total <= 1.0 and cand.weights_key == f"proposer/models/{cand.model_id}.pt"
        assert backends.objects.exists(cand.weights_key)
    # the ranking puts candidates that pass the speed gate first, then orders by total (a candidate measured
    # below min_fps on a loaded machine ranks after the others whatever its total: seen in CI, Lite0 at 0.82
    # behind a small CNN at 0.34)
    order = [(-c.scores["gate_passed"], -c.total) for c in proposed.ranking]
    assert order == sorted(order)
    assert proposed.chosen_model_id == proposed.ranking[0].model_id
    assert proposed.weights == DEFAULT_WEIGHTS
    assert proposed.classes == ["defect", "good"] and proposed.manifest_key == manifest_key

    # the two small CNNs share one speed measurement (same architecture and input size): their speed
    # sub-scores are identical, raw and normalized, however the machine's load varied during the run
    small = [c for c in proposed.ranking if c.arch == "small_cnn"]
    assert len(small) == 2
    for name in ("fps_b1", "fps_b32", "fps_spec_b1", "fps_b1_norm", "fps_b32_norm"):
        assert small[0].scores[name] == small[1].scores[name], name
    # seconds per scorer per candidate and the explanation are stored
    for c in proposal["ranking"]:
        assert {"encode", "logme", "probe", "domain", "short_term", "speed"} <= set(c["seconds"])
    assert proposal["explanation"].startswith(proposed.chosen_model_id)
    assert {len(c) for c in proposal["loss_curves"].values()} == {20}  # 20 steps in these settings
    assert proposal["target"]["train_items"] == 28 and proposal["target"]["val_items"] == 8

    # a redelivery is a duplicate, not a second proposal
    assert await worker.process(delivery) == Outcome.DUPLICATE

    # REST: repository, proposal, re-ranking with other weights
    app = create_app([part(recipes=RECIPES, sources=synthetic_sources())], backends=backends, run_workers=False)
    with TestClient(app) as client:
        models = client.get("/models").json()
        assert [m["model_id"] for m in models["models"]] == sorted(r.model_id for r in RECIPES)
        assert all("_version" not in m for m in models["models"])
        assert client.get("/models/small_cnn-synth_bars").json()["source_dataset"] == "synth_bars"
        assert client.get("/models/nope").status_code == 404
        body = client.get("/proposals/synth").json()
        assert body["chosen_model_id"] == proposed.chosen_model_id and len(body["ranking"]) == 3
        assert client.get("/proposals/other").status_code == 404
        speed_only = {k: 0.0 for k in DEFAULT_WEIGHTS} | {"fps_b1": 1.0}
        rr = client.post("/proposals/synth/rerank", json={"weights": speed_only})
        assert rr.status_code == 200
        # speed only: the candidates with the top fps_b1 -- normally both small CNNs, tied exactly (one shared
        # measurement) -- lead, equal totals ranked by model_id. Their total is fps_b1 normalized on a log
        # scale over max(spread, ln 4): 1 when they measured at least 4x the slowest, less on a loaded
        # machine (seen in CI: 0.70, a 2.6x ratio), so it is checked against the measured ratio
        top = max(c.scores["fps_b1"] for c in proposed.ranking)
        slowest = min(c.scores["fps_b1"] for c in proposed.ranking)
        # which architecture measures fastest is a timing (the small CNNs are about 10x Lite0 idle, 2.6x
        # under CI's load, and once behind it): the leaders are checked against the measured speeds
        fps_of = {c.model_id: c.scores["fps_b1"] for c in proposed.ranking}
        assert fps_of["small_cnn-synth_bars"] == fps_of["small_cnn-synth_blobs"]  # one shared measurement
        fastest = sorted(m for m, v in fps_of.items() if v == top)
        reranked = rr.json()["candidates"]
        assert [c["model_id"] for c in reranked[:len(fastest)]] == fastest
        expected = min(1.0, math.log(top / slowest) / math.log(4.0))
        assert [c["total"] for c in reranked[:len(fastest)]] == [pytest.approx(expected)] * len(fastest)
        assert rr.json()["chosen_model_id"] == fastest[0]
        bad = client.post("/proposals/synth/rerank", json={"weights": {"accuracy": 1.0}})
        assert bad.status_code == 422 and "unknown sub-score" in bad.json()["detail"]


async def test_missing_manifest_is_a_poison_message(backends: Backends) -> None:
    # a repository with one (quick) entry so that only the manifest is missing
    deps = await synthetic_deps(backends, RECIPES[1:2])
    await deps.repository.build()
    sub = await backends.bus.subscribe(group="test", topics=[Topic.RUN_FAILED])
    event = augmented("test/nowhere/manifest.json")
    outcome = await Worker(proposer_worker.service, backends, deps=deps).process(
        Delivery(topic=Topic.DATASET_AUGMENTED.value, key="run-1", value=encode(event)))
    assert outcome == Outcome.DEAD_LETTERED
    failed = await sub.get(timeout=2)
    assert failed is not None
    assert "training manifest test/nowhere/manifest.json does not exist" in decode(failed.value).payload.reason  # type: ignore[attr-defined]


async def test_an_early_dataset_waits_for_the_start_up_build(backends: Backends) -> None:
    deps = await synthetic_deps(backends, RECIPES[1:], proposer_build_on_start=True)  # the two quick small CNNs
    await build_repository_on_start(deps, backends)  # what the part's start does: the build runs in the background
    assert deps.repository.status()["state"] == "running"
    manifest_key, _ = write_target(backends.objects, n=40)
    sub = await backends.bus.subscribe(group="test", topics=[Topic.MODEL_PROPOSED])
    outcome = await Worker(proposer_worker.service, backends, deps=deps).process(
        Delivery(topic=Topic.DATASET_AUGMENTED.value, key="run-1", value=encode(augmented(manifest_key))))
    assert outcome == Outcome.HANDLED
    got = await sub.get(timeout=2)
    assert got is not None
    proposed = decode(got.value).payload
    assert isinstance(proposed, ModelProposed)
    assert sorted(c.model_id for c in proposed.ranking) == ["small_cnn-synth_bars", "small_cnn-synth_blobs"]
    assert deps.repository.status()["state"] == "done"
