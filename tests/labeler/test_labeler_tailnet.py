"""The ``finetune_top`` classifier plug-in: the trunk's last units fine-tuned on activations."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dlforge.common.errors import ConfigError
from dlforge.common.events import PipelineOptions
from dlforge.common.objects.fs import FsObjectStore
from dlforge.labeler import handlers
from dlforge.labeler.classifier import make_classifier
from dlforge.labeler.embeddings import EfficientNetLite0Embedder
from dlforge.labeler.settings import LabelerSettings
from dlforge.labeler.strategies import make_strategy
from dlforge.labeler.tailnet import TailFinetune
from dlforge.labeler.worker import _classifier_options, build_deps, classifier_activations
from dlforge.vision.manifest import Item, Manifest

SHAPE = (192, 7, 7)  # EfficientNet-Lite0 at 224 px, the input of block14


def channel_signal(n: int, rng: np.random.Generator, *, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Activations like the trunk's (non-negative, sparse); class k raises channels 10k..10k+9 in the
    centre. Nothing else differs between the classes."""
    y = rng.integers(0, classes, n)
    x = np.maximum(rng.normal(0.0, 1.0, (n, *SHAPE)), 0.0)
    for i in range(n):
        x[i, 10 * y[i]:10 * y[i] + 10, 2:5, 2:5] += 3.0
    return x.astype(np.float16), y


def small(**kw: object) -> TailFinetune:
    # lr 3e-4: at the default 1e-3 (the new layer at 1e-2) a fold network trained only 40 steps on these
    # synthetic activations sometimes collapsed to one class (450 steps on real ones did not)
    options: dict[str, object] = {"steps": 40, "batch": 16, "threads": 1, "lr": 3e-4}
    options.update(kw)
    return TailFinetune(**options)  # type: ignore[arg-type]


def test_learns_the_signal_and_every_labeled_row_is_held_out_once() -> None:
    x, y = channel_signal(260, np.random.default_rng(0), classes=3)
    labeled = np.arange(90)
    representative = np.arange(90) % 2 == 0
    fitted = small().fit(x, labeled, y[labeled], n_classes=4, representative=representative, seed=0)
    rest = np.arange(90, 260)
    proba = fitted.predict_proba(x[rest])
    assert proba.shape == (170, 4)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert np.all(proba[:, 3] == 0.0)  # nobody labeled class 3
    assert float((proba.argmax(axis=1) == y[rest]).mean()) >= 0.95
    # the held-out evidence: every labeled row predicted by a fold network that did not train on it
    assert np.isfinite(fitted.heldout_proba).all()
    assert np.allclose(fitted.heldout_proba.sum(axis=1), 1.0)
    assert float((fitted.heldout_proba.argmax(axis=1) == y[labeled]).mean()) >= 0.9
    summary = fitted.summary()
    assert summary["classifier"] == "finetune_top"
    assert summary["fold_networks"] == 3 and summary["steps"] == 40
    assert summary["calibrated"] is True and summary["calibration_items"] == 45  # the representative half
    assert summary["heldout_items"] == 45
    assert summary["activation_shape"] == "192x7x7"


def test_each_labeled_row_is_predicted_by_the_one_network_that_did_not_train_on_it(monkeypatch) -> None:
    """The held-out evidence the guarantee rests on: record what every fold network trained on and which
    rows it predicted; each labeled row is predicted once, by a network whose training rows exclude it,
    and that network's logits are the row's held-out logits."""
    import dlforge.labeler.tailnet as tailnet

    x, y = channel_signal(120, np.random.default_rng(1))
    labeled = np.arange(10, 100)
    trained: list[set[int]] = []
    predicted: list[tuple[int, np.ndarray]] = []  # (network, rows of x_all it predicted)
    real_train, real_logits = TailFinetune._train, tailnet._logits

    def spy_train(self: TailFinetune, x_all: np.ndarray, rows: np.ndarray, *a: object, **k: object) -> object:
        trained.append({int(r) for r in rows})
        net, ran = real_train(self, x_all, rows, *a, **k)  # type: ignore[arg-type]
        net.fold = len(trained) - 1  # type: ignore[attr-defined]
        return net, ran

    def spy_logits(net: object, xs: np.ndarray, **k: object) -> np.ndarray:
        out = real_logits(net, xs, **k)  # type: ignore[arg-type]
        rows = [int(np.flatnonzero((x == xs[i]).all(axis=(1, 2, 3)))[0]) for i in range(len(xs))] \
            if len(xs) <= len(labeled) else []
        predicted.append((getattr(net, "fold", -1), np.array(rows)))
        return out

    monkeypatch.setattr(TailFinetune, "_train", spy_train)
    monkeypatch.setattr(tailnet, "_logits", spy_logits)
    fitted = small().fit(x, labeled, y[labeled], n_classes=2, seed=2)
    held_out = [(f, rows) for f, rows in predicted if len(rows)]
    assert len(trained) == 3 and len(held_out) == 3
    seen: list[int] = []
    for fold, rows in held_out:
        assert not (set(rows.tolist()) & trained[fold])  # never trained on what it predicts
        assert trained[fold] | set(rows.tolist()) == set(labeled.tolist())  # and trained on every other label
        seen += rows.tolist()
    assert sorted(seen) == labeled.tolist()  # every labeled row held out exactly once
    assert np.isfinite(fitted.heldout_proba).all()


def test_one_known_class_gives_no_network_and_no_evidence() -> None:
    x, _ = channel_signal(30, np.random.default_rng(2))
    fitted = small().fit(x, np.arange(5), np.full(5, 1), n_classes=2, seed=0)
    assert fitted.model is None
    assert np.array_equal(fitted.predict_proba(x[5:]), np.tile([0.0, 1.0], (25, 1)))
    assert np.isnan(fitted.heldout_proba).all()


def test_a_class_with_one_label_trains_one_network_without_evidence() -> None:
    x, y = channel_signal(60, np.random.default_rng(3))
    labels = np.r_[np.zeros(20, dtype=np.int64), 1]
    rows = np.r_[np.flatnonzero(y == 0)[:20], np.flatnonzero(y == 1)[0]]
    fitted = small().fit(x, rows, labels, n_classes=2, seed=0)
    assert fitted.summary()["fold_networks"] == 1 and fitted.calibrated is False
    assert np.isnan(fitted.heldout_proba).all()


def test_the_time_budget_caps_the_steps_but_not_below_the_floor() -> None:
    x, y = channel_signal(80, np.random.default_rng(4))
    fitted = small(steps=5000, time_budget_s=0.01, min_steps=25).fit(x, np.arange(80), y, n_classes=2, seed=0)
    # each fold network gets at least a second: as many steps as fit in it, never fewer than 25
    assert 25 <= int(fitted.summary()["steps"]) < 5000  # type: ignore[arg-type]


def test_rejects_what_it_cannot_learn_from() -> None:
    with pytest.raises(ValueError, match="activations"):
        small().fit(np.zeros((4, 8, 8, 3), dtype=np.uint8), np.arange(2), np.array([0, 1]), n_classes=2)
    with pytest.raises(ValueError, match="folds"):
        TailFinetune(folds=1)
    with pytest.raises(ValueError, match="time_budget_s"):
        TailFinetune(time_budget_s=0)


def test_is_a_classifier_setting_and_its_settings_reach_it() -> None:
    assert isinstance(make_classifier("finetune_top", threads=1), TailFinetune)
    settings = LabelerSettings(labeler_classifier="finetune_top", labeler_finetune_steps=200,
                               labeler_finetune_folds=4, labeler_finetune_time_budget_s=30, labeler_threads=1)
    plugin = make_classifier(settings.labeler_classifier, **_classifier_options(settings))
    assert isinstance(plugin, TailFinetune)
    assert (plugin.steps, plugin.folds, plugin.time_budget_s, plugin.threads) == (200, 4, 30.0, 1)
    default = make_classifier("finetune_top", **_classifier_options(LabelerSettings(labeler_classifier="finetune_top")))
    assert (default.steps, default.folds, default.time_budget_s) == (450, 3, 600.0)  # type: ignore[attr-defined]
    for wrong in ({"labeler_finetune_folds": 1}, {"labeler_finetune_steps": 0}, {"labeler_finetune_time_budget_s": 0}):
        with pytest.raises(ValueError, match=next(iter(wrong))):
            LabelerSettings(labeler_classifier="finetune_top", **wrong)  # type: ignore[arg-type]


async def test_a_labeler_whose_embedder_has_no_activations_refuses_to_start(tmp_path: Path) -> None:
    settings = LabelerSettings(labeler_classifier="finetune_top", objects=f"file://{tmp_path}/o",
                               docs=f"sqlite:///{tmp_path}/d.db", bus="memory://", work_dir=str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="finetune_top"):
        await build_deps(settings, None, embedder=SimpleNamespace(name="stub"))  # type: ignore[arg-type]


def test_a_round_fits_it_on_the_activations_it_is_given() -> None:
    x, y = channel_signal(80, np.random.default_rng(5))
    embeddings = x.reshape(80, -1)[:, :64].astype(np.float32)
    labels = np.full(80, -1)
    labels[:40] = y[:40]
    human = labels >= 0
    common = {"labels": labels, "human": human, "representative": human, "calibration": human, "n_classes": 2,
              "options": PipelineOptions(label_budget=0.6), "strategy": make_strategy("margin"),
              "rng": np.random.default_rng(0), "classifier": small()}
    with pytest.raises(ValueError, match="activations"):
        handlers.run_round(embeddings, **common)  # type: ignore[arg-type]
    result = handlers.run_round(embeddings, activations=x, **common)  # type: ignore[arg-type]
    assert result.classifier["classifier"] == "finetune_top" and result.predicts
    assert float((result.predicted[40:] == y[40:]).mean()) >= 0.95


def _store(tmp_path: Path, n: int) -> tuple[FsObjectStore, Manifest]:
    objects = FsObjectStore(tmp_path / "objects")
    rng = np.random.default_rng(6)
    items = []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()
        objects.put_bytes(f"img/{k}.png", data)
        items.append(Item(item_id=f"i{k}", key=f"img/{k}.png", name=f"{k}.png",
                          sha256=hashlib.sha256(data).hexdigest(), width=40, height=40))
    return objects, Manifest(dataset_id="tl", name="tl", classes=["a", "b"], items=items)


def test_the_worker_reads_the_activations_the_embedding_pass_stored(tmp_path: Path, monkeypatch) -> None:
    objects, manifest = _store(tmp_path, 6)
    embedder = EfficientNetLite0Embedder(size=224, threads=1)
    embedder.embed_stored(objects, manifest.items)  # the embeddings stage
    from dlforge.vision import trunk

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trunk ran again")

    monkeypatch.setattr(trunk.TrunkFeatures, "_run", no_pass)
    deps = SimpleNamespace(classifier=small(), embedder=embedder, settings=SimpleNamespace(labeler_embed_batch=4))
    stored = classifier_activations(objects, manifest, deps)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert stored is not None and stored.shape == (6, *SHAPE) and stored.dtype == np.float16
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(objects.get_bytes(i.key))).resize((224, 224),
                                  Image.Resampling.BILINEAR)) for i in manifest.items])
    fresh = embedder.activations(pixels)
    assert np.allclose(stored.astype(np.float32), fresh.astype(np.float32), atol=2e-2, rtol=1e-2)
    # the units the plug-in trains start where the stored activation ends: the ImageNet tail applied to it
    # gives the trunk's pooled head features, as the embedding pass computed them from the pixels
    import torch

    from dlforge.vision.staged import SHARED_UNFREEZE, imagenet_trunk

    net = imagenet_trunk()
    with torch.inference_mode():
        tail = net.tail(net.boundary(SHARED_UNFREEZE))(torch.from_numpy(stored.astype(np.float32))).numpy()
    head = embedder._features(objects).pooled([i.sha256 for i in manifest.items], size=224, stages=["head"],
                                              load=lambda rows: pytest.fail("recomputed"))["head"]
    assert np.allclose(tail, head, atol=5e-2, rtol=2e-2)
    # a linear plug-in asks for none; an embedder without the trunk's activations is a configuration error
    assert classifier_activations(objects, manifest, SimpleNamespace(classifier=make_classifier("linear"),
                                                                     embedder=embedder, settings=None)) is None
    with pytest.raises(ConfigError, match="finetune_top"):
        classifier_activations(objects, manifest, SimpleNamespace(classifier=small(), embedder=SimpleNamespace(
            name="stub"), settings=SimpleNamespace(labeler_embed_batch=4)))  # type: ignore[arg-type]
