"""The tuner's memory of finished studies, and the warm start it gives a new one.

A study whose run carries a data-set fingerprint (``TuningConfig.fingerprint``, see
:func:`dlforge.hpo.warmstart.fingerprint`; the proposer computes one for every run from the ImageNet
EfficientNet-Lite0 features of its target sample, ``model.proposed``'s ``fingerprint``, and a
run's tuning override may give its own) is remembered when it completes, in the tuner's own
collection :data:`PAST_STUDIES`, with its best complete trials. A new study with a fingerprint and
``warm_start_studies > 0`` enqueues the best configurations of its nearest past studies first (the
nearest study's best first), ahead of the run's own ``enqueue`` list.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from dlforge.common.docs import DocumentStore
from dlforge.common.events import MAX_HPO_TRIALS
from dlforge.hpo.warmstart import PastStudy, StudyIndex, warm_start_params
from dlforge.tuner.handlers import TuningConfig, tie_break

PAST_STUDIES = "tuner_past_studies"
KEEP_BEST = 5


def best_params(study: optuna.Study, keep: int = KEEP_BEST) -> list[dict[str, Any]]:
    """The parameters of the study's best complete trials, best first, each configuration once (with a
    fidelity ladder a promoted configuration completed at several rungs)."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE
                and t.value is not None and math.isfinite(t.value)]
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    ranked = sorted(complete, key=lambda t: (sign * float(t.value or 0.0), *tie_break(t)))
    out: list[dict[str, Any]] = []
    for t in ranked:
        if len(out) == keep:
            break
        if t.params not in out:
            out.append(dict(t.params))
    return out


async def remember_study(docs: DocumentStore, *, study_name: str, dataset_id: str, fingerprint: list[float],
                         best: list[dict[str, Any]]) -> None:
    """Store (or replace) a finished study's fingerprint and best configurations."""
    if not best:
        return
    await docs.upsert(PAST_STUDIES, {"_id": study_name, "dataset_id": dataset_id,
                                     "fingerprint": [float(v) for v in fingerprint], "best_params": best})


async def past_studies(docs: DocumentStore, *, exclude: str | None = None) -> list[PastStudy]:
    return [PastStudy(study_name=d["_id"], fingerprint=np.asarray(d["fingerprint"], dtype=np.float32),
                      best_params=list(d["best_params"]))
            for d in await docs.find(PAST_STUDIES) if d["_id"] != exclude]


async def warm_started(docs: DocumentStore, config: TuningConfig, *, study_name: str) -> TuningConfig:
    """``config`` with the nearest past studies' best configurations enqueued ahead of its own."""
    if config.fingerprint is None or config.warm_start_studies == 0:
        return config
    width = len(config.fingerprint)
    past = [s for s in await past_studies(docs, exclude=study_name) if len(s.fingerprint) == width]
    if not past:
        return config
    warm = warm_start_params(StudyIndex(past), np.asarray(config.fingerprint, dtype=np.float32),
                             studies=config.warm_start_studies, per_study=config.warm_start_per_study,
                             problems=config.space.problems)
    keys = {repr(sorted(p.items())) for p in warm}
    own = [p for p in config.enqueue if repr(sorted(p.items())) not in keys]
    return config.model_copy(update={"enqueue": (warm + own)[:MAX_HPO_TRIALS]})
