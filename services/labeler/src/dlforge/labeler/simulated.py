"""The SIMULATED annotator: a stand-in for people, answering ``labels.requested`` from known labels.

It is a separate service, ``Service("annotator-sim")``, used by the demo, the benchmarks and
``dlforge run PATH --answers CSV``. Whoever sets it up registers the known answers for a dataset
(:func:`register_answers`: a JSON object ``annotator-sim/<dataset_id>.json`` mapping item name, or
item id, to label; :func:`load_answers_csv` reads such a mapping from a CSV). For each batch it
emits ``labels.submitted`` with ``annotator="simulated"``. A dataset without registered answers
is left to people (after waiting ``DLFORGE_ANNOTATOR_SIM_WAIT_SECONDS`` for them to appear); a
batch naming an item the answers do not cover is a poison message (the run fails, loudly).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from dlforge.common.app import ServicePart
from dlforge.common.errors import InvalidInput, NotFound, PoisonMessage
from dlforge.common.events import Event, LabelsRequested, LabelsSubmitted, RunDeleted, Topic
from dlforge.common.objects import ObjectStore
from dlforge.common.runtime import HandlerContext, HandlerResult, Service
from dlforge.labeler.ingest import manifest_key, parse_csv
from dlforge.vision.manifest import load_manifest

log = logging.getLogger(__name__)

ANNOTATOR = "simulated"
service = Service("annotator-sim")


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


def _names_in(data: bytes) -> list[str]:
    """Every cell that looks like a file name (the CSV parser matches references against these)."""
    from dlforge.labeler.ingest import IMAGE_EXTS, _decode_text, _split_rows

    cells = {c.strip().replace("\\", "/") for row in _split_rows(_decode_text(data)) for c in row}
    return sorted(c.lstrip("./") if c.startswith("./") else c for c in cells if c.lower().endswith(IMAGE_EXTS))


def _wait_seconds() -> float:
    try:
        return float(os.environ.get("DLFORGE_ANNOTATOR_SIM_WAIT_SECONDS", "10"))
    except ValueError:
        return 10.0


@service.handles(Topic.LABELS_REQUESTED)
async def answer(event: Event, ctx: HandlerContext) -> HandlerResult:
    request = event.payload
    assert isinstance(request, LabelsRequested)
    key = answers_key(request.dataset_id)
    deadline = asyncio.get_running_loop().time() + _wait_seconds()
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
                            f"{request.batch_id}: {', '.join(missing[:10])}")
    return event.follow(LabelsSubmitted(dataset_id=request.dataset_id, batch_id=request.batch_id, labels=labels,
                                        annotator=ANNOTATOR))


@service.deletes_runs
async def forget_answers(event: Event, ctx: HandlerContext) -> None:
    """A deleted run's data set: its registered answers go too."""
    payload = event.payload
    assert isinstance(payload, RunDeleted)
    if payload.dataset_id is not None:
        await asyncio.to_thread(ctx.objects.delete, answers_key(payload.dataset_id))


def part() -> ServicePart:
    """The simulated annotator as a part of an app (no REST endpoints)."""
    return ServicePart(service=service)
