"""What the loss sees and when training stops: class and confidence weights, early stopping, views.

Expected values are worked by hand or come from a second implementation (torch's own weighted
cross-entropy, numpy/torch rotations), never from the code under test.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dlforge.common.errors import ConfigError, InvalidInput
from dlforge.common.objects import ObjectStore
from dlforge.common.settings import load_settings
from dlforge.trainer.cache import ActivationCache, TorchPrefixRunner, manifest_digest
from dlforge.trainer.engines import FitJob, _read_job, _write_job
from dlforge.trainer.handlers import TrainerConfig, TrainingRequest, row_weights, run_training, save_model
from dlforge.trainer.params import EpochMetrics, TrainParams
from dlforge.trainer.settings import TrainerSettings
from dlforge.trainer.stages import Tail, staged
from dlforge.trainer.training import (
    EarlyStopping,
    FitResult,
    TrainData,
    WeightAverage,
    class_weights,
    evaluate,
    fit,
    weighted_loss,
)
from dlforge.trainer.views import VIEW_NAMES, apply_view, parse_views
from dlforge.vision.images import to_tensor
from dlforge.vision.manifest import Item, Manifest, Split, load_arrays, load_manifest, save_manifest
from dlforge.vision.networks import load_checkpoint, spec_of


class Recorder:
    """A listener that keeps each epoch's metrics and a copy of the tail's weights after it."""

    def __init__(self, tail: nn.Module) -> None:
        self.tail = tail
        self.epochs: list[EpochMetrics] = []
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(self, step: int, loss: float) -> None:
        """Steps are not needed here."""

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        self.epochs.append(metrics)
        self.states[metrics.epoch] = {k: v.detach().clone() for k, v in self.tail.state_dict().items()}
        return True

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        """No checkpoints here."""


def metrics(epoch: int, acc: float, loss: float) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, steps=epoch, train_loss=1.0, val_loss=loss, val_accuracy=acc, val_recall={},
                        seconds=0.1, images_per_second=1.0)


# -- class weights and the weighted loss ------------------------------------------------------------


def test_class_weights_against_a_hand_computed_case() -> None:
    # 6 rows, classes 0/1/2 present 3/2/1 times, class 3 absent: n / (k_present * count_c)
    w = class_weights(np.array([0, 0, 0, 1, 1, 2]), 4, "balanced")
    assert w is not None
    assert w.tolist() == pytest.approx([6 / 9, 1.0, 2.0, 0.0])
    # with row weights the counts are weighted: class 0 = 1 + 0.5 + 0.5 = 2, class 1 = 1 + 0 = 1, class 2 = 1;
    # n = 4 over 3 present classes -> 4 / (3 * count)
    rw = np.array([1.0, 0.5, 0.5, 1.0, 0.0, 1.0])
    w = class_weights(np.array([0, 0, 0, 1, 1, 2]), 4, "balanced", rw)
    assert w is not None
    assert w.tolist() == pytest.approx([4 / 6, 4 / 3, 4 / 3, 0.0])
    # a class whose rows all weigh 0 is absent
    w = class_weights(np.array([0, 1, 1]), 2, "balanced", np.array([0.0, 1.0, 1.0]))
    assert w is not None and w.tolist() == pytest.approx([0.0, 1.0])


def test_confidence_weighted_loss_against_a_hand_computed_value() -> None:
    # row 1: logits (0, 0), true class 0 -> CE = ln 2; row 2: logits (ln 3, 0), true class 1 -> p = 1/4, CE = ln 4
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([0, 1])
    class_w = torch.tensor([1.0, 3.0])
    row_w = torch.tensor([1.0, 0.5])  # a person's label and an auto-label of confidence 0.5
    # (1 * 1 * ln2 + 3 * 0.5 * ln4) / (1 * 1 + 3 * 0.5) = 4 ln2 / 2.5
    got = weighted_loss(logits, y, class_weight=class_w, row_weight=row_w)
    assert float(got) == pytest.approx(1.6 * math.log(2.0), rel=1e-6)
    assert float(weighted_loss(logits, y)) == pytest.approx((math.log(2.0) + math.log(4.0)) / 2, rel=1e-6)
    # without row weights it is torch's class-weighted cross-entropy (a second implementation)
    g = torch.Generator().manual_seed(0)
    big, labels = torch.randn(50, 3, generator=g), torch.randint(0, 3, (50,), generator=g)
    cw = torch.tensor([0.5, 2.0, 1.0])
    ref = nn.CrossEntropyLoss(weight=cw)(big, labels)
    assert float(weighted_loss(big, labels, class_weight=cw)) == pytest.approx(float(ref), rel=1e-6)
    # a batch of auto-labels with confidence 0 contributes nothing
    assert float(weighted_loss(logits, y, row_weight=torch.zeros(2))) == 0.0


def test_soft_targets_against_hand_computed_values_and_torch_probability_targets() -> None:
    # row 1: logits (0, 0), target (0.7 on class 0, 0.3 on class 1) -> CE = ln 2 whatever the target
    # row 2: logits (ln 3, 0), label 1 at 0.6 -> p = (3/4, 1/4): CE = 0.6 ln 4 + 0.4 ln(4/3)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([0, 1])
    soft = torch.tensor([0.7, 0.6])
    want = (math.log(2.0) + 0.6 * math.log(4.0) + 0.4 * math.log(4.0 / 3.0)) / 2
    assert float(weighted_loss(logits, y, row_soft=soft)) == pytest.approx(want, rel=1e-6)
    # a target of 1 is the one-hot loss
    assert float(weighted_loss(logits, y, row_soft=torch.ones(2))) == pytest.approx(float(weighted_loss(logits, y)))
    # three classes: the rest is shared evenly; against torch's cross-entropy with probability targets
    g = torch.Generator().manual_seed(1)
    big, labels = torch.randn(40, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    s = torch.rand(40, generator=g)
    target = ((1 - s) / 2)[:, None].repeat(1, 3)
    target[torch.arange(40), labels] = s
    cw, rw = torch.tensor([0.5, 2.0, 1.0]), torch.rand(40, generator=g)
    ce = nn.functional.cross_entropy(big, target, reduction="none")
    ref = (cw[labels] * rw * ce).sum() / (cw[labels] * rw).sum()
    got = weighted_loss(big, labels, class_weight=cw, row_weight=rw, row_soft=s)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)


def _item(item_id: str, label: str | None, source: str | None, confidence: float | None) -> Item:
    return Item(item_id=item_id, key=f"k/{item_id}", name=item_id, sha256=item_id, width=8, height=8, label=label,
                label_source=source, confidence=confidence, split="train")  # type: ignore[arg-type]


def test_row_weights_follow_who_labeled_and_skip_unlabeled_items() -> None:
    manifest = Manifest(dataset_id="d", name="d", classes=["a", "b"], items=[
        _item("given", "a", "given", None),
        _item("human", "b", "human", 0.6),  # a person's label weighs 1 whatever confidence it carries
        _item("old", "a", None, None),  # an older manifest without a source: a person's label
        _item("auto", "b", "auto", 0.7),
        _item("auto-no-confidence", "a", "auto", None),
        _item("auto-over", "a", "auto", 1.4),
        _item("generated", "b", "generated", 0.8),
        _item("review", None, "needs_review", 0.55),  # no label: not trained on
    ])
    assert row_weights(manifest, mode="confidence") == {
        "given": 1.0, "human": 1.0, "old": 1.0, "auto": 0.7, "auto-no-confidence": 1.0, "auto-over": 1.0,
        "generated": 0.8,
    }
    assert row_weights(manifest, mode="none") is None
    with pytest.raises(InvalidInput, match="'sometimes'"):
        row_weights(manifest, mode="sometimes")


def _toy(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return x, y


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(6, 2)


def test_rows_of_weight_zero_do_not_change_training() -> None:
    x, y = _toy()
    w = np.ones(len(y), dtype=np.float32)
    w[::4] = 0.0
    flipped = y.copy()
    flipped[::4] = 1 - flipped[::4]
    hp = TrainParams(lr=0.05, batch_size=8, epochs=3, seed=1)
    tails = []
    for labels, weights in ((y, w), (flipped, w), (flipped, np.ones_like(w))):
        tail = _linear()
        fit(tail, TrainData(x, labels, x[:16], y[:16], ["a", "b"], train_w=weights), hp, listener=Recorder(tail))
        tails.append(tail)
    same = all(torch.equal(a, b) for a, b in zip(tails[0].parameters(), tails[1].parameters(), strict=True))
    assert same  # the weight-0 rows' labels do not matter...
    assert not torch.equal(tails[0].weight, tails[2].weight)  # ...and do when they weigh 1


def test_soft_targets_train_to_the_probability_they_ask_for() -> None:
    # inputs all zero: only the bias learns, and the loss is lowest where the predicted probability of "a" is
    # the targets' mean: 12 rows of "a" at 1, 12 of "b" whose target is 0.5 "b" / 0.5 "a" -> (12 + 6) / 24 = 0.75
    x = np.zeros((24, 6), dtype=np.float32)
    y = np.array([0] * 12 + [1] * 12)
    soft = np.array([1.0] * 12 + [0.5] * 12, dtype=np.float32)
    hp = TrainParams(lr=0.05, batch_size=24, epochs=150, seed=0, class_weighting="none")

    def p_a(soft_targets: np.ndarray | None) -> float:
        tail = _linear()
        fit(tail, TrainData(x, y, x[:4], y[:4], ["a", "b"], train_soft=soft_targets), hp, listener=Recorder(tail))
        with torch.no_grad():
            return float(torch.softmax(tail(torch.zeros(1, 6)), dim=1)[0, 0])

    assert p_a(soft) == pytest.approx(0.75, abs=0.01)
    assert p_a(None) == pytest.approx(0.5, abs=0.01)  # one-hot targets on the same rows


# -- early stopping -------------------------------------------------------------------------------------


def test_early_stopping_picks_the_best_epoch_of_a_scripted_sequence() -> None:
    stop = EarlyStopping(patience=2)
    script = [(0.50, 0.9), (0.70, 0.6), (0.70, 0.5), (0.60, 0.4), (0.69, 0.3), (0.80, 0.2)]
    decisions = []
    for e, (acc, loss) in enumerate(script, start=1):
        decisions.append(stop.update(metrics(e, acc, loss)))
        if decisions[-1]:
            break
    # epoch 3 ties epoch 2's accuracy with a lower loss: the best; epochs 4 and 5 do not beat it -> stop at 5
    assert decisions == [False, False, False, False, True]
    assert stop.best is not None and stop.best.epoch == 3
    nan_first = EarlyStopping(patience=1)
    assert nan_first.update(metrics(1, float("nan"), float("nan"))) is False
    assert nan_first.update(metrics(2, 0.4, 1.0)) is False and nan_first.best is not None
    assert nan_first.best.epoch == 2
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_fit_stops_early_and_keeps_the_best_epochs_weights() -> None:
    x, y = _toy(96)
    vx, vy = _toy(40, seed=1)
    vy = 1 - vy  # validation disagrees with training: the more it learns, the worse val gets
    tail = _linear()
    rec = Recorder(tail)
    hp = TrainParams(lr=0.05, batch_size=16, epochs=40, patience=3, seed=0)
    result = fit(tail, TrainData(x, y, vx, vy, ["a", "b"]), hp, listener=rec)
    # the best epoch worked out from the reported metrics: highest accuracy, then lowest loss
    best = max(rec.epochs, key=lambda m: (m.val_accuracy, -m.val_loss)).epoch
    assert result.early_stopped and not result.stopped
    assert result.best_epoch == best and len(rec.epochs) == best + 3 < 40
    assert all(torch.equal(v, rec.states[best][k]) for k, v in tail.state_dict().items())
    assert not all(torch.equal(v, rec.states[len(rec.epochs)][k]) for k, v in tail.state_dict().items())


def test_without_patience_every_epoch_trains_and_the_last_weights_stay() -> None:
    x, y = _toy(96)
    vx, vy = _toy(40, seed=1)
    tail = _linear()
    rec = Recorder(tail)
    result = fit(tail, TrainData(x, y, vx, 1 - vy, ["a", "b"]), TrainParams(lr=0.05, batch_size=16, epochs=6),
                 listener=rec)
    assert len(rec.epochs) == 6 and result.best_epoch == 0 and not result.early_stopped
    assert all(torch.equal(v, rec.states[6][k]) for k, v in tail.state_dict().items())


# -- the weight average ----------------------------------------------------------------------------------


class _CheckpointRecorder(Recorder):
    """Also keeps the tail's weights at each checkpoint step."""

    def __init__(self, tail: nn.Module) -> None:
        super().__init__(tail)
        self.checkpoints: dict[int, dict[str, torch.Tensor]] = {}

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        self.checkpoints[step] = {k: v.detach().clone() for k, v in self.tail.state_dict().items()}


def test_the_weight_average_follows_the_warmed_up_decay_worked_by_hand() -> None:
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(layer, 0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average.update(layer)  # d = min(0.5, 2/11) = 2/11: 2/11 * 0 + 9/11 * 1
    assert float(average.shadow["weight"]) == pytest.approx(9 / 11)
    average.update(layer)  # d = min(0.5, 3/12) = 1/4: 1/4 * 9/11 + 3/4 * 1 = 21/22
    assert float(average.shadow["weight"]) == pytest.approx(21 / 22)
    for _ in range(20):  # from n = 8 on, (1 + n) / (10 + n) >= 1/2: d is the decay
        average.update(layer)
    with torch.no_grad():
        layer.weight.fill_(3.0)
    before = float(average.shadow["weight"])
    average.update(layer)
    assert float(average.shadow["weight"]) == pytest.approx(0.5 * before + 0.5 * 3.0)
    with average.applied(layer):  # the average inside the block, the trained weight after it
        assert float(layer.weight.detach()) == pytest.approx(0.5 * before + 1.5)
    assert float(layer.weight.detach()) == 3.0
    again = WeightAverage(layer, 0.5, average.state())  # a resumed run goes on from the stored average
    assert again.updates == 23 and torch.equal(again.shadow["weight"], average.shadow["weight"])
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(layer, 1.0)


def test_with_a_weight_average_validation_and_the_final_tail_are_the_averaged_weights() -> None:
    x, y = _toy(96)
    vx, vy = _toy(40, seed=1)
    data = TrainData(x, y, vx, vy, ["a", "b"])
    hp = TrainParams(lr=0.2, batch_size=8, epochs=4, seed=0, ema_decay=0.9)
    tail = _linear()
    rec = _CheckpointRecorder(tail)  # records the weights as trained at each epoch's end
    fit(tail, data, hp, listener=rec, checkpoint_every_steps=12)  # 96 rows / 8: a checkpoint at each epoch's end
    assert sorted(rec.checkpoints) == [12, 24, 36, 48]
    assert torch.equal(rec.checkpoints[48]["weight"], tail.weight)  # a checkpoint holds the average too
    final = evaluate(tail, vx, vy, ["a", "b"])
    assert final.loss == pytest.approx(rec.epochs[-1].val_loss, rel=1e-6)  # the reported val is the average's
    assert not torch.equal(tail.weight, rec.states[4]["weight"])  # and the tail holds it, not the trained weights
    plain = _linear()
    fit(plain, data, hp.model_copy(update={"ema_decay": 0.0}), listener=Recorder(plain))
    assert torch.equal(plain.weight, rec.states[4]["weight"])  # averaging does not change what trains

    stopping = _linear()
    srec = Recorder(stopping)
    result = fit(stopping, TrainData(x, y, vx, 1 - vy, ["a", "b"]),
                 hp.model_copy(update={"epochs": 30, "patience": 2}), listener=srec)
    assert result.early_stopped and result.best_epoch < len(srec.epochs)
    best = max(srec.epochs, key=lambda m: (m.val_accuracy, -m.val_loss))
    kept = evaluate(stopping, vx, 1 - vy, ["a", "b"])
    assert result.best_epoch == best.epoch
    assert kept.loss == pytest.approx(best.val_loss, rel=1e-6)  # the best epoch's average is what stays


# -- views -----------------------------------------------------------------------------------------------


def test_views_are_the_symmetries_of_the_square() -> None:
    x = np.array([[[1, 2], [3, 4]]])
    expected = {  # worked by hand on [[1, 2], [3, 4]]; rotations are counter-clockwise
        "identity": [[1, 2], [3, 4]], "hflip": [[2, 1], [4, 3]], "vflip": [[3, 4], [1, 2]],
        "rot90": [[2, 4], [1, 3]], "rot180": [[4, 3], [2, 1]], "rot270": [[3, 1], [4, 2]],
        "transpose": [[1, 3], [2, 4]], "antitranspose": [[4, 2], [3, 1]],
    }
    assert set(VIEW_NAMES) == set(expected)
    for name, want in expected.items():
        assert apply_view(name, x)[0].tolist() == want, name
    rgb = np.arange(2 * 3 * 3 * 3).reshape(2, 3, 3, 3)  # channels ride along
    assert apply_view("rot90", rgb)[1, :, :, 2].tolist() == np.rot90(rgb[1, :, :, 2]).tolist()


def test_view_sets_parse_and_refuse_unknown_names() -> None:
    assert parse_views("none") == ("identity",)
    assert parse_views("flips") == ("identity", "hflip", "vflip", "rot180")
    assert len(parse_views("dihedral")) == 8
    assert parse_views(" rot90, hflip,rot90,identity ") == ("identity", "rot90", "hflip")
    with pytest.raises(InvalidInput, match="'spin'"):
        parse_views("hflip,spin")
    with pytest.raises(ValueError, match="spin"):
        TrainingRequest(arch="small_cnn", manifest_key="m", classes=["a", "b"], views="spin")
    with pytest.raises(ConfigError, match="DLFORGE_TRAINER_FINAL_VIEWS"):
        load_settings(TrainerSettings, trainer_final_views="spin")
    with pytest.raises(ConfigError, match="DLFORGE_TRAINER_LABEL_WEIGHTING"):
        load_settings(TrainerSettings, trainer_label_weighting="often")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _stripes(rng: np.random.Generator, label: str, size: int) -> np.ndarray:
    """Diagonal stripes: '/' for class "rising", '\\' for "falling" (a mirror image swaps the classes)."""
    yy, xx = np.mgrid[0:size, 0:size]
    along = xx + yy if label == "falling" else xx - yy
    phase = rng.uniform(0, 2 * np.pi)
    return 128 + 70 * np.sin(along * 2 * np.pi / 6 + phase) + rng.normal(0, 12, (size, size))


def stripes_dataset(objects: ObjectStore, *, per_class: int = 36, size: int = 24) -> str:
    rng = np.random.default_rng(3)
    items = []
    for label in ("falling", "rising"):
        for i in range(per_class):
            data = _png(_stripes(rng, label, size))
            item_id = f"{label}-{i:03d}"
            split: Split = "test" if i < 6 else "val" if i < 14 else "train"
            key = f"stripes/{item_id}.png"
            objects.put_bytes(key, data, content_type="image/png")
            items.append(Item(item_id=item_id, key=key, name=key, sha256=hashlib.sha256(data).hexdigest(),
                              width=size, height=size, label=label, label_source="given", split=split))
    key = "stripes/manifest.json"
    save_manifest(objects, key, Manifest(dataset_id="stripes", name="stripes", classes=["falling", "rising"],
                                         items=items))
    return key


def test_cached_views_are_the_prefix_of_the_viewed_images_and_absent_unless_declared(
        objects: ObjectStore, weights_key: str, tmp_path: Path) -> None:
    manifest_key = stripes_dataset(objects, per_class=20)
    raw = objects.get_bytes(manifest_key)
    manifest = Manifest.model_validate_json(raw)
    model, _ = load_checkpoint(str(objects.get_file(weights_key, tmp_path / "w.pt")))
    net, spec = staged(model), spec_of("small_cnn")
    cache = ActivationCache(objects, work_dir=tmp_path / "cache", runner=TorchPrefixRunner())
    boundary = net.boundary(2)
    common = {"net": net, "spec": spec, "manifest": manifest, "manifest_digest": manifest_digest(raw),
              "weights_digest": "w", "input_size": spec.input_size, "boundary": boundary}
    plain = cache.get(**common)  # type: ignore[arg-type]
    assert plain.views == {} and not [i.key for i in objects.list("trainer/cache/") if "/views/" in i.key]

    viewed = cache.get(**common, views=("identity", "rot90", "hflip"))  # type: ignore[arg-type]
    assert viewed.source == "hit" and set(viewed.views) == {"rot90", "hflip"}
    items = [i for i in manifest.items if i.split == "train"]
    assert viewed.views["rot90"]["train"].item_ids == [i.item_id for i in items]
    images = load_arrays(objects, items, size=spec.input_size, channels=spec.in_channels)
    prefix = net.span(0, boundary).eval()
    with torch.inference_mode():
        for name, turn in (("rot90", lambda t: torch.rot90(t, 1, dims=(1, 2))), ("hflip", lambda t: t.flip(2))):
            by_hand = prefix(to_tensor(turn(torch.from_numpy(images)).numpy(), spec)).numpy()
            got = np.asarray(viewed.views[name]["train"].x, dtype=np.float32)
            assert np.allclose(got, by_hand, atol=2e-2, rtol=1e-2), name  # the cache is float16
            identity = np.asarray(viewed.splits["train"].x, dtype=np.float32)
            assert np.abs(got - identity).max() > 0.1, name  # stripes are not symmetric under it

    # a shallower boundary is derived for the views as for the identity
    shallow = cache.get(**{**common, "boundary": net.boundary(1)}, views=("rot90",))  # type: ignore[arg-type]
    assert shallow.source == "derived" and set(shallow.views) == {"rot90"}


def train_request(manifest_key: str, weights_key: str, **extra: object) -> TrainingRequest:
    hp = TrainParams(lr=0.01, batch_size=8, epochs=8, unfreeze=2, dropout=0.0, patience=3)
    return TrainingRequest(weights_key=weights_key, manifest_key=manifest_key, classes=["falling", "rising"],
                           hparams=hp, **extra)  # type: ignore[arg-type]


def test_the_view_check_drops_the_views_that_change_the_label(objects: ObjectStore, weights_key: str,
                                                              config: TrainerConfig) -> None:
    key = stripes_dataset(objects)
    out = run_training(objects, train_request(key, weights_key, views="hflip,rot180,transpose", check_views=True),
                       job_id="check", key_prefix="jobs/check", config=config)
    check = out.view_check
    assert set(check) == {"identity", "hflip", "rot180", "transpose"}
    # a mirror image turns '/' into '\': the probe's accuracy collapses; a half turn or a transpose keeps '/'
    assert check["identity"] >= 0.8 and check["hflip"] <= 0.5
    assert check["rot180"] >= check["identity"] - 0.05 and check["transpose"] >= check["identity"] - 0.05
    assert "hflip" not in out.views and out.state == "completed"
    assert out.summary()["view_check"] == check


def test_views_train_only_when_declared_and_unlabeled_items_are_skipped(objects: ObjectStore, weights_key: str,
                                                                        config: TrainerConfig, tmp_path: Path) -> None:
    key = stripes_dataset(objects)
    manifest = load_manifest(objects, key)
    train = [i for i in manifest.items if i.split == "train"]
    for item in train[:5]:  # the labeler left these for people: no label
        item.label, item.label_source = None, "needs_review"
    for item in train[5:15]:
        item.label_source, item.confidence = "auto", 0.75
    save_manifest(objects, "stripes/review.json", manifest)
    plain = run_training(objects, train_request("stripes/review.json", weights_key), job_id="plain",
                         key_prefix="jobs/plain", config=config)
    assert plain.views == ["identity"] and plain.view_check == {}
    assert plain.train_rows == len(train) - 5
    assert not [i.key for i in objects.list("trainer/cache/") if "/views/" in i.key]
    assert plain.epochs and plain.best_epoch == max(plain.epochs, key=lambda m: (m.val_accuracy, -m.val_loss)).epoch
    trusted = run_training(objects, train_request("stripes/review.json", weights_key, views="flips"),
                           job_id="trusted", key_prefix="jobs/trusted", config=config)
    assert trusted.views == ["identity", "hflip", "vflip", "rot180"] and trusted.train_rows == plain.train_rows
    assert [i.key for i in objects.list("trainer/cache/") if "/views/hflip/train.npy" in i.key]
    # the checkpoint names the views the model was trained on (what the optimizer may average over)
    key = save_model(objects, trusted, "trainer/models/trusted.pt", work_dir=tmp_path)
    _, saved = load_checkpoint(str(objects.get_file(key, tmp_path / "trusted.pt")))
    assert saved["extra"]["views"] == ["identity", "hflip", "vflip", "rot180"]


def test_views_and_weights_reach_the_worker_processes(tmp_path: Path) -> None:
    x, y = _toy(20)
    views = [x * 2, x * 3]
    data = TrainData(x, y, x[:4], y[:4], ["a", "b"], train_w=np.linspace(0, 1, 20, dtype=np.float32),
                     train_soft=np.linspace(0.5, 1, 20, dtype=np.float32), train_views=views)
    _write_job(FitJob(tail=_linear(), data=data, hparams=TrainParams(patience=2)), tmp_path)
    _, back, spec = _read_job(tmp_path)
    assert back.train_w is not None and back.train_w.tolist() == data.train_w.tolist()  # type: ignore[union-attr]
    assert back.train_soft is not None and back.train_soft.tolist() == data.train_soft.tolist()  # type: ignore[union-attr]
    assert [v.tolist() for v in back.train_views] == [v.tolist() for v in views]
    assert spec["hparams"]["patience"] == 2
    with pytest.raises(ValueError, match="train_w"):
        TrainData(x, y, x, y, ["a", "b"], train_w=np.ones(3))
    with pytest.raises(ValueError, match="train_soft"):
        TrainData(x, y, x, y, ["a", "b"], train_soft=np.ones(3))
    with pytest.raises(ValueError, match="one probability per train row"):  # a probability matrix is not it
        TrainData(x, y, x, y, ["a", "b"], train_soft=np.full((len(y), 2), 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        TrainData(x, y, x, y, ["a", "b"], train_soft=np.full(len(y), 1.5))
    # without them, nothing is written and nothing comes back
    _write_job(FitJob(tail=_linear(), data=TrainData(x, y, x[:4], y[:4], ["a", "b"]), hparams=TrainParams()),
               tmp_path / "plain")
    _, plain, _ = _read_job(tmp_path / "plain")
    assert plain.train_w is None and plain.train_soft is None


def test_the_time_cap_ends_training_after_the_epoch_that_reaches_it() -> None:
    x, y = _toy(64)
    tail = _linear()
    rec = Recorder(tail)
    # any epoch takes longer than a microsecond: a second one would end past the cap
    result = fit(tail, TrainData(x, y, x[:16], y[:16], ["a", "b"]),
                 TrainParams(lr=0.05, batch_size=16, epochs=5, patience=3, max_seconds=1e-6), listener=rec)
    assert len(rec.epochs) == 1 and result.out_of_time and not result.stopped and result.best_epoch == 1
    roomy = fit(_linear(), TrainData(x, y, x[:16], y[:16], ["a", "b"]),
                TrainParams(lr=0.05, batch_size=16, epochs=5, max_seconds=3600), listener=Recorder(_linear()))
    assert len(roomy.epochs) == 5 and not roomy.out_of_time


def _sign_tail() -> nn.Module:
    """Class 1 when the first feature is positive, else class 0 (weights set by hand)."""
    tail = nn.Linear(2, 2)
    with torch.no_grad():
        tail.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        tail.bias.zero_()
    return tail


def _rows_right(n: int, right: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` val rows of class 1 of which the sign tail gets exactly ``right`` right."""
    x = np.zeros((n, 2), dtype=np.float32)
    x[:right, 0], x[right:, 0] = 1.0, -1.0
    return x, np.ones(n, dtype=np.int64)


def test_the_view_check_allows_half_the_probes_error_or_the_tolerance() -> None:
    from dlforge.trainer.handlers import check_views

    vx, vy = _rows_right(20, 16)  # identity: 0.80, error 0.20 -> a view may cost max(0.02, 0.5 * 0.20) = 0.10
    views = {
        "mild": _rows_right(20, 15)[0],  # 0.75: costs 0.05 -> kept
        "edge": _rows_right(20, 14)[0],  # 0.70: costs exactly 0.10 -> kept
        "harsh": _rows_right(20, 13)[0],  # 0.65: costs 0.15 -> dropped
    }
    data = TrainData(vx, vy, vx, vy, ["a", "b"], val_views=views)
    check = check_views(_sign_tail(), data, tolerance=0.02, error_share=0.5)
    assert check.val_accuracy == pytest.approx({"identity": 0.8, "mild": 0.75, "edge": 0.7, "harsh": 0.65})
    assert check.tolerance == pytest.approx(0.10) and check.kept == ["identity", "mild", "edge"]
    # a perfect probe: only the floor remains (1 of 50 wrong costs 0.02 -> kept; 2 of 50 -> dropped)
    px, py = _rows_right(50, 50)
    floor = TrainData(px, py, px, py, ["a", "b"], val_views={"one": _rows_right(50, 49)[0],
                                                             "two": _rows_right(50, 48)[0]})
    check = check_views(_sign_tail(), floor, tolerance=0.02, error_share=0.5)
    assert check.tolerance == pytest.approx(0.02) and check.kept == ["identity", "one"]


# -- the view check of a tail whose units train: a head on the frozen units ------------------------


def _deep_tail() -> Tail:
    """A Tail whose one unit (a linear map set to the identity) trains, with a fresh head."""
    torch.manual_seed(0)
    unit = nn.Linear(2, 2)
    with torch.no_grad():
        unit.weight.copy_(torch.eye(2))
        unit.bias.zero_()
    return Tail([unit], nn.Dropout(0.0), nn.Linear(2, 2))


def _sign_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 when the first feature is positive (kept clear of 0)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    x[:, 0] += np.sign(x[:, 0]) * 0.3
    return x, (x[:, 0] > 0).astype(np.int64)


def _mirrored(x: np.ndarray, column: int) -> np.ndarray:
    out = x.copy()
    out[:, column] *= -1
    return out


def _deep_view_data() -> TrainData:
    """Two declared views: ``swap`` negates the feature that decides the class (the label changes),
    ``keep`` the other one (it does not)."""
    x, y = _sign_data(200, 1)
    vx, vy = _sign_data(60, 2)
    return TrainData(x, y, vx, vy, ["neg", "pos"], train_views=[_mirrored(x, 0), _mirrored(x, 1)],
                     val_views={"swap": _mirrored(vx, 0), "keep": _mirrored(vx, 1)})


class _SpyRun:
    """The engine of train_tail, spied on: what it was handed, then ``train`` (by default: fit)."""

    def __init__(self, tail: Tail, train: Callable[[TrainData, TrainParams], FitResult] | None = None) -> None:
        self.tail, self.train = tail, train
        self.calls: list[tuple[TrainData, TrainParams, dict[str, torch.Tensor]]] = []

    def __call__(self, data: TrainData, hp: TrainParams) -> FitResult:
        self.calls.append((data, hp, {k: v.detach().clone() for k, v in self.tail.body.state_dict().items()}))
        return self.train(data, hp) if self.train else fit(self.tail, data, hp, listener=Recorder(self.tail))


class _FitSpy:
    """Stands in for the trainer's ``fit`` in train_tail: records what it trained (the module, its
    trainable parameter count, the input width and the time cap), then trains it."""

    def __init__(self) -> None:
        self.calls: list[tuple[nn.Module, int, int, float]] = []

    def __call__(self, model: nn.Module, data: TrainData, hp: TrainParams, **kw: object) -> FitResult:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.calls.append((model, trainable, data.train_x.shape[1], hp.max_seconds))
        return fit(model, data, hp, **kw)  # type: ignore[arg-type]


def test_a_deep_tails_view_check_trains_a_head_on_its_frozen_units_and_leaves_them_the_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.trainer import handlers

    tail, data = _deep_tail(), _deep_view_data()
    start = {k: v.detach().clone() for k, v in tail.body.state_dict().items()}
    hp = TrainParams(lr=0.05, batch_size=16, epochs=15, patience=5, dropout=0.0, max_seconds=200.0)
    probe_fits = _FitSpy()
    monkeypatch.setattr(handlers, "fit", probe_fits)
    spy = _SpyRun(tail)
    out = handlers.train_tail(tail, data, hp, run=spy, check=True, tolerance=0.02, error_share=0.5)
    # the probe: a module other than the tail, with the head's 2 x 2 + 2 parameters only, for 20 of the 200 s
    (probe, trainable, width, seconds), = probe_fits.calls
    assert probe is not tail and trainable == 6 and width == 2 and seconds == pytest.approx(20.0)
    assert out.check is not None and out.check.val_accuracy["identity"] >= 0.95
    assert out.check.val_accuracy["swap"] <= 0.05 and out.check.val_accuracy["keep"] >= 0.95
    assert out.views == ["identity", "keep"] and not out.probe_kept and out.frozen_probe
    (trained_on, run_hp, body_then), = spy.calls  # one training of the units, after the probe
    assert all(torch.equal(body_then[k], start[k]) for k in start)  # they start from their own weights
    assert run_hp.max_seconds == pytest.approx(180.0)  # 200 s less the probe's tenth
    assert [v.tolist() for v in trained_on.train_views] == [_mirrored(data.train_x, 1).tolist()]
    assert any(not torch.equal(tail.body.state_dict()[k], start[k]) for k in start)  # then the units trained


def test_a_deep_tail_with_no_view_kept_trains_its_units_without_views() -> None:
    from dlforge.trainer.handlers import train_tail

    tail, data = _deep_tail(), _deep_view_data()
    only_swap = replace(data, train_views=[data.train_views[0]], val_views={"swap": data.val_views["swap"]})
    spy = _SpyRun(tail)
    hp = TrainParams(lr=0.05, batch_size=16, epochs=10, patience=3, dropout=0.0)
    out = train_tail(tail, only_swap, hp, run=spy, check=True, tolerance=0.02, error_share=0.5)
    assert out.views == ["identity"] and not out.probe_kept
    (trained_on, run_hp, _), = spy.calls
    assert trained_on.train_views == [] and run_hp.max_seconds == 0.0  # no cap stays no cap


def test_a_frozen_probe_that_beats_the_units_training_is_kept_as_the_starting_units_and_its_head() -> None:
    from dlforge.trainer.handlers import train_tail

    tail, data = _deep_tail(), _deep_view_data()
    start = {k: v.detach().clone() for k, v in tail.body.state_dict().items()}

    def wreck(_: TrainData, __: TrainParams) -> FitResult:  # a training that ends calling everything "neg"
        with torch.no_grad():
            for p in tail.parameters():
                p.zero_()
            tail.head.bias.copy_(torch.tensor([1.0, -1.0]))
        return FitResult(epochs=[metrics(1, 0.5, 1.0)], steps=1)

    hp = TrainParams(lr=0.05, batch_size=16, epochs=15, patience=5, dropout=0.0)
    out = train_tail(tail, data, hp, run=_SpyRun(tail, wreck), check=True, tolerance=0.02, error_share=0.5)
    assert out.probe_kept and out.views == ["identity"]
    assert out.views_val_accuracy == pytest.approx(float((data.val_y == 0).mean()))  # the wrecked model's
    assert all(torch.equal(tail.body.state_dict()[k], start[k]) for k in start)
    tail.eval()
    with torch.no_grad():
        pred = tail(torch.from_numpy(data.val_x)).argmax(1).numpy()
    assert (pred == data.val_y).mean() >= 0.95  # the probe's head on the starting units
    assert out.result.epochs and out.result.epochs[-1].val_accuracy >= 0.95  # the probe's own epochs


def test_a_tail_whose_units_are_frozen_is_its_own_probe_and_shares_the_cap_half_and_half(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.trainer import handlers

    tail, data = _deep_tail(), _deep_view_data()
    for p in tail.body.parameters():
        p.requires_grad_(False)
    probe_fits = _FitSpy()
    monkeypatch.setattr(handlers, "fit", probe_fits)
    spy = _SpyRun(tail)
    hp = TrainParams(lr=0.05, batch_size=16, epochs=15, patience=5, dropout=0.0, max_seconds=200.0)
    out = handlers.train_tail(tail, data, hp, run=spy, check=True, tolerance=0.02, error_share=0.5)
    (probe, trainable, _, seconds), = probe_fits.calls
    assert probe is tail and trainable == 6 and seconds == pytest.approx(100.0)
    assert out.views == ["identity", "keep"] and not out.frozen_probe
    (_, run_hp, _), = spy.calls
    assert run_hp.max_seconds == pytest.approx(100.0)
