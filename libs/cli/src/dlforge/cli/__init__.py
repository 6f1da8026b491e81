"""The ``dlforge`` command: the main job end to end (``demo``, ``run``) and ``up``."""
