"""A training job stopped after an epoch goes on from the state it stored, as if it had not stopped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dlforge.common.errors import NotFound
from dlforge.common.objects import ObjectStore
from dlforge.trainer.handlers import TrainerConfig, TrainingRequest, resume_key, run_training
from dlforge.trainer.params import EpochMetrics, TrainParams
from dlforge.trainer.training import FitState, TrainData, fit


class Killed(Exception):
    """Stands for a SIGKILL: the epoch hook raises and nothing after it runs."""


class _Listener:
    def __init__(self, kill_after: int | None = None) -> None:
        self.kill_after = kill_after
        self.epochs: list[int] = []

    def on_step(self, step: int, loss: float) -> None:
        """Steps are not followed here."""

    def on_epoch(self, metrics: EpochMetrics) -> bool:
        self.epochs.append(metrics.epoch)
        if self.kill_after is not None and metrics.epoch > self.kill_after:
            raise Killed
        return True

    def on_checkpoint(self, step: int, epoch: int, state: dict[str, torch.Tensor] | None) -> None:
        """No step checkpoints here."""


def _data() -> TrainData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 12)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return TrainData(x[:64], y[:64], x[64:], y[64:], ["a", "b"])


def _tail() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def _staged_tail() -> nn.Module:
    """A Tail: one unit at its share of the learning rate, then the head at the rate."""
    from dlforge.trainer.stages import Tail

    torch.manual_seed(7)
    return Tail([nn.Linear(12, 16), nn.ReLU()], nn.Dropout(0.3), nn.Linear(16, 2))


@pytest.mark.parametrize(("patience", "staged", "ema"), [(0, False, 0.0), (2, False, 0.0), (0, True, 0.0),
                                                         (0, False, 0.9), (2, False, 0.9)])
def test_fit_resumed_after_an_epoch_trains_the_same_steps_as_an_uninterrupted_fit(patience: int, staged: bool,
                                                                                  ema: float) -> None:
    hp = TrainParams(lr=0.05, batch_size=8, epochs=5, optimizer="adam", patience=patience, seed=3,
                     lr_schedule="cosine" if staged else "constant", ema_decay=ema)
    make_tail = _staged_tail if staged else _tail
    whole = make_tail()
    reference = fit(whole, _data(), hp, listener=_Listener())

    states: list[FitState] = []
    first = make_tail()
    with pytest.raises(Killed):
        fit(first, _data(), hp, listener=_Listener(kill_after=2), on_state=states.append)
    assert [s.epoch for s in states] == [1, 2]  # the third epoch's state was never stored: it was killed in it

    again = make_tail()
    listener = _Listener()
    resumed = fit(again, _data(), hp, listener=listener, resume=states[-1])
    assert listener.epochs == list(range(3, 3 + len(reference.epochs) - 2))  # only the epochs after the state
    assert resumed.steps == reference.steps
    assert [m.epoch for m in resumed.epochs] == [m.epoch for m in reference.epochs]
    assert [m.train_loss for m in resumed.epochs] == pytest.approx([m.train_loss for m in reference.epochs],
                                                                    rel=1e-6)
    # validation sees the same weights (with a weight average: the average, restored from the state)
    assert [m.val_loss for m in resumed.epochs] == pytest.approx([m.val_loss for m in reference.epochs], rel=1e-6)
    assert resumed.best_epoch == reference.best_epoch
    for a, b in zip(again.state_dict().values(), whole.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_job_killed_in_an_epoch_resumes_from_the_stored_state_and_removes_it(
    objects: ObjectStore, manifest_key: str, weights_key: str, config: TrainerConfig,
) -> None:
    req = TrainingRequest(weights_key=weights_key, manifest_key=manifest_key, classes=["defect", "good"],
                          hparams=TrainParams(lr=0.01, batch_size=8, epochs=4, unfreeze=0, dropout=0.0))
    reference = run_training(objects, req, job_id="ref", key_prefix="trainer/jobs/ref", config=config,
                             resumable=True)

    seen: list[int] = []

    def dies_in_epoch_three(m: EpochMetrics) -> bool:
        seen.append(m.epoch)
        if m.epoch == 3:
            raise Killed
        return True

    prefix = "trainer/jobs/killed"
    with pytest.raises(Killed):
        run_training(objects, req, job_id="killed", key_prefix=prefix, config=config, on_epoch=dies_in_epoch_three,
                     resumable=True)
    assert objects.exists(resume_key(prefix))  # the state after epoch 2 is kept

    rerun: list[int] = []
    out = run_training(objects, req, job_id="killed", key_prefix=prefix, config=config,
                       on_epoch=lambda m: rerun.append(m.epoch) is None, resumable=True)
    assert rerun == [3, 4]  # epochs 1 and 2 were not trained again
    assert seen == [1, 2, 3]
    assert out.steps == reference.steps and [m.epoch for m in out.epochs] == [1, 2, 3, 4]
    assert out.val is not None and reference.val is not None
    assert out.val.accuracy == pytest.approx(reference.val.accuracy)
    with pytest.raises(NotFound):
        objects.stat(resume_key(prefix))
    # the logs are one file under a name of its own, not one per attempt
    assert [i.key for i in objects.list(f"{prefix}/tensorboard/")] == [
        f"{prefix}/tensorboard/events.out.tfevents.000.dlforge"]


class _KilledAtStep(_Listener):
    """Raises (stands for a SIGKILL) once ``step`` is reported; keeps the step losses it was told."""

    def __init__(self, step: int | None = None) -> None:
        super().__init__()
        self.kill_step = step
        self.steps: list[tuple[int, float]] = []

    def on_step(self, step: int, loss: float) -> None:
        self.steps.append((step, loss))
        if self.kill_step is not None and step >= self.kill_step:
            raise Killed


def test_fit_resumed_mid_epoch_goes_on_from_the_checkpoint_step_as_if_never_stopped() -> None:
    """Killed 3 steps after a checkpoint inside epoch 2, resumed from that checkpoint's state: the same
    step count, step losses, epoch losses and weights as an uninterrupted run. Dropout (p=0.3) and a
    cosine schedule are on, so a state without the RNG's place, the schedule's step or the position in
    the epoch would train other steps and fail the comparison (exact up to float rounding: one process,
    one thread, the same operations in the same order)."""
    hp = TrainParams(lr=0.05, batch_size=6, epochs=3, optimizer="adam", lr_schedule="cosine", seed=5)
    steps_per_epoch = -(-64 // 6)  # 11: the last batch of an epoch has 4 rows
    whole = _tail()
    ref_listener = _KilledAtStep()
    reference = fit(whole, _data(), hp, listener=ref_listener, checkpoint_every_steps=4, summary_every_steps=1)

    states: list[FitState] = []
    first = _tail()
    with pytest.raises(Killed):
        fit(first, _data(), hp, listener=_KilledAtStep(step=19), checkpoint_every_steps=4, summary_every_steps=1,
            on_state=states.append)
    # mid-epoch states at the checkpoint steps before the kill (4, 8, 12, 16) and one after epoch 1 (11 steps)
    assert [(s.steps, s.epoch, s.position) for s in states] == [
        (4, 0, 24), (8, 0, 48), (11, 1, 0), (12, 1, 6), (16, 1, 30)]
    last = states[-1]
    assert last.steps == 16 and 0 < last.position < 64  # inside epoch 2

    again = _tail()
    listener = _KilledAtStep()
    resumed = fit(again, _data(), hp, listener=listener, resume=last, checkpoint_every_steps=4, summary_every_steps=1)
    assert listener.steps[0][0] == 17  # the first step after the checkpoint's, not step 1
    assert listener.epochs == [2, 3]
    assert resumed.steps == reference.steps == 3 * steps_per_epoch
    assert [s for s, _ in listener.steps] == [s for s, _ in ref_listener.steps[16:]]
    assert [v for _, v in listener.steps] == pytest.approx([v for _, v in ref_listener.steps[16:]], rel=1e-6)
    assert [m.train_loss for m in resumed.epochs] == pytest.approx([m.train_loss for m in reference.epochs],
                                                                    rel=1e-6)
    # validation sees the same weights (with a weight average: the average, restored from the state)
    assert [m.val_loss for m in resumed.epochs] == pytest.approx([m.val_loss for m in reference.epochs], rel=1e-6)
    for a, b in zip(again.state_dict().values(), whole.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_scheduler_state_matters_to_the_resumed_run() -> None:
    """The control of the test above: a state whose schedule is dropped resumes at the initial learning
    rate and ends with other weights, so the comparison there can fail."""
    hp = TrainParams(lr=0.05, batch_size=6, epochs=3, optimizer="adam", lr_schedule="cosine", seed=5)
    whole = _tail()
    fit(whole, _data(), hp, listener=_Listener())
    states: list[FitState] = []
    with pytest.raises(Killed):
        fit(_tail(), _data(), hp, listener=_KilledAtStep(step=19), checkpoint_every_steps=4, summary_every_steps=1,
            on_state=states.append)
    states[-1].scheduler = None
    again = _tail()
    fit(again, _data(), hp, listener=_Listener(), resume=states[-1])
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(again.state_dict().values(),
                                                                     whole.state_dict().values(), strict=True))


def test_fit_trains_a_tails_units_at_their_share_of_the_rate() -> None:
    hp = TrainParams(lr=0.05, batch_size=8, epochs=3, optimizer="adam", lr_schedule="cosine", seed=3)
    states: list[FitState] = []
    fit(_staged_tail(), _data(), hp, listener=_Listener(), on_state=states.append)
    groups = states[-1].optimizer["param_groups"]
    # the head at lr (the cosine's start), the unit at body_lr_scale (default 0.1) of it
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx([0.005, 0.05])
    assert sorted(len(g["params"]) for g in groups) == [2, 2]


# -- which stored state may be resumed, across versions ---------------------------------------------------


def _old_tag(data: TrainData, hp: TrainParams, *, without: tuple[str, ...] = ()) -> str:
    """The tag a version before the recorded identity stored: sha256 of pydantic's compact JSON of every
    parameter it knew, '|', the shape list (rows, val rows, views, feature dims), first 16 hex digits."""
    import hashlib
    import json

    params = {k: v for k, v in hp.model_dump(mode="json").items() if k not in without}
    shape = [len(data.train_y), len(data.val_y), len(data.train_views), *data.train_x.shape[1:]]
    return hashlib.sha256(f"{json.dumps(params, separators=(',', ':'))}|{shape}".encode()).hexdigest()[:16]


def test_a_stored_state_matches_only_the_parameters_and_data_it_was_trained_on() -> None:
    from dlforge.trainer.handlers import resume_identity, resume_matches

    data, hp = _data(), TrainParams(lr=0.01, batch_size=8, epochs=4)
    stored = {"identity": resume_identity(data, hp)}
    assert resume_matches(stored, data, hp)
    assert not resume_matches(stored, data, hp.model_copy(update={"lr": 0.02}))
    fewer = TrainData(data.train_x[:60], data.train_y[:60], data.val_x, data.val_y, data.classes)
    assert not resume_matches(stored, fewer, hp)
    # stored by a version without ema_decay: the same training while it is off, not when it is on
    before = {"identity": {**stored["identity"],
                           "hparams": {k: v for k, v in stored["identity"]["hparams"].items() if k != "ema_decay"}}}
    assert resume_matches(before, data, hp)
    assert not resume_matches(before, data, hp.model_copy(update={"ema_decay": 0.99}))
    # stored by a later version with a parameter this one does not know: never
    later = {"identity": {**stored["identity"], "hparams": {**stored["identity"]["hparams"], "warp": 1}}}
    assert not resume_matches(later, data, hp)
    # older states carry only the tag of every parameter of their day
    assert resume_matches({"tag": _old_tag(data, hp)}, data, hp)
    assert resume_matches({"tag": _old_tag(data, hp, without=("ema_decay",))}, data, hp)
    assert not resume_matches({"tag": _old_tag(data, hp, without=("ema_decay",))}, data,
                              hp.model_copy(update={"ema_decay": 0.99}))
    assert not resume_matches({"tag": _old_tag(data, hp.model_copy(update={"lr": 0.02}))}, data, hp)
    assert not resume_matches({}, data, hp)
    # the versions before body_lr_scale trained the backbone at the full rate: only a job at 1.0 goes on
    full_rate = hp.model_copy(update={"body_lr_scale": 1.0})
    before_scale = _old_tag(data, full_rate, without=("body_lr_scale", "ema_decay"))
    assert resume_matches({"tag": before_scale}, data, full_rate)
    assert not resume_matches({"tag": before_scale}, data, hp)  # the default, 0.1
    # and an identity without it: the same
    no_scale = {"identity": {**stored["identity"], "hparams": {
        k: v for k, v in resume_identity(data, full_rate)["hparams"].items() if k != "body_lr_scale"}}}
    assert resume_matches(no_scale, data, full_rate) and not resume_matches(no_scale, data, hp)


def test_every_parameter_added_since_the_first_tagged_states_has_a_legacy_value() -> None:
    from dlforge.common.events import TRAIN_PARAMS_LEGACY_VALUES as LEGACY_VALUES

    # TrainParams' fields when stored states were first tagged (92efcf4)
    first = {"lr", "batch_size", "optimizer", "momentum", "weight_decay", "dropout", "unfreeze", "epochs",
             "class_weighting", "patience", "max_seconds", "seed"}
    assert set(TrainParams.model_fields) - first == set(LEGACY_VALUES)
    for name, value in LEGACY_VALUES.items():  # each a value the parameter accepts
        TrainParams(**{name: value})


def test_a_job_goes_on_from_a_state_an_older_version_stored(
    objects: ObjectStore, manifest_key: str, weights_key: str, config: TrainerConfig,
) -> None:
    import io

    req = TrainingRequest(weights_key=weights_key, manifest_key=manifest_key, classes=["defect", "good"],
                          hparams=TrainParams(lr=0.01, batch_size=8, epochs=4, unfreeze=0, dropout=0.0))
    prefix = "trainer/jobs/upgraded"

    def dies_in_epoch_three(m: EpochMetrics) -> bool:
        if m.epoch == 3:
            raise Killed
        return True

    with pytest.raises(Killed):
        run_training(objects, req, job_id="upgraded", key_prefix=prefix, config=config, on_epoch=dies_in_epoch_three,
                     resumable=True)
    # rewrite the stored state as the version before ema_decay wrote it: no identity, its tag
    raw = torch.load(io.BytesIO(objects.get_bytes(resume_key(prefix))), map_location="cpu", weights_only=False)
    identity = raw.pop("identity")
    n, val, views, *dims = identity["shape"]
    shaped = TrainData(np.zeros((n, *dims), np.float32), np.zeros(n, np.int64), np.zeros((val, *dims), np.float32),
                       np.zeros(val, np.int64), ["defect", "good"], train_views=[np.zeros((n, *dims))] * views)
    raw["tag"] = _old_tag(shaped, req.hparams, without=("ema_decay",))
    buf = io.BytesIO()
    torch.save(raw, buf)
    objects.put_bytes(resume_key(prefix), buf.getvalue())
    rerun: list[int] = []
    run_training(objects, req, job_id="upgraded", key_prefix=prefix, config=config,
                 on_epoch=lambda m: rerun.append(m.epoch) is None, resumable=True)
    assert rerun == [3, 4]  # epochs 1 and 2 were not trained again
