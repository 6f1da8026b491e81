"""The tuner at start: a trial no event asked is failed; a running trial an event asked is left to its trainer."""

from __future__ import annotations

from pathlib import Path

from optuna.trial import TrialState
from test_tuner_handlers import completed, context

from dlforge.tuner.handlers import ERROR, ask_for, is_done, load_study, prepare_study, tell
from dlforge.tuner.reconcile import ORPHAN, fail_orphans


def test_a_trial_asked_by_no_event_is_failed_and_the_study_can_finish(tmp_path: Path) -> None:
    ctx = context(tmp_path, trials=2, parallel=1)
    study = prepare_study(ctx)
    [asked] = ask_for(study, ctx, asked_by="e1")
    study.ask(ctx.config.space.distributions())  # the process died before recording who asked this one
    assert fail_orphans(ctx) == [1]
    study = load_study(ctx)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[asked.number] == TrialState.RUNNING  # the trainer's: its hpo.trial comes again
    assert states[1] == TrialState.FAIL and study.get_trials()[1].user_attrs[ERROR] == ORPHAN
    assert fail_orphans(ctx) == []  # reconciling twice changes nothing
    tell(study, ctx, completed(asked.number, value=0.8))
    assert is_done(load_study(ctx), ctx)  # the orphan no longer keeps the study open
