"""dlforge tuner: hyperparameter optimization of the proposed model.

An Optuna study per pipeline run (durable RDB storage) over a declared search space; each trial goes
to the trainer workers as ``hpo.trial``; their per-epoch ``hpo.trial.reported`` values are recorded and
answered with the pruner's ``hpo.trial.decision``; their ``hpo.trial.completed`` is told to the study
and the next trial asked until the budget is spent, then ``hpo.completed`` carries the best parameters.
The study's storage is the tuner's alone.
"""
