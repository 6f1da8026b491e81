"""The trainer's side of pruning (TrialReporter) against a recording bus and an in-memory decision store."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from dlforge.common.events import Event, HpoTrial, HpoTrialReported, Topic, decode
from dlforge.trainer.pruning import DECISIONS, TrialReporter, decision_id


class RecordingBus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, bytes]] = []

    async def publish(self, topic: Topic, *, key: str, value: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.sent.append((Topic(topic).value, key, value))


class Decisions:
    """The two reads the reporter makes of the trainer's decision collection, counted."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.gets = 0

    def answer(self, step: int, action: str) -> None:
        self.docs[decision_id("s", 4, step)] = {"study_name": "s", "trial_number": 4, "step": step, "action": action,
                                                "reason": f"{action} at {step}"}

    async def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        assert collection == DECISIONS
        self.gets += 1
        return self.docs.get(doc_id)

    async def find(self, collection: str, where: Mapping[str, Any] | None = None, *,
                   sort: Sequence[tuple[str, int]] = (), limit: int | None = None) -> list[dict[str, Any]]:
        found = [d for d in self.docs.values() if all(d.get(k) == v for k, v in (where or {}).items())]
        return sorted(found, key=lambda d: d["step"])[:limit]


def reporter(bus: RecordingBus, docs: Decisions, *, wait: float) -> TrialReporter:
    cause = Event.new(HpoTrial(study_name="s", trial_number=4, params={}, dataset_id="d", model_id="m", arch="a",
                               weights_key="w", manifest_key="m", classes=["a", "b"], epochs=5), run_id="run-9")

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run(coro)

    return TrialReporter(bus=bus, docs=docs, cause=cause, study_name="s", trial_number=4,  # type: ignore[arg-type]
                         wait_seconds=wait, run=run)


def test_each_step_is_published_and_answered_before_the_next_epoch() -> None:
    bus, docs = RecordingBus(), Decisions()
    r = reporter(bus, docs, wait=5.0)
    docs.answer(1, "continue")
    assert r.report(0.6, 1) is True
    docs.answer(2, "prune")
    assert r.report(0.55, 2) is False
    assert (r.pruned_at, r.reason) == (2, "prune at 2")
    sent = [decode(raw) for _, _, raw in bus.sent]
    assert [(e.payload.step, e.payload.value) for e in sent] == [(1, 0.6), (2, 0.55)]  # type: ignore[attr-defined]
    assert all(isinstance(e.payload, HpoTrialReported) and e.run_id == "run-9" for e in sent)
    assert {key for _, key, _ in bus.sent} == {"run-9:4"}
    assert r.intermediate == [0.6, 0.55]


def test_without_an_answer_it_trains_on_and_stops_waiting_but_obeys_a_late_prune() -> None:
    bus, docs = RecordingBus(), Decisions()
    r = reporter(bus, docs, wait=0.3)
    assert r.report(0.6, 1) is True  # no answer within 0.3 s: go on
    polls_while_waiting = docs.gets
    assert polls_while_waiting > 1
    assert r.report(0.61, 2) is True
    assert docs.gets == polls_while_waiting + 1  # no more waiting for this trial: one look, no polling
    docs.answer(1, "prune")  # the answer to step 1 arrives late
    assert r.report(0.62, 3) is False and r.pruned_at == 1


def test_the_last_epoch_is_not_published_and_a_non_finite_value_stops() -> None:
    bus, docs = RecordingBus(), Decisions()
    r = reporter(bus, docs, wait=5.0)
    assert r.report(0.7, 5, last=True) is True
    assert bus.sent == [] and docs.gets == 0 and r.intermediate == [0.7]
    assert r.report(math.nan, 6) is False and bus.sent == []
