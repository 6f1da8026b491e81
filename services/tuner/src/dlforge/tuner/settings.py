"""Tuner settings (environment variables ``DLFORGE_TUNER_…``)."""

from __future__ import annotations

from pydantic import Field

from dlforge.common.events import SampleMethod
from dlforge.common.settings import CommonSettings


class TunerSettings(CommonSettings):
    """Defaults of every study; a run can override them (``PUT /runs/{run_id}/tuning``)."""

    tuner_storage: str = Field(
        default="sqlite:///./.dlforge/tuner.db",
        description="the tuner's own Optuna storage: any SQLAlchemy URL (sqlite:///file.db, postgresql://..., "
        "mysql+pymysql://...). Only the tuner opens it; several tuner replicas need one they all reach",
    )
    tuner_sampler: str = Field(default="tpe", description="tpe | random | gp | qmc | cmaes | basin_hopping")
    tuner_pruner: str = Field(default="none", description="median | percentile | successive_halving (asha) | "
                              "hyperband | patient | trend | threshold | none. Default none: with the default "
                              "fidelity ladder a pruner would compare trials trained on different shares of the "
                              "data, and none of them saved compute in benchmarks/tuner.py (DEVELOPERS.md)")
    tuner_startup_trials: int = Field(default=2, ge=0, description="random trials before the Bayesian sampler "
                                      "models the space; trials before the pruner prunes")
    tuner_sample_fraction: float = Field(default=0.5, gt=0.0, le=1.0,
                                         description="stratified share of the train split each trial trains on "
                                         "when there is no fidelity ladder")
    tuner_sample_method: SampleMethod = Field(
        default="k_center", description="how a trial's share of the train split is chosen: random (stratified, by "
        "the study's seed) | k_center | herding (the class-stratified coreset of the trial's cached activations, "
        "dlforge.hpo.coreset: the share at a smaller fraction is contained in the one at a larger). The default "
        "with the ladder 0.25,0.5,1 and the automatic warm start is what benchmarks/tuner.py measured best "
        "(DEVELOPERS.md)")
    tuner_fidelity_ladder: str | None = Field(
        default="0.25,0.5,1", description="comma-separated shares of the train split, strictly increasing in "
        "(0, 1]: a new trial trains on the first; after every completion, a trial among the best third of its "
        "rung (once 3 completed there) that was not promoted yet trains again with the same parameters on the "
        "next (asynchronous successive halving on data; each training counts toward the run's hpo_trials). A run "
        "whose hpo_trials cannot climb to the top (0.25,0.5,1 needs 11 one at a time, 21 two at a time) has no "
        "ladder and trains every trial on a random tuner_sample_fraction. Empty: no ladder, every trial trains on "
        "tuner_sample_fraction")
    tuner_trial_epochs: int | None = Field(default=None, ge=1, description="epochs per trial (default: "
                                           "the run's train_epochs)")
    tuner_max_failed_trials: int = Field(default=3, ge=1, le=1000, description="a study fails (run.failed "
                                         "with the trials' errors) after this many failed trials in a row")
    tuner_space: str | None = Field(default=None, description="the default search space: JSON, or @/path/to.json")
    tuner_baseline: str = Field(
        default='{"lr": 0.001, "momentum": 0.9, "weight_decay": 1e-06, "dropout": 0.2, "unfreeze": 3, '
                '"batch_size": 32, "optimizer": "adam"}',
        max_length=4096,
        description="the parameters of every study's first trial (after warm starts), as a JSON object that must "
        "lie in the search space: a configuration that trained well in benchmarks/trainer_learning.py (the last "
        "three backbone units at a tenth of the head's learning rate; README: on ELPV it beat the frozen trunk, on "
        "a small Fashion-MNIST sample it matched it), so a short study "
        "does not rest on random draws alone. Empty: none. The default is left out, with a log line, under a "
        "DLFORGE_TUNER_SPACE it does not fit")
    tuner_baseline_alpha: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="the best trial replaces the baseline configuration only when, on the val items where exactly "
        "one of the two is right, it is right so much more often that a one-sided exact sign test gives p <= this "
        "(both are scored on the same items: a paired comparison; compared on the same share of the data). 0: the "
        "baseline is never replaced; 1: the highest val accuracy wins. Without a complete baseline trial, or "
        "without per-item results (an older trainer), the highest value wins and the report says why. "
        "benchmarks/tuner_selection.py measured 0.05 against the highest value; 0.05 to 0.2 could not be told "
        "apart there (DEVELOPERS.md)")

