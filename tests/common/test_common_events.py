"""Events: golden files of every payload version replay through decode(); upcasting; poison messages."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import ValidationError

from dlforge.common.errors import PoisonMessage
from dlforge.common.events import (
    PAYLOAD_TYPES,
    DatasetLabeled,
    Event,
    HpoCompleted,
    HpoTrial,
    HpoTrialCompleted,
    LabelsSubmitted,
    PipelineOptions,
    RunFailed,
    Spec,
    Topic,
    decode,
    encode,
    register_upcaster,
    unregister_upcaster,
)

GOLDEN = Path(__file__).parent / "assets" / "events"
FILES = sorted(GOLDEN.glob("*.json"))
_NAME = re.compile(r"^(?P<topic>.+)\.v(?P<version>\d+)\.json$")


def _parse(path: Path) -> tuple[Topic, int]:
    m = _NAME.match(path.name)
    assert m, f"golden file name {path.name} is not <topic>.v<version>.json"
    return Topic(m["topic"]), int(m["version"])


def test_every_topic_has_a_payload_type() -> None:
    assert set(PAYLOAD_TYPES) == set(Topic)


@pytest.mark.parametrize("topic", sorted(PAYLOAD_TYPES), ids=str)
def test_every_payload_version_has_a_golden_file(topic: Topic) -> None:
    current = PAYLOAD_TYPES[topic].SCHEMA_VERSION
    for version in range(1, current + 1):
        assert (GOLDEN / f"{topic.value}.v{version}.json").is_file(), f"no golden event for {topic} v{version}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_golden_event_replays(path: Path) -> None:
    topic, version = _parse(path)
    raw = path.read_bytes()
    stored = json.loads(raw)
    event = decode(raw)
    payload_cls = PAYLOAD_TYPES[topic]
    assert event.event_type == topic and type(event.payload) is payload_cls
    assert event.schema_version == payload_cls.SCHEMA_VERSION
    assert event.occurred_at.tzinfo is not None
    if version == payload_cls.SCHEMA_VERSION:
        # the current version round-trips byte for byte in meaning: nothing lost, nothing added
        assert json.loads(encode(event)) == stored
    else:
        # an old version is upcast: the envelope is kept, the payload is of the current version
        assert (event.event_id, event.run_id) == (stored["event_id"], stored["run_id"])


# ------------------------------------------------------------------------------------------------
# upcasting: a payload whose schema moved on, and the old events still on the bus
# ------------------------------------------------------------------------------------------------


class RunFailedV2(RunFailed):
    """run.failed as it might look after a change: a severity was added."""

    SCHEMA_VERSION: ClassVar[int] = 2
    severity: Literal["error", "warning"]


class RunFailedV3(RunFailedV2):
    """...and later the reason split into a code and a message."""

    SCHEMA_VERSION: ClassVar[int] = 3
    code: str


V2_TYPES = {**PAYLOAD_TYPES, Topic.RUN_FAILED: RunFailedV2}
V3_TYPES = {**PAYLOAD_TYPES, Topic.RUN_FAILED: RunFailedV3}


@pytest.fixture
def upcasters() -> object:
    register_upcaster(Topic.RUN_FAILED, 1, lambda p: {**p, "severity": "error"})
    register_upcaster(Topic.RUN_FAILED, 2, lambda p: {**p, "code": p["reason"].split(":")[0]})
    yield
    unregister_upcaster(Topic.RUN_FAILED, 1)
    unregister_upcaster(Topic.RUN_FAILED, 2)


def test_an_old_event_is_upcast_to_the_current_version(upcasters: object) -> None:
    raw = (GOLDEN / "run.failed.v1.json").read_bytes()
    stored = json.loads(raw)
    event = decode(raw, payload_types=V2_TYPES)
    assert event.schema_version == 2 and isinstance(event.payload, RunFailedV2)
    assert event.payload.severity == "error"
    assert event.payload.reason == stored["payload"]["reason"] and event.payload.stage == "trainer"
    assert event.event_id == stored["event_id"]
    again = json.loads(encode(event))
    assert again["schema_version"] == 2 and again["payload"]["severity"] == "error"
    assert decode(encode(event), payload_types=V2_TYPES) == event  # v2 is read as it is


def test_upcasters_chain_across_versions(upcasters: object) -> None:
    event = decode((GOLDEN / "run.failed.v1.json").read_bytes(), payload_types=V3_TYPES)
    assert event.schema_version == 3 and isinstance(event.payload, RunFailedV3)
    assert (event.payload.severity, event.payload.code) == ("error", "poison message")


def test_an_old_event_without_an_upcaster_is_poison() -> None:
    with pytest.raises(PoisonMessage, match=r"no upcaster for run\.failed from schema_version 1"):
        decode((GOLDEN / "run.failed.v1.json").read_bytes(), payload_types=V2_TYPES)


def test_labels_submitted_v1_is_a_submission_straight_to_the_bus() -> None:
    stored = json.loads((GOLDEN / "labels.submitted.v1.json").read_bytes())
    event = decode((GOLDEN / "labels.submitted.v1.json").read_bytes())
    assert isinstance(event.payload, LabelsSubmitted) and event.schema_version == 2
    assert event.payload.sequence is None  # v1 had no label log
    assert event.payload.labels == stored["payload"]["labels"] == {"i-0001": "defect", "i-0002": "good"}
    assert event.payload.annotator == "annotator-sim"


def test_the_default_registry_is_untouched_by_test_upcasters(upcasters: object) -> None:
    event = decode((GOLDEN / "run.failed.v1.json").read_bytes())
    assert type(event.payload) is RunFailed and event.schema_version == 1


# ------------------------------------------------------------------------------------------------
# what can never become an Event
# ------------------------------------------------------------------------------------------------


def _golden(topic: str = "labels.submitted") -> dict:
    return json.loads((GOLDEN / f"{topic}.v1.json").read_bytes())


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2, 3]", "not an object"),
        (json.dumps({**_golden(), "event_type": "no.such.topic"}).encode(), "unknown event_type 'no.such.topic'"),
        (json.dumps({**_golden(), "schema_version": 3}).encode(), "newer than this service knows"),
        (json.dumps({**_golden(), "schema_version": "1"}).encode(), "schema_version missing or not an integer"),
        (json.dumps({k: v for k, v in _golden().items() if k != "payload"}).encode(), "payload missing"),
        (json.dumps({**_golden(), "payload": {"dataset_id": "d"}}).encode(), "invalid labels.submitted event"),
        (json.dumps({**_golden(), "payload": {**_golden()["payload"], "extra": 1}}).encode(),
         "invalid labels.submitted event"),
        (json.dumps({**_golden(), "occurred_at": "2026-01-01T00:00:00"}).encode(), "invalid labels.submitted"),
        (json.dumps({**_golden(), "run_id": None}).encode(), "invalid labels.submitted event"),
    ],
    ids=["binary", "broken-json", "json-array", "unknown-type", "newer-version", "version-not-int",
         "no-payload", "payload-missing-fields", "payload-extra-field", "naive-time", "no-run-id"],
)
def test_what_cannot_become_an_event_is_a_poison_message(raw: bytes, reason: str) -> None:
    with pytest.raises(PoisonMessage, match=re.escape(reason)):
        decode(raw)


def test_a_topic_missing_from_the_registry_is_poison() -> None:
    types = {t: c for t, c in PAYLOAD_TYPES.items() if t != Topic.LABELS_SUBMITTED}
    with pytest.raises(PoisonMessage, match=r"no payload type for labels\.submitted"):
        decode((GOLDEN / "labels.submitted.v1.json").read_bytes(), payload_types=types)


def test_new_and_follow_fill_the_envelope() -> None:
    payload = LabelsSubmitted(dataset_id="d", batch_id="b", labels={"i": "good"}, annotator="a")
    event = Event.new(payload, run_id="run-1")
    assert event.event_type == Topic.LABELS_SUBMITTED and event.topic == Topic.LABELS_SUBMITTED
    assert event.schema_version == 2 and event.causation_id is None and len(event.event_id) == 32
    assert event.occurred_at.tzinfo is not None and abs((datetime.now(UTC) - event.occurred_at).total_seconds()) < 60
    caused = event.follow(RunFailed(stage="labeler", reason="x"))
    assert (caused.run_id, caused.causation_id) == ("run-1", event.event_id)
    assert caused.event_id != event.event_id and caused.event_type == Topic.RUN_FAILED
    assert decode(encode(caused)) == caused


# ------------------------------------------------------------------------------------------------
# bounds: what a run may ask for holds at the API and when an event is decoded
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("hpo_trials", 10**9, "less than or equal to 200"),
        ("train_epochs", 10**9, "less than or equal to 500"),
        ("train_epochs", 501, "less than or equal to 500"),
        ("hpo_parallel", 33, "less than or equal to 32"),
        ("no_of_workers", 65, "less than or equal to 64"),
        ("min_per_class", 10_001, "less than or equal to 10000"),
        ("max_imbalance", 1e9, "less than or equal to 1000"),
        ("seed", -1, "greater than or equal to 0"),
        ("seed", 2**31, "less than or equal to 2147483647"),
    ],
)
def test_run_options_have_upper_bounds(field: str, value: float, words: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(words)):
        PipelineOptions.model_validate({field: value})
    # the largest accepted value is the bound itself, with the other options at their defaults
    bound = next(m.le for m in PipelineOptions.model_fields[field].metadata if hasattr(m, "le"))
    assert PipelineOptions.model_validate({field: bound}).model_dump()[field] == bound


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"positive_class": "defect\x1b[31m"}, "not a valid class name"),
        ({"positive_class": "a/b"}, "not a valid class name"),
        ({"positive_class": "x" * 101}, "not a valid class name"),
        ({"positive_class": "   "}, "not a valid class name"),
        ({"min_fps": 1e12}, "less than or equal to 100000"),
    ],
    ids=["control-chars", "slash", "too-long", "blank", "fps"],
)
def test_spec_fields_are_bounded_and_class_names_checked(spec: dict, words: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(words)):
        Spec.model_validate(spec)


def test_a_class_name_is_stored_stripped() -> None:
    assert Spec(positive_class="  defect ").positive_class == "defect"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: p["options"].update(hpo_trials=10**9, train_epochs=10**9), "hpo_trials"),
        (lambda p: p["spec"].update(positive_class="bad\x07class"), "not a valid class name"),
        (lambda p: p["classes"].append("new\nline"), "not a valid class name"),
    ],
    ids=["options", "positive-class", "classes"],
)
def test_an_event_beyond_the_bounds_is_a_poison_message(change: Callable[[dict], None], words: str) -> None:
    doc = json.loads((GOLDEN / "dataset.uploaded.v2.json").read_bytes())
    change(doc["payload"])
    with pytest.raises(PoisonMessage, match=re.escape(words)):
        decode(json.dumps(doc).encode())


def test_labels_with_control_characters_do_not_decode() -> None:
    doc = _golden()
    doc["payload"]["labels"] = {"item-1": "good\x00"}
    with pytest.raises(PoisonMessage, match="not a valid class name"):
        decode(json.dumps(doc).encode())


def test_a_v1_trial_loses_the_tuners_storage_url_and_keeps_everything_else() -> None:
    stored = json.loads((GOLDEN / "hpo.trial.v1.json").read_bytes())
    event = decode(json.dumps(stored).encode())
    assert isinstance(event.payload, HpoTrial) and event.schema_version == 4
    dumped = event.payload.model_dump(mode="json")
    assert "storage_url" not in dumped
    assert dumped == {**{k: v for k, v in stored["payload"].items() if k != "storage_url"}, "sample_method": "random",
                      "sample_seed": None}
    with pytest.raises(PoisonMessage, match="storage_url"):  # a v2 event may not carry it
        decode(json.dumps({**stored, "schema_version": 2}).encode())


def test_a_v2_trial_trained_on_a_random_sample_and_a_v3_one_says_how_it_samples() -> None:
    stored = json.loads((GOLDEN / "hpo.trial.v2.json").read_bytes())
    assert "sample_method" not in stored["payload"]
    event = decode(json.dumps(stored).encode())
    assert isinstance(event.payload, HpoTrial) and event.schema_version == 4
    assert event.payload.model_dump(mode="json") == {**stored["payload"], "sample_method": "random",
                                                     "sample_seed": None}
    current = decode((GOLDEN / "hpo.trial.v3.json").read_bytes())
    assert isinstance(current.payload, HpoTrial)
    assert (current.payload.sample_method, current.payload.sample_fraction) == ("k_center", 0.25)
    with pytest.raises(PoisonMessage, match="sample_method"):  # v3 names one of the known methods
        decode(json.dumps({**stored, "schema_version": 3, "payload": {**stored["payload"],
                                                                       "sample_method": "stratified"}}).encode())


def test_a_v3_trial_leaves_its_sample_seed_to_the_study_name_and_a_v4_one_carries_the_runs() -> None:
    stored = json.loads((GOLDEN / "hpo.trial.v3.json").read_bytes())
    old = decode(json.dumps(stored).encode())
    assert isinstance(old.payload, HpoTrial) and old.schema_version == 4 and old.payload.sample_seed is None
    current = decode((GOLDEN / "hpo.trial.v4.json").read_bytes())
    assert isinstance(current.payload, HpoTrial) and current.payload.sample_seed == 7
    for bad in (-1, 2**32):
        with pytest.raises(PoisonMessage, match="sample_seed"):
            decode(json.dumps({**stored, "schema_version": 4,
                               "payload": {**stored["payload"], "sample_seed": bad}}).encode())


def test_trial_events_are_keyed_per_trial_and_the_rest_per_run() -> None:
    trial = decode((GOLDEN / "hpo.trial.v3.json").read_bytes())
    reported = decode((GOLDEN / "hpo.trial.reported.v1.json").read_bytes())
    decision = decode((GOLDEN / "hpo.trial.decision.v1.json").read_bytes())
    completed = decode((GOLDEN / "hpo.trial.completed.v1.json").read_bytes())
    # the golden trial is trial 2 of run-golden-0001; its report and decision too
    assert trial.key == reported.key == decision.key == "run-golden-0001:2"
    others = [trial.follow(HpoTrial.model_validate({**trial.payload.model_dump(), "trial_number": n})).key
              for n in range(4)]
    assert others == [f"run-golden-0001:{n}" for n in range(4)]
    # a study's completions stay in one partition: the tuner tells and asks them in order
    assert completed.key == completed.run_id
    labels = decode((GOLDEN / "labels.submitted.v1.json").read_bytes())
    assert labels.key == labels.run_id


def test_a_report_refuses_a_value_that_is_not_a_number() -> None:
    stored = json.loads((GOLDEN / "hpo.trial.reported.v1.json").read_bytes())
    for bad in ("NaN", "Infinity"):
        raw = json.dumps(stored).replace("0.6875", bad).encode()
        with pytest.raises(PoisonMessage, match=r"invalid hpo\.trial\.reported"):
            decode(raw)


def test_a_v4_labeled_event_was_chosen_by_the_bound_and_a_v5_one_says_which_rule() -> None:
    old = decode((GOLDEN / "dataset.labeled.v4.json").read_bytes())
    assert isinstance(old.payload, DatasetLabeled)
    assert (old.payload.auto_label_guarantee, old.payload.expected_error_estimate) == ("bound", None)
    assert old.payload.auto_label_error_bound == 0.0093
    current = decode((GOLDEN / "dataset.labeled.v5.json").read_bytes())
    assert isinstance(current.payload, DatasetLabeled)
    assert (current.payload.auto_label_guarantee, current.payload.expected_error_estimate) == ("expected", 0.0087)


def test_trials_before_the_loss_tie_break_carry_no_loss_and_newer_ones_a_finite_one() -> None:
    stored = json.loads((GOLDEN / "hpo.trial.completed.v1.json").read_bytes())
    old = decode(json.dumps(stored).encode())
    assert isinstance(old.payload, HpoTrialCompleted) and old.schema_version == 3
    assert old.payload.model_dump(mode="json") == {**stored["payload"], "val_loss": None, "val_correct": None}
    current = decode((GOLDEN / "hpo.trial.completed.v2.json").read_bytes())
    assert isinstance(current.payload, HpoTrialCompleted) and current.payload.val_loss == 0.5125
    for bad in (-0.5, "NaN", "Infinity"):
        with pytest.raises(PoisonMessage, match="val_loss"):
            decode(json.dumps({**stored, "schema_version": 2,
                               "payload": {**stored["payload"], "val_loss": bad}}).encode())
    completed = json.loads((GOLDEN / "hpo.completed.v3.json").read_bytes())
    upcast = decode(json.dumps(completed).encode())
    assert isinstance(upcast.payload, HpoCompleted) and upcast.schema_version == 5
    assert [t.model_dump(mode="json") for t in upcast.payload.trials] == [
        {**t, "val_loss": None} for t in completed["payload"]["trials"]]
    newer = decode((GOLDEN / "hpo.completed.v4.json").read_bytes())
    assert isinstance(newer.payload, HpoCompleted) and [t.val_loss for t in newer.payload.trials] == [0.41, 0.5]


def test_trials_before_per_item_results_carry_none_and_newer_ones_a_packed_vector() -> None:
    stored = json.loads((GOLDEN / "hpo.trial.completed.v2.json").read_bytes())
    old = decode(json.dumps(stored).encode())
    assert isinstance(old.payload, HpoTrialCompleted) and old.payload.val_correct is None
    current = decode((GOLDEN / "hpo.trial.completed.v3.json").read_bytes())
    assert isinstance(current.payload, HpoTrialCompleted) and current.payload.val_correct == "10:ff40"
    for bad in ("ff40", "10:FF40", "10:ff 40", "-1:ff", "10:ff40;", "10:ff", "8:ff00", "3:21"):
        with pytest.raises(PoisonMessage, match="val_correct"):
            decode(json.dumps({**stored, "schema_version": 3,
                               "payload": {**stored["payload"], "val_correct": bad}}).encode())
    before = decode((GOLDEN / "hpo.completed.v4.json").read_bytes())
    assert isinstance(before.payload, HpoCompleted) and before.payload.choice is None
    now = decode((GOLDEN / "hpo.completed.v5.json").read_bytes())
    assert isinstance(now.payload, HpoCompleted) and now.payload.choice is not None
    assert now.payload.choice.startswith("kept the baseline") and now.payload.best_params == {"lr": 0.01}
    assert now.payload.best_value == 0.88 == now.payload.trials[0].value  # the kept baseline's, not the highest
