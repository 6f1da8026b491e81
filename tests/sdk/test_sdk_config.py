"""Estimator, HParams and RunConfig validate with clear errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dlforge.sdk import Estimator, HParams, RunConfig
from dlforge.sdk.config import job_request


def test_seed_notebook_names_are_refused_with_what_to_use() -> None:
    with pytest.raises(ValidationError, match="parameter servers are not used"):
        RunConfig(no_of_ps=5, no_of_workers=20)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match=r"use HParams\(epochs=...\)"):
        HParams(iterations=50000, batch_size=10)  # type: ignore[call-arg]
    rc = RunConfig(no_of_workers=4, checkpoint_frequency_in_steps=500, summary_save_frequency=50)  # type: ignore[call-arg]
    assert rc.checkpoint_every_steps == 500 and rc.summary_every_steps == 50


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: HParams(lr=0), "greater than 0"),
        (lambda: HParams(optimizer="rmsprop"), "'sgd', 'adam' or 'adamw'"),
        (lambda: HParams(dropout=1.0), "less than 1"),
        (lambda: HParams(ema_decay=1.0), "less than 1"),
        (lambda: HParams(batch_size=0), "greater than or equal to 1"),
        (lambda: HParams(unknown=1), "Extra inputs are not permitted"),
        (lambda: RunConfig(no_of_workers=0), "greater than or equal to 1"),
        (lambda: RunConfig(engine="ps"), "'ddp' or 'horovod'"),
        (lambda: Estimator(manifest_key="m.json", classes=["a"], arch="small_cnn"), "at least 2"),
        (lambda: Estimator(manifest_key="m.json", classes=["a", "a"], arch="small_cnn"), "unique"),
        (lambda: Estimator(manifest_key="m.json", classes=["a", "b"]), "say which model to train"),
        (lambda: Estimator(manifest_key="m.json", classes=["a", "b"], weights_key="w", model_id="x"), "not both"),
    ],
)
def test_bad_values_say_what_is_wrong(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match=message):
        make()


def test_job_request_is_the_trainer_body() -> None:
    body = job_request(Estimator(manifest_key="m.json", classes=["a", "b"], weights_key="w.pt", sample_fraction=0.5),
                       HParams(lr=0.01, unfreeze=2), RunConfig(no_of_workers=2, run_eval=False))
    every = HParams(lr=0.01, unfreeze=2).model_dump()
    assert body == {
        "manifest_key": "m.json", "classes": ["a", "b"], "weights_key": "w.pt", "sample_fraction": 0.5,
        "evaluate_test": False,
        # left out: the parameters added later whose default trains as before them (ema_decay off, a constant
        # rate); body_lr_scale's default (0.1) is not how older trainers trained (1.0), so it is always sent
        "hparams": {k: v for k, v in every.items() if k not in ("ema_decay", "lr_schedule")},
        "run_config": {"no_of_workers": 2, "checkpoint_every_steps": 0, "summary_every_steps": 10, "engine": "ddp",
                       "input_size": None},
    }
    assert body["hparams"]["body_lr_scale"] == 0.1
    # the trainer accepts exactly this shape, and fills in the parameters left out with the same values
    from dlforge.trainer.handlers import TrainingRequest

    request = TrainingRequest.model_validate(body)
    assert request.hparams.model_dump(include=set(HParams.model_fields)) == every
    # a value that is the legacy one but not the default is sent
    full_rate = job_request(Estimator(manifest_key="m.json", classes=["a", "b"], arch="small_cnn"),
                            HParams(body_lr_scale=1.0, lr_schedule="cosine"), RunConfig())["hparams"]
    assert full_rate["body_lr_scale"] == 1.0 and full_rate["lr_schedule"] == "cosine" and "ema_decay" not in full_rate


def test_the_sdk_and_the_trainer_have_the_same_defaults() -> None:
    from dlforge.trainer.params import RunOptions, TrainParams

    trainer = TrainParams().model_dump()
    assert {k: trainer[k] for k in HParams.model_fields} == HParams().model_dump()
    assert RunOptions().model_dump() == RunConfig().model_dump(exclude={"run_eval"})


def test_a_trainer_from_before_a_parameter_takes_jobs_that_leave_it_at_its_default() -> None:
    # the trainer's parameters as they were before ema_decay: unknown names refused (extra="forbid")
    from pydantic import create_model

    from dlforge.trainer.params import TrainParams

    fields = {k: (f.annotation, f) for k, f in TrainParams.model_fields.items() if k != "ema_decay"}
    before = create_model("TrainParamsBefore", __config__=TrainParams.model_config, **fields)  # type: ignore[call-overload]
    estimator = Estimator(manifest_key="m.json", classes=["a", "b"], arch="small_cnn")
    before.model_validate(job_request(estimator, HParams(lr=0.01), RunConfig())["hparams"])
    with pytest.raises(ValidationError, match="ema_decay"):  # a job that asks for it is refused, not run without it
        before.model_validate(job_request(estimator, HParams(ema_decay=0.99), RunConfig())["hparams"])
    # before body_lr_scale, the backbone trained at the full rate: a job at the default 0.1 is refused there
    older = create_model("TrainParamsOlder", __config__=TrainParams.model_config,  # type: ignore[call-overload]
                         **{k: v for k, v in fields.items() if k != "body_lr_scale"})
    with pytest.raises(ValidationError, match="body_lr_scale"):
        older.model_validate(job_request(estimator, HParams(unfreeze=2), RunConfig())["hparams"])
