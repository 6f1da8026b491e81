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
    assert body == {
        "manifest_key": "m.json", "classes": ["a", "b"], "weights_key": "w.pt", "sample_fraction": 0.5,
        "evaluate_test": False, "hparams": HParams(lr=0.01, unfreeze=2).model_dump(),
        "run_config": {"no_of_workers": 2, "checkpoint_every_steps": 0, "summary_every_steps": 10, "engine": "ddp",
                       "input_size": None},
    }
    # the trainer accepts exactly this shape
    from dlforge.trainer.handlers import TrainingRequest

    TrainingRequest.model_validate(body)
