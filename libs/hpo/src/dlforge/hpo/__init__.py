"""The tuner's Optuna plumbing: its study storage and the stored description of a study's pruner.

Only the tuner opens a study's storage: the trainer reports a trial's intermediate values as
``hpo.trial.reported`` events and reads the tuner's pruning decisions from its own store, so no
other service reaches this database (see ``dlforge.trainer.pruning``).

Optuna does not persist a study's pruner, so the tuner stores a description of it in the study's user
attribute :data:`PRUNER_ATTR`: ``{"factory": "optuna.pruners.MedianPruner", "kwargs": {...}}`` (a
nested ``{"factory": ...}`` among the kwargs builds a wrapped pruner), and every tuner replica builds
the same pruner from it. Only factories from ``optuna.pruners`` and dlforge's own
``dlforge.hpo.pruners`` are accepted: the description comes from a stored document, and must not name
arbitrary callables.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from typing import Any

import optuna

from dlforge.common.errors import InvalidInput, RetryableError

PRUNER_ATTR = "dlforge.pruner"
ALLOWED_PRUNERS = ("optuna.pruners.", "dlforge.hpo.pruners.")

_STORAGES: dict[str, optuna.storages.BaseStorage] = {}
_LOCK = threading.Lock()


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """One RDB storage per URL and process (SQLite gets a generous lock timeout).

    Optuna's own log handler is replaced by propagation to the process's logging. Raises
    RetryableError when the storage cannot be opened (unreachable server, locked file, bad URL).
    """
    with _LOCK:
        storage = _STORAGES.get(url)
        if storage is None:
            optuna.logging.disable_default_handler()
            optuna.logging.enable_propagation()
            kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            except Exception as exc:  # the driver's own errors: unreachable server, bad URL
                raise RetryableError(f"cannot open the Optuna storage {url!r}: {exc}") from exc
            _STORAGES[url] = storage
        return storage


def build_pruner(spec: dict[str, Any] | None) -> optuna.pruners.BasePruner:
    """The pruner a stored description names (``NopPruner`` for None); InvalidInput for a bad one."""
    if not spec:
        return optuna.pruners.NopPruner()
    factory = str(spec.get("factory", ""))
    module, _, name = factory.rpartition(".")
    if f"{module}." not in ALLOWED_PRUNERS:
        raise InvalidInput(f"pruner factory {factory!r} is not in {' or '.join(m + '*' for m in ALLOWED_PRUNERS)}")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, optuna.pruners.BasePruner)):
        raise InvalidInput(f"no pruner {factory!r} (Optuna {optuna.__version__})")
    kwargs = {k: build_pruner(v) if isinstance(v, dict) and "factory" in v else v
              for k, v in dict(spec.get("kwargs", {})).items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            pruner: optuna.pruners.BasePruner = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"pruner {name}: bad kwargs {spec.get('kwargs')}: {exc}") from exc
    return pruner
