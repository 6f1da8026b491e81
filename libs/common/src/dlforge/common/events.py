"""The event envelope, the closed set of topics and one typed payload per topic.

Every message on the bus is an :class:`Event` serialized as UTF-8 JSON. The envelope carries
``event_id`` (idempotency key), ``event_type`` (its topic), ``schema_version`` of the payload,
a tz-aware ``occurred_at``, the pipeline ``run_id`` and the payload. The partition key is
:attr:`Event.key`: the run id, or ``"<run_id>:<trial_number>"`` for the trial-scoped topics (see
:meth:`Payload.partition_key`), so one run's trials spread over partitions and consumers while each
trial's own messages keep their order.

Changing a payload's fields means bumping its ``SCHEMA_VERSION`` and registering an upcaster
with :func:`register_upcaster` that turns the previous version's JSON into the new one; golden
serialized events of every version are replayed by the tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal
from uuid import uuid4

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
)

from dlforge.common.classnames import ClassName
from dlforge.common.errors import PoisonMessage
from dlforge.common.packed import PACKED_PATTERN, unpack_bools


class Topic(StrEnum):
    """Every topic of the pipeline. No free-form topic strings anywhere else."""

    DATASET_UPLOADED = "dataset.uploaded"
    LABELS_REQUESTED = "labels.requested"
    LABELS_SUBMITTED = "labels.submitted"
    DATASET_LABELED = "dataset.labeled"
    DATASET_AUGMENTED = "dataset.augmented"
    MODEL_PROPOSED = "model.proposed"
    HPO_TRIAL = "hpo.trial"
    HPO_TRIAL_REPORTED = "hpo.trial.reported"
    HPO_TRIAL_DECISION = "hpo.trial.decision"
    HPO_TRIAL_COMPLETED = "hpo.trial.completed"
    HPO_COMPLETED = "hpo.completed"
    MODEL_TRAINED = "model.trained"
    MODEL_OPTIMIZED = "model.optimized"
    RUN_FAILED = "run.failed"
    RUN_CANCELLED = "run.cancelled"
    RUN_DELETED = "run.deleted"
    DEAD_LETTER = "dlforge.dead-letter"


def _unique_classes(v: list[str]) -> list[str]:
    if len(set(v)) != len(v):
        raise ValueError(f"classes must be unique, got {v}")
    return v


UniqueClasses = Annotated[list[ClassName], AfterValidator(_unique_classes)]
"""A list of class names without repeats (for request models that name the classes)."""

SampleMethod = Literal["random", "k_center", "herding"]
"""How a trial's share of the train split is chosen: stratified at random, or a class-stratified coreset."""


class Payload(BaseModel):
    """Base of every payload: immutable, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    TOPIC: ClassVar[Topic]
    SCHEMA_VERSION: ClassVar[int] = 1

    def partition_key(self, run_id: str) -> str:
        """The bus key of an event carrying this payload: the run id (one run's events stay in order)."""
        return run_id


# --------------------------------------------------------------------------------------------
# Shared value types carried along the pipeline
# --------------------------------------------------------------------------------------------


class Spec(BaseModel):
    """What the user asks of the final model (recall first, then accuracy, then speed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    positive_class: ClassName | None = Field(
        default=None, description="class whose recall is constrained, e.g. 'defect'"
    )
    min_recall: float = Field(default=0.0, ge=0.0, le=1.0)
    min_accuracy: float = Field(default=0.0, ge=0.0, le=1.0)
    min_fps: float = Field(default=0.0, ge=0.0, le=100_000.0,
                           description="frames per second the chosen variant must reach (at most 100,000, beyond "
                                       "any inspection line)")
    input_size: int = Field(default=256, ge=8, le=4096, description="image side the FPS is measured at")


# Upper bounds of the run options. They bound the compute one request can ask for; a real run needs
# far less (the demo: 4 trials of 3 epochs). TRAINER_MAX_EPOCHS and MAX_WORKERS are the trainer's
# own caps (TrainParams.epochs, RunOptions.no_of_workers): an option above them would make every
# trial fail in the trainer instead of being refused at the upload.
TRAINER_MAX_EPOCHS = 1000
MAX_TRAIN_EPOCHS = 500
MAX_HPO_TRIALS = 200
MAX_HPO_PARALLEL = 32
MAX_WORKERS = 64
MAX_MIN_PER_CLASS = 10_000
MAX_SEED = 2**31 - 1
MAX_CLASSES = 1000  # classes of one dataset (industrial inspection has a handful)
MAX_DOMAINS = 100_000  # domains of one dataset standardized (each has at least 20 items)
MAX_FINGERPRINT = 8192  # values of a data-set fingerprint (2 x the reference trunk's feature width)
MAX_PACKED_RESULTS = 262_144  # characters of a trial's packed per-item val results (about a million items)

TRAIN_PARAMS_LEGACY_VALUES: dict[str, object] = {"lr_schedule": "constant", "body_lr_scale": 1.0, "ema_decay": 0.0}
"""The parameters added to the trainer's ``TrainParams`` after its first release, in the order they were
added, each with the value that trains as the versions before it did (not always its default:
``body_lr_scale`` defaults to 0.1, and before it the backbone trained at the full rate). A stored training
state that does not name one of them was trained with this value, and the SDK leaves one out of a job only
at this value (so a trainer of an older version still takes the job). A parameter added later must be added
here (a test holds every field either among the first release's or here)."""


DomainAdaptation = Literal["none", "standardize"]


class PipelineOptions(BaseModel):
    """Knobs of one run that every stage may read (budgets, sizes); defaults suit the demo.

    Auto-labeling is selective: the labeler auto-labels only the items whose confidence clears a
    threshold chosen on people's labels so that the error of the auto-labels stays at most
    ``max_auto_label_error`` with 95 % confidence (or, with its ``expected`` guarantee, in expectation);
    the rest are left for people ("needs review") unless ``auto_label_all`` is set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label_budget: float = Field(default=0.3, gt=0.0, le=1.0, description="max fraction labeled by humans")
    max_auto_label_error: float = Field(
        default=0.02, gt=0.0, le=0.5,
        description="largest error rate of the auto-labels the user accepts (guaranteed with 95 % confidence, "
        "or in expectation with the labeler's DLFORGE_LABELER_GUARANTEE=expected)",
    )
    auto_label_all: bool = Field(
        default=False,
        description="at the end, auto-label every item people did not label, also those below the guaranteed "
        "threshold (off: they stay 'needs review')",
    )
    target_confidence: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="deprecated: an extra confidence floor on top of the guaranteed threshold (None: none)",
    )
    seed_fraction: float = Field(default=0.08, gt=0.0, le=1.0)
    batch_fraction: float = Field(default=0.05, gt=0.0, le=1.0)
    min_per_class: int = Field(
        default=200, ge=0, le=MAX_MIN_PER_CLASS,
        description=f"the augmenter generates samples until each class has this many (at most "
        f"{MAX_MIN_PER_CLASS:,}: every generated sample is an image to make, filter and store)",
    )
    max_imbalance: float = Field(
        default=3.0, ge=1.0, le=1000.0,
        description="largest ratio of the biggest to the smallest class the augmenter leaves (1-1,000)",
    )
    hpo_trials: int = Field(
        default=4, ge=1, le=MAX_HPO_TRIALS,
        description=f"trials the tuner runs (at most {MAX_HPO_TRIALS}: each trial trains a model)",
    )
    hpo_parallel: int = Field(
        default=1, ge=1, le=MAX_HPO_PARALLEL,
        description=f"trials trained at the same time (at most {MAX_HPO_PARALLEL})",
    )
    train_epochs: int = Field(
        default=3, ge=1, le=MAX_TRAIN_EPOCHS,
        description=f"epochs of the final training and, unless the tuner says otherwise, of each trial (at most "
        f"{MAX_TRAIN_EPOCHS}, within the trainer's own cap of {TRAINER_MAX_EPOCHS})",
    )
    no_of_workers: int = Field(
        default=1, ge=1, le=MAX_WORKERS,
        description=f"data-parallel training processes (at most {MAX_WORKERS}, the trainer's own cap)",
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="seed of every random choice of the run")
    domain_adaptation: DomainAdaptation | None = Field(
        default=None,
        description="standardize: when the items come from several domains (the manifest's domain column), the "
        "labeler gives each domain's embeddings the whole set's per-feature moments, so labels of one domain "
        "carry to another; none: it does not; unset: the labeler's setting (DLFORGE_LABELER_DOMAINS)")


class ClassCount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label: ClassName
    count: int


# --------------------------------------------------------------------------------------------
# Payloads, one per topic
# --------------------------------------------------------------------------------------------


class DatasetUploaded(Payload):
    """A data set was ingested by the labeler: its items, classes and manifest, with the run's spec and options."""

    TOPIC = Topic.DATASET_UPLOADED
    SCHEMA_VERSION: ClassVar[int] = 4  # v2: options.max_auto_label_error, auto_label_all; v3: project;
    # v4: options.domain_adaptation

    dataset_id: str
    name: str
    item_count: int
    classes: list[ClassName] = Field(max_length=MAX_CLASSES)
    labeled_count: int
    rejected_count: int
    duplicate_count: int
    manifest_key: str = Field(description="object key of the ingestion manifest (JSON)")
    spec: Spec
    options: PipelineOptions = PipelineOptions()
    project: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", max_length=64,
                         description="the project the dataset and its run belong to")


class LabelsRequested(Payload):
    """The labeler asks people (or the simulated annotator) to label a batch of items."""

    TOPIC = Topic.LABELS_REQUESTED

    dataset_id: str
    batch_id: str
    round: int
    item_ids: list[str]
    reason: Literal["seed", "uncertain"]


class LabelsSubmitted(Payload):
    """Labels, or corrections, for items people were asked about (the waiting batch or an earlier one),
    from a person (through the labeler's API, which stored them first: ``sequence`` set) or the
    simulated annotator. Of two labels of one item the later accepted one wins."""

    TOPIC = Topic.LABELS_SUBMITTED
    SCHEMA_VERSION: ClassVar[int] = 2  # v2: sequence

    dataset_id: str
    batch_id: str
    labels: dict[str, ClassName] = Field(description="item_id -> class label")
    annotator: str
    sequence: int | None = Field(
        default=None, ge=1,
        description="the submission's position in the labeler's label log, stored before the API answered 202 "
        "(of two labels of one item the later sequence wins); None: published straight to the bus",
    )


class LabelingRound(BaseModel):
    """One labeling round's figures: the human labels so far and the labeler classifier's accuracy then."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    human_labels: int = Field(ge=0)
    heldout_accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="out-of-fold accuracy on the representative items people labeled (random test/val, seed)")
    cv_accuracy: float | None = Field(default=None, ge=0.0, le=1.0,
                                      description="cross-validated accuracy on every labeled item")


class SubsampleFigure(BaseModel):
    """A learning-curve point from the last round's labels: the labeler's linear probe trained on a share of
    them (held out by folds), at the human labels that share stands for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    human_labels: int = Field(ge=1)
    heldout_accuracy: float = Field(
        ge=0.0, le=1.0, description="accuracy on the representative items people labeled, each held out of the "
        "fold that predicted it")


class DatasetLabeled(Payload):
    """Labeling ended: the labeled manifest, the count per class, and how many labels are human, automatic or left
    for review; the figures of each round (for the learning curve) and the auto-label guarantee."""

    TOPIC = Topic.DATASET_LABELED
    # v2: options.max_auto_label_error, auto_label_all; needs_review. v3: rounds_figures, auto_label_coverage,
    # auto_label_error_bound (the report is built from the events alone). v4: options.domain_adaptation,
    # domains_standardized. v5: auto_label_guarantee, expected_error_estimate. v6: subsample_figures
    SCHEMA_VERSION: ClassVar[int] = 6

    dataset_id: str
    labels_key: str = Field(description="object key of the labeled manifest (JSON)")
    classes: list[ClassName] = Field(max_length=MAX_CLASSES)
    counts: list[ClassCount]
    human_labels: int
    auto_labels: int
    needs_review: int = Field(default=0, ge=0, description="items left without a label for people to review")
    rounds: int
    spec: Spec
    options: PipelineOptions = PipelineOptions()
    rounds_figures: list[LabelingRound] = Field(default=[], max_length=10_000,
                                                description="per answered round, its labels and accuracy")
    auto_label_coverage: float | None = Field(
        default=None, ge=0.0, le=1.0, description="fraction of the items people did not label that the guarantee "
        "let the labeler auto-label (None: no guaranteed threshold)")
    auto_label_error_bound: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="exact 95 % upper bound on the error rate of the auto-labels, from the held-out people's "
        "labels at or above the threshold (every one with options.auto_label_all); with the 'expected' "
        "guarantee and no auto_label_all the threshold was chosen on those labels, so it is evidence, not a "
        "bound (None: none)")
    auto_label_guarantee: Literal["bound", "expected"] | None = Field(
        default=None, description="the rule the auto-labeling threshold is chosen by: 'bound', the auto-label "
        "error at most options.max_auto_label_error with 95 % confidence; 'expected', its expectation at most "
        "that (conformal selection); None: not known, or no threshold was chosen")
    expected_error_estimate: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="'expected' guarantee: the conformal estimate of the error share of the items at or above "
        "the threshold, at most the target (None: none)")
    domains_standardized: dict[str, int] = Field(
        default={}, max_length=MAX_DOMAINS,
        description="the domains whose embeddings were standardized (options.domain_adaptation), with their items "
        "({}: none)")
    subsample_figures: list[SubsampleFigure] = Field(
        default=[], max_length=100,
        description="the linear probe's held-out accuracy trained on nested shares of the last round's labels "
        "(the learning curve's points when the rounds are too few; []: none, e.g. another classifier)")


class AugmentationCount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label: ClassName
    real: int
    generated: int
    kept: int


class ClassGain(BaseModel):
    """One class's recall and precision on the real validation images, without and with the kept samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: ClassName
    val_items: int = Field(ge=0, description="validation images of this class labeled by people")
    recall_real: float | None = Field(ge=0.0, le=1.0, description="None: no validation image of the class")
    recall_with_kept: float | None = Field(ge=0.0, le=1.0)
    precision_real: float | None = Field(ge=0.0, le=1.0, description="None: the class was never predicted")
    precision_with_kept: float | None = Field(ge=0.0, le=1.0)


class AugmentationGain(BaseModel):
    """What the kept samples change, measured on held-out real images: the filter's classifier trained on the
    real train images alone against the same classifier trained on them plus the kept samples (the seed's
    second classifier), both scored on the validation images people labeled, which neither saw. The classifier
    weighs classes equally (balanced), so the samples change what it learns of a class, not the class's
    weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classifier: str = Field(max_length=200, description="the model both sides are (the X2 filter's)")
    val_items: int = Field(ge=1, description="validation images labeled by people it was measured on")
    kept_samples: int = Field(ge=1, description="kept generated samples the second classifier added")
    accuracy_real: float = Field(ge=0.0, le=1.0)
    accuracy_with_kept: float = Field(ge=0.0, le=1.0)
    changed: int = Field(ge=0, description="validation images whose predicted class the samples changed")
    per_class: list[ClassGain] = Field(max_length=MAX_CLASSES)


class DatasetAugmented(Payload):
    """The augmenter's training manifest (real items plus the kept generated samples) and its counts per class."""

    TOPIC = Topic.DATASET_AUGMENTED
    # v2: options.max_auto_label_error, auto_label_all; v3: gain, samples_grid_key, options.domain_adaptation
    SCHEMA_VERSION: ClassVar[int] = 3

    dataset_id: str
    manifest_key: str = Field(description="object key of the training manifest: real + kept generated")
    classes: list[ClassName] = Field(max_length=MAX_CLASSES)
    augmentation: list[AugmentationCount]
    spec: Spec
    options: PipelineOptions = PipelineOptions()
    gain: AugmentationGain | None = Field(
        default=None, description="the kept samples' effect on held-out real images (None: nothing kept, or no "
        "validation images to measure it on)")
    samples_grid_key: str | None = Field(
        default=None, max_length=1024,
        description="object key of a PNG of generated samples per class, kept and rejected (None: none generated)")


class CandidateScore(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str
    arch: str
    source_dataset: str
    weights_key: str = Field(description="object key of the candidate's checkpoint")
    scores: dict[str, float] = Field(description="sub-scores, raw and normalized")
    total: float


class ModelProposed(Payload):
    """The proposer's ranking of the repository's candidate models for the data set, and the one it chose."""

    TOPIC = Topic.MODEL_PROPOSED
    # v2: options.max_auto_label_error, auto_label_all; v3: fingerprint; v4: options.domain_adaptation
    SCHEMA_VERSION: ClassVar[int] = 4

    dataset_id: str
    manifest_key: str
    classes: list[ClassName] = Field(max_length=MAX_CLASSES)
    ranking: list[CandidateScore]
    chosen_model_id: str
    weights: dict[str, float]
    spec: Spec
    options: PipelineOptions = PipelineOptions()
    fingerprint: list[float] | None = Field(
        default=None, min_length=2, max_length=MAX_FINGERPRINT,
        description="the data set's fingerprint (dlforge.hpo.warmstart.fingerprint of the reference trunk's "
        "features of the proposer's target sample, `fingerprint_model`): the tuner warm-starts from past studies "
        "on data near it and is remembered with it; None when the repository has no reference trunk")
    fingerprint_model: str | None = Field(default=None, max_length=200,
                                          description="the repository model whose features the fingerprint is of")

    @field_validator("fingerprint")
    @classmethod
    def _finite(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError("fingerprint: every value must be finite")
        return v


class HpoTrial(Payload):
    """The tuner asks a trainer to train one trial of its study with these hyperparameters.

    Keyed per trial (``<run_id>:<trial_number>``): a run's parallel trials go to different partitions
    and so to different trainer replicas.
    """

    TOPIC = Topic.HPO_TRIAL
    # v2: no storage_url (the trainer reports through hpo.trial.reported); v3: sample_method; v4: sample_seed
    SCHEMA_VERSION: ClassVar[int] = 4

    study_name: str
    trial_number: int = Field(ge=0)
    params: dict[str, Any]
    dataset_id: str
    model_id: str
    arch: str
    weights_key: str
    manifest_key: str
    classes: list[ClassName] = Field(max_length=MAX_CLASSES)
    epochs: int
    sample_fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="the share of each class of the "
                                   "train split the trial trains on (its fidelity on a ladder)")
    sample_method: SampleMethod = Field(
        default="random", description="how that share is chosen: a stratified random sample, or the class-stratified "
        "coreset of the cached activations (dlforge.hpo.coreset), nested across fractions")
    sample_seed: int | None = Field(
        default=None, ge=0, lt=2**32, description="the seed of a random sample (and of the val rows carved out "
        "when the data has no val split): the run's seed, so that the same data and seed train every trial on "
        "the same rows in every upload; None (events before v4): derived from the study name")

    def partition_key(self, run_id: str) -> str:
        return f"{run_id}:{self.trial_number}"


class HpoTrialReported(Payload):
    """A trial's intermediate objective value after one epoch (step), from the trainer to the tuner.

    Keyed per trial, so one trial's reports arrive in order; the tuner records the value in its study
    and answers with :class:`HpoTrialDecision` for the same step.
    """

    TOPIC = Topic.HPO_TRIAL_REPORTED

    study_name: str
    trial_number: int = Field(ge=0)
    step: int = Field(ge=1, description="the epoch just finished (1-based)")
    value: float = Field(allow_inf_nan=False, description="the objective (val accuracy) after that epoch")

    def partition_key(self, run_id: str) -> str:
        return f"{run_id}:{self.trial_number}"


class HpoTrialDecision(Payload):
    """The tuner's answer to a report: go on, or stop the trial (its pruner said so, or it is finished)."""

    TOPIC = Topic.HPO_TRIAL_DECISION

    study_name: str
    trial_number: int = Field(ge=0)
    step: int = Field(ge=1, description="the reported step this decision answers")
    action: Literal["continue", "prune"]
    reason: str = ""

    def partition_key(self, run_id: str) -> str:
        return f"{run_id}:{self.trial_number}"


class HpoTrialCompleted(Payload):
    """A trainer's outcome of one trial: complete, pruned or failed, with its per-epoch values.

    Keyed by run (not by trial): one study's completions are told and its next trials asked in order.
    """

    TOPIC = Topic.HPO_TRIAL_COMPLETED
    SCHEMA_VERSION: ClassVar[int] = 3  # v2: val_loss; v3: val_correct

    study_name: str
    trial_number: int
    state: Literal["complete", "pruned", "failed"]
    value: float | None
    intermediate: list[float]
    seconds: float
    error: str | None = None
    val_loss: float | None = Field(default=None, ge=0.0, allow_inf_nan=False,
                                   description="the validation loss at the epoch ``value`` is from: between trials "
                                   "of equal value, the lower loss ranks higher (None: not measured)")
    val_correct: str | None = Field(
        default=None, max_length=MAX_PACKED_RESULTS, pattern=PACKED_PATTERN,
        description="which validation items the trial's model got right, in the val split's order, as "
        "'<count>:<hex>' (dlforge.common.packed): the tuner's paired comparison with its baseline "
        "trial (None: not measured)")

    @field_validator("val_correct")
    @classmethod
    def _packed_length(cls, v: str | None) -> str | None:
        if v is not None:
            unpack_bools(v)  # the tuner unpacks it with the same code: what passes here unpacks there
        return v


class TrialRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    seconds: float | None = None
    fidelity: float | None = Field(default=None, ge=0.0, le=1.0,
                                   description="the share of the train split it trained on (None: not recorded)")
    promoted_from: int | None = Field(default=None, ge=0,
                                      description="the trial whose parameters it trained again on a larger share")
    val_loss: float | None = Field(default=None, ge=0.0, allow_inf_nan=False,
                                   description="the validation loss reported with the value: the tie-break between "
                                   "equal values (None: not reported)")


class HpoCompleted(Payload):
    """The tuner's study ended: the best hyperparameters and every trial."""

    TOPIC = Topic.HPO_COMPLETED
    # v2: options.max_auto_label_error, auto_label_all; v3: options.domain_adaptation, the trials' fidelity and
    # promoted_from; v4: the trials' val_loss; v5: choice
    SCHEMA_VERSION: ClassVar[int] = 5

    study_name: str
    dataset_id: str
    model_id: str
    arch: str
    weights_key: str
    manifest_key: str
    classes: list[ClassName] = Field(max_length=MAX_CLASSES)
    best_params: dict[str, Any]
    best_value: float
    trials: list[TrialRecord]
    spec: Spec
    options: PipelineOptions = PipelineOptions()
    choice: str | None = Field(default=None, max_length=1000,
                               description="why the best parameters are the ones chosen, when not simply the "
                               "highest value (the baseline kept against a lead the val items do not resolve)")


class ModelTrained(Payload):
    """The final model was trained: its checkpoint, hyperparameters and metrics."""

    TOPIC = Topic.MODEL_TRAINED
    # v2: options.max_auto_label_error, auto_label_all; v3: options.domain_adaptation
    SCHEMA_VERSION: ClassVar[int] = 3

    dataset_id: str
    model_id: str
    arch: str
    checkpoint_key: str
    manifest_key: str
    classes: list[ClassName] = Field(max_length=MAX_CLASSES)
    params: dict[str, Any]
    metrics: dict[str, float]
    no_of_workers: int
    spec: Spec
    options: PipelineOptions = PipelineOptions()


class ModelOptimized(Payload):
    """The optimizer's variants of the trained model, the one chosen, and whether the spec is met."""

    TOPIC = Topic.MODEL_OPTIMIZED

    dataset_id: str
    model_id: str
    chosen_variant: str
    artifacts: dict[str, str] = Field(description="variant name -> object key of the model file")
    report_key: str
    report: dict[str, Any]
    spec_met: bool
    spec: Spec


class RunFailed(Payload):
    """A stage gave up on the run; the reason says why."""

    TOPIC = Topic.RUN_FAILED

    stage: str
    reason: str
    event_id: str | None = Field(default=None, description="the event whose handling failed")


class RunCancelled(Payload):
    """A person cancelled the run: every service skips its further events and stops its long work."""

    TOPIC = Topic.RUN_CANCELLED

    reason: str = Field(max_length=2000)


class RunDeleted(Payload):
    """A finished run was deleted: every service removes its documents and objects of the run."""

    TOPIC = Topic.RUN_DELETED

    dataset_id: str | None = Field(default=None, description="the run's data set, if it had one")


class DeadLetter(Payload):
    """A message that could not be handled: the reason, the original bytes and headers, the attempts."""

    TOPIC = Topic.DEAD_LETTER

    consumer: str
    source_topic: str
    reason: str
    original: str = Field(description="the original message bytes, base64")
    original_headers: dict[str, str] = {}
    attempts: int


PAYLOAD_TYPES: dict[Topic, type[Payload]] = {
    cls.TOPIC: cls
    for cls in (
        DatasetUploaded,
        LabelsRequested,
        LabelsSubmitted,
        DatasetLabeled,
        DatasetAugmented,
        ModelProposed,
        HpoTrial,
        HpoTrialReported,
        HpoTrialDecision,
        HpoTrialCompleted,
        HpoCompleted,
        ModelTrained,
        ModelOptimized,
        RunFailed,
        RunCancelled,
        RunDeleted,
        DeadLetter,
    )
}


def _now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """The envelope of every message."""

    model_config = ConfigDict(frozen=True)

    event_id: str = Field(default_factory=lambda: uuid4().hex)
    event_type: Topic
    schema_version: int
    occurred_at: AwareDatetime = Field(default_factory=_now)
    run_id: str
    causation_id: str | None = None
    payload: SerializeAsAny[Payload]

    @classmethod
    def new(cls, payload: Payload, *, run_id: str, causation_id: str | None = None) -> Event:
        return cls(
            event_type=payload.TOPIC,
            schema_version=payload.SCHEMA_VERSION,
            run_id=run_id,
            causation_id=causation_id,
            payload=payload,
        )

    def follow(self, payload: Payload) -> Event:
        """A new event of the same run, caused by this one."""
        return Event.new(payload, run_id=self.run_id, causation_id=self.event_id)

    @property
    def topic(self) -> Topic:
        return self.event_type

    @property
    def key(self) -> str:
        """The bus partition key (see :meth:`Payload.partition_key`)."""
        return self.payload.partition_key(self.run_id)


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_UPCASTERS: dict[tuple[Topic, int], Upcaster] = {}


def register_upcaster(topic: Topic, from_version: int, upcaster: Upcaster) -> None:
    """Register the function that turns payload JSON of ``from_version`` into ``from_version + 1``."""
    _UPCASTERS[(topic, from_version)] = upcaster


def unregister_upcaster(topic: Topic, from_version: int) -> None:
    _UPCASTERS.pop((topic, from_version), None)


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode()


def decode(raw: bytes, *, payload_types: dict[Topic, type[Payload]] | None = None) -> Event:
    """Parse and upcast one message; anything that cannot become an Event raises PoisonMessage."""
    types = PAYLOAD_TYPES if payload_types is None else payload_types
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PoisonMessage(f"undecodable message: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise PoisonMessage("undecodable message: the JSON is not an object")
    try:
        topic = Topic(str(doc.get("event_type")))
    except ValueError as exc:
        raise PoisonMessage(f"unknown event_type {doc.get('event_type')!r}") from exc
    payload_cls = types.get(topic)
    if payload_cls is None:
        raise PoisonMessage(f"no payload type for {topic.value}")
    version = doc.get("schema_version")
    if not isinstance(version, int):
        raise PoisonMessage("schema_version missing or not an integer")
    if version > payload_cls.SCHEMA_VERSION:
        raise PoisonMessage(
            f"{topic.value} schema_version {version} is newer than this service knows "
            f"({payload_cls.SCHEMA_VERSION})"
        )
    payload = doc.get("payload")
    if not isinstance(payload, dict):
        raise PoisonMessage("payload missing or not an object")
    while version < payload_cls.SCHEMA_VERSION:
        upcaster = _UPCASTERS.get((topic, version))
        if upcaster is None:
            raise PoisonMessage(f"no upcaster for {topic.value} from schema_version {version}")
        payload = upcaster(payload)
        version += 1
    try:
        return Event.model_validate({
            "event_id": doc.get("event_id"),
            "event_type": topic,
            "schema_version": version,
            "occurred_at": doc.get("occurred_at"),
            "run_id": doc.get("run_id"),
            "causation_id": doc.get("causation_id"),
            "payload": payload_cls.model_validate(payload),
        })
    except ValidationError as exc:
        raise PoisonMessage(f"invalid {topic.value} event: {exc}") from exc


def _options_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 options predate selective auto-labeling: the labeler of then auto-labeled every item."""
    options = payload.get("options")
    if not isinstance(options, dict):
        return payload
    return {**payload, "options": {**options, "auto_label_all": True}}


def _labeled_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """dataset.labeled v1: options as above; every item was labeled, so none needed review."""
    return {**_options_v1_to_v2(payload), "needs_review": 0}


def _submitted_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """labels.submitted v1 had no label log: every submission went straight to the bus."""
    return {**payload, "sequence": None}


for _topic in (Topic.DATASET_UPLOADED, Topic.DATASET_AUGMENTED, Topic.MODEL_PROPOSED, Topic.HPO_COMPLETED,
               Topic.MODEL_TRAINED):
    register_upcaster(_topic, 1, _options_v1_to_v2)
register_upcaster(Topic.DATASET_LABELED, 1, _labeled_v1_to_v2)


def _uploaded_v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """dataset.uploaded v2 predates projects: every dataset was in the one project there was."""
    return {**payload, "project": "default"}


register_upcaster(Topic.DATASET_UPLOADED, 2, _uploaded_v2_to_v3)
register_upcaster(Topic.LABELS_SUBMITTED, 1, _submitted_v1_to_v2)


def _labeled_v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """dataset.labeled v2 carried no round figures nor the guarantee: they were only in the labeler's records."""
    return {**payload, "rounds_figures": [], "auto_label_coverage": None, "auto_label_error_bound": None}


register_upcaster(Topic.DATASET_LABELED, 2, _labeled_v2_to_v3)


def _trial_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """hpo.trial v1 named the tuner's Optuna storage; the trainer no longer opens it."""
    return {k: v for k, v in payload.items() if k != "storage_url"}


register_upcaster(Topic.HPO_TRIAL, 1, _trial_v1_to_v2)


def _proposed_v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """model.proposed v2 carried no data-set fingerprint (a warm start needed it from the run's tuning override)."""
    return {**payload, "fingerprint": None, "fingerprint_model": None}


register_upcaster(Topic.MODEL_PROPOSED, 2, _proposed_v2_to_v3)


def _options_with_domain_adaptation(payload: dict[str, Any]) -> dict[str, Any]:
    """Options from before ``domain_adaptation``: the labeler's own setting decided (None)."""
    options = payload.get("options")
    if not isinstance(options, dict):
        return payload
    return {**payload, "options": {**options, "domain_adaptation": None}}


def _augmented_v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """dataset.augmented v2 did not measure the kept samples' gain nor show them: neither is known."""
    return {**_options_with_domain_adaptation(payload), "gain": None, "samples_grid_key": None}


def _labeled_v3_to_v4(payload: dict[str, Any]) -> dict[str, Any]:
    """dataset.labeled v3 did not say which domains were standardized (its record did)."""
    return {**_options_with_domain_adaptation(payload), "domains_standardized": {}}


register_upcaster(Topic.DATASET_LABELED, 3, _labeled_v3_to_v4)


def _labeled_v4_to_v5(payload: dict[str, Any]) -> dict[str, Any]:
    """dataset.labeled v4: the labeler's rule was the 95 % bound (the expected-error rule came with v5, but for
    one unreleased commit where v4 events could come from it)."""
    return {**payload, "auto_label_guarantee": "bound", "expected_error_estimate": None}


register_upcaster(Topic.DATASET_LABELED, 4, _labeled_v4_to_v5)


def _labeled_v5_to_v6(payload: dict[str, Any]) -> dict[str, Any]:
    """dataset.labeled v5 carried no subsample figures (the learning curve had only the rounds)."""
    return {**payload, "subsample_figures": []}


register_upcaster(Topic.DATASET_LABELED, 5, _labeled_v5_to_v6)
register_upcaster(Topic.DATASET_UPLOADED, 3, _options_with_domain_adaptation)
register_upcaster(Topic.MODEL_PROPOSED, 3, _options_with_domain_adaptation)
register_upcaster(Topic.HPO_COMPLETED, 2, _options_with_domain_adaptation)
register_upcaster(Topic.MODEL_TRAINED, 2, _options_with_domain_adaptation)


register_upcaster(Topic.DATASET_AUGMENTED, 2, _augmented_v2_to_v3)


def _trial_v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """hpo.trial v2 had no sample_method: every trial trained on a stratified random sample."""
    return {**payload, "sample_method": "random"}


register_upcaster(Topic.HPO_TRIAL, 2, _trial_v2_to_v3)


def _trial_v3_to_v4(payload: dict[str, Any]) -> dict[str, Any]:
    """hpo.trial v3 had no sample_seed: the trainer derived it from the study name (which names the run)."""
    return {**payload, "sample_seed": None}


register_upcaster(Topic.HPO_TRIAL, 3, _trial_v3_to_v4)


def _trial_completed_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """hpo.trial.completed v1 carried no validation loss: equal values ranked by trial number alone."""
    return {**payload, "val_loss": None}


register_upcaster(Topic.HPO_TRIAL_COMPLETED, 1, _trial_completed_v1_to_v2)


def _completed_v3_to_v4(payload: dict[str, Any]) -> dict[str, Any]:
    """hpo.completed v3's trials carried no validation loss."""
    trials = payload.get("trials")
    if not isinstance(trials, list):
        return payload
    return {**payload, "trials": [{**t, "val_loss": None} if isinstance(t, dict) else t for t in trials]}


register_upcaster(Topic.HPO_COMPLETED, 3, _completed_v3_to_v4)


def _trial_completed_v2_to_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """hpo.trial.completed v2 carried no per-item results: the tuner cannot compare it item by item."""
    return {**payload, "val_correct": None}


register_upcaster(Topic.HPO_TRIAL_COMPLETED, 2, _trial_completed_v2_to_v3)


def _completed_v4_to_v5(payload: dict[str, Any]) -> dict[str, Any]:
    """hpo.completed v4 had no choice: its best parameters were the highest value's."""
    return {**payload, "choice": None}


register_upcaster(Topic.HPO_COMPLETED, 4, _completed_v4_to_v5)
