"""dlforge.augmenter: on ``dataset.labeled``, fill scarce classes with generated samples.

The stage counts the real train items per class against ``options.min_per_class`` and
``options.max_imbalance``, generates samples for each scarce class (a :class:`~dlforge.augmenter.generators.
Generator`: augmentation policies and within-class mixup), keeps only those that a classifier trained on
the real data assigns to the intended class with high confidence (a :class:`~dlforge.augmenter.filters.
SampleFilter`: the seeds' "X2" filter), writes the training manifest (real + kept generated items) and
emits ``dataset.augmented``.
"""
