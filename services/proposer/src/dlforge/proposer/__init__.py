"""dlforge proposer: a pre-trained model repository (Network x Data) and the ranking of its candidates.

On ``dataset.augmented`` every repository candidate is scored on a sample of the target data —
feature transferability (LogME, linear probe, domain discriminator), a short training run's
loss-curve integral and val accuracy, measured inference speed — the sub-scores are normalized and
weighted into a total, and ``model.proposed`` carries the ranking.
"""
