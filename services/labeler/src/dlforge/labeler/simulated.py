"""The SIMULATED annotator: a stand-in for people, answering ``labels.requested`` from known labels.

It is a separate service, ``Service("annotator-sim")``, used by the demo, the benchmarks and
``dlforge run PATH --answers CSV``. Whoever sets it up registers the known answers for a dataset
(:func:`register_answers`: a JSON object ``annotator-sim/<dataset_id>.json`` mapping item name, or
item id, to label; :func:`load_answers_csv` reads such a mapping from a CSV). For each batch it
emits ``labels.submitted`` with ``annotator="simulated"``. A dataset without registered answers
is left to people (after waiting ``DLFORGE_ANNOTATOR_SIM_WAIT_SECONDS``, default 10, for them to appear); a
batch naming an item the answers do not cover is a poison message (the run fails, loudly).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import Field

from dlforge.common.app import ServicePart
from dlforge.common.errors import InvalidInput, NotFound, PoisonMessage
from dlforge.common.events import Event, LabelsRequested, LabelsSubmitted, RunDeleted, Topic
from dlforge.common.objects import ObjectStore
from dlforge.common.runtime import Backends, HandlerContext, HandlerResult, Service
from dlforge.common.settings import CommonSettings
from dlforge.labeler.ingest import manifest_key, parse_csv
from dlforge.vision.manifest import load_manifest

log = logging.getLogger(__name__)

ANNOTATOR = "simulated"


class AnnotatorSimSettings(CommonSettings):
    """The simulated annotator's settings (``DLFORGE_ANNOTATOR_SIM_…``)."""

    annotator_sim_wait_seconds: float = Field(
        default=10.0, ge=0.0, le=3600.0, description="how long a batch waits for its dataset's answers to be "
        "registered before it is left to people")


@dataclass(frozen=True)
class AnnotatorSim:
    """The simulated annotator's dependencies: how long it waits for answers."""

    wait_seconds: float = 10.0


async def build_deps(settings: AnnotatorSimSettings, backends: Backends) -> AnnotatorSim:
    return AnnotatorSim(wait_seconds=settings.annotator_sim_wait_seconds)


service = Service[AnnotatorSim]("annotator-sim")


def answers_key(dataset_id: str) -> str:
    return f"annotator-sim/{dataset_id}.json"


def register_answers(objects: ObjectStore, dataset_id: str, answers: Mapping[str, str]) -> str:
    """Store the simulated annotator's known labels for ``dataset_id`` (name or item id -> label)."""
    clean = {str(k): str(v) for k, v in answers.items() if v is not None and str(v).strip()}
    if not clean:
        raise InvalidInput("no answers to register")
    key = answers_key(dataset_id)
    objects.put_json(key, clean)
    return key


def load_answers_csv(path: str | Path) -> dict[str, str]:
    """A CSV of answers (a file column and a label column, header optional) as name -> label."""
    p = Path(path)
    data = p.read_bytes()
    # every file named is accepted: the CSV is checked against the dataset when batches come
    names = _names_in(data)
    parsed = parse_csv(data, csv_name=p.name, files=names)
    answers = {k: v for k, v in parsed.labels.items() if v is not None}
    if not answers:
        raise InvalidInput(f"{p.name} has no labels (column {parsed.label_column or 'missing'})")
    return answers


@dataclass(frozen=True)
class MatchedAnswers:
    """A CSV of answers matched against the images of a folder (see :func:`match_answers`)."""

    answers: dict[str, str]
    """image path relative to the folder, and each of its shorter forms that names it alone -> label"""
    matched: int
    """images of the folder that have an answer"""
    unmatched_rows: list[str]
    """CSV paths that name no image of the folder, or several"""


def _match_one(ref: str, files: set[str], by_name: dict[str, list[str]],
               by_suffix: dict[str, list[str]]) -> str | None:
    if ref in files:
        return ref
    longer = by_suffix.get(ref, [])  # ref without a leading folder the folder has: 'img.png' for 'good/img.png'
    if len(longer) == 1:
        return longer[0]
    parts = ref.split("/")
    for i in range(1, len(parts)):  # ref with a leading folder the folder lacks: 'defect/img.png' for 'img.png'
        if (shorter := "/".join(parts[i:])) in files:
            return shorter
    same_name = by_name.get(parts[-1], [])
    return same_name[0] if len(same_name) == 1 else None


def match_answers(answers: Mapping[str, str], files: Sequence[str]) -> MatchedAnswers:
    """Match the paths of an answers CSV to ``files`` (the folder's images, relative POSIX paths).

    A CSV path may be relative to the folder, carry a class-folder prefix the folder does not have
    (``defect/img.png`` for ``img.png``), lack one it has (``img.png`` for ``good/img.png``), or be a
    bare file name that is unique in the folder. Two rows giving one image different labels are refused.
    """
    present = set(files)
    by_name: dict[str, list[str]] = {}
    by_suffix: dict[str, list[str]] = {}
    for f in files:
        parts = f.split("/")
        by_name.setdefault(parts[-1], []).append(f)
        for i in range(1, len(parts)):
            by_suffix.setdefault("/".join(parts[i:]), []).append(f)
    labels: dict[str, str] = {}
    unmatched: list[str] = []
    for raw, label in answers.items():
        ref = raw.strip().replace("\\", "/").removeprefix("./")
        target = _match_one(ref, present, by_name, by_suffix)
        if target is None:
            unmatched.append(raw)
            continue
        if labels.get(target, label) != label:
            raise InvalidInput(f"the answers give {target!r} two labels: {labels[target]!r} and {label!r} "
                               f"(row {raw!r})")
        labels[target] = label
    keyed: dict[str, str] = {}
    for path, label in labels.items():
        keyed[path] = label
        parts = path.split("/")
        for i in range(1, len(parts)):  # the labeler names items without a wrapper folder: the shorter forms too
            suffix = "/".join(parts[i:])
            if suffix not in present and len(by_suffix.get(suffix, [])) == 1:
                keyed.setdefault(suffix, label)
    return MatchedAnswers(answers=keyed, matched=len(labels), unmatched_rows=unmatched)


def _names_in(data: bytes) -> list[str]:
    """Every cell that looks like a file name (the CSV parser matches references against these)."""
    from dlforge.labeler.ingest import IMAGE_EXTS, _decode_text, _split_rows

    cells = {c.strip().replace("\\", "/") for row in _split_rows(_decode_text(data)) for c in row}
    return sorted(c.lstrip("./") if c.startswith("./") else c for c in cells if c.lower().endswith(IMAGE_EXTS))


@service.handles(Topic.LABELS_REQUESTED)
async def answer(event: Event, ctx: HandlerContext[AnnotatorSim]) -> HandlerResult:
    request = event.payload
    assert isinstance(request, LabelsRequested)
    key = answers_key(request.dataset_id)
    deadline = asyncio.get_running_loop().time() + ctx.deps.wait_seconds
    while True:
        try:
            answers: dict[str, str] = await asyncio.to_thread(ctx.objects.get_json, key)
            break
        except NotFound:
            if asyncio.get_running_loop().time() >= deadline:
                log.info("no simulated answers for dataset %s: batch %s is left to people", request.dataset_id,
                         request.batch_id)
                return None
            await asyncio.sleep(0.2)
    manifest = await asyncio.to_thread(load_manifest, ctx.objects, manifest_key(request.dataset_id))
    names = {i.item_id: i.name for i in manifest.items}
    labels: dict[str, str] = {}
    missing: list[str] = []
    for item_id in request.item_ids:
        name = names.get(item_id, "")
        label = answers.get(item_id) or answers.get(name) or answers.get(PurePosixPath(name).name)
        if label is None:
            missing.append(name or item_id)
        else:
            labels[item_id] = label
    if missing:
        raise PoisonMessage(f"the simulated annotator has no answer for {len(missing)} item(s) of "
                            f"{request.batch_id}: {', '.join(missing[:10])} (answers are looked up by item id, "
                            "by the item's path in the dataset, e.g. 'good/img1.png', or by its file name)")
    return event.follow(LabelsSubmitted(dataset_id=request.dataset_id, batch_id=request.batch_id, labels=labels,
                                        annotator=ANNOTATOR))


@service.deletes_runs
async def forget_answers(event: Event, ctx: HandlerContext[AnnotatorSim]) -> None:
    """A deleted run's data set: its registered answers go too."""
    payload = event.payload
    assert isinstance(payload, RunDeleted)
    if payload.dataset_id is not None:
        await asyncio.to_thread(ctx.objects.delete, answers_key(payload.dataset_id))


def part() -> ServicePart[AnnotatorSimSettings, AnnotatorSim]:
    """The simulated annotator as a part of an app (no REST endpoints)."""
    return ServicePart(service=service, settings=AnnotatorSimSettings, build=build_deps)
