"""dlforge proposer: a pre-trained model repository (Network x Data) and the ranking of its candidates.

On ``dataset.augmented`` every repository candidate is scored on a sample of the target data —
feature transferability (LogME, SFDA, k-NN, linear probe, domain discriminator, agreement with the
other candidates, PCA of the activations; NCTI when weighted), a short training run's loss-curve
integral and val accuracy — the sub-scores are normalized and weighted into a total that predicts the
accuracy after fine-tuning, and ``model.proposed`` carries the ranking. Measured inference speed is
reported and gates candidates below the spec's min_fps (sorted last); it weighs 0 unless configured.
"""
