"""dlforge tuner: hyperparameter optimization of the proposed model.

An Optuna study per pipeline run (durable RDB storage) over a declared search space; each trial goes
to the trainer workers as ``hpo.trial``; their ``hpo.trial.completed`` is told to the study and the
next trial asked until the budget is spent, then ``hpo.completed`` carries the best parameters.
"""
