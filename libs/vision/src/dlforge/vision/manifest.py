"""The dataset manifest: the contract between stages about which images exist and their labels.

A manifest is a JSON object in the object store. Ingestion writes one with ``label`` set where
the user gave it; the labeler writes the labeled manifest (every item with a source, confidence and split;
labeled unless it needs review); the augmenter writes the training manifest (adds generated items).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.objects import ObjectStore
from dlforge.vision.images import decode, to_array

# "needs_review": the labeler could not auto-label the item within the run's error guarantee; it has no
# label and waits for people
LabelSource = Literal["given", "human", "auto", "generated", "needs_review"]
Split = Literal["train", "val", "test"]
# Sources whose label is a person's word: given with the upload (None: an older manifest without a
# source) or answered by an annotator. "auto" is the labeler's classifier, "generated" the augmenter's.
PEOPLE_SOURCES: tuple[LabelSource | None, ...] = ("given", "human", None)


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str
    key: str = Field(description="object key of the image bytes")
    name: str = Field(description="original file name / path inside the upload")
    sha256: str
    width: int
    height: int
    label: str | None = None
    label_source: LabelSource | None = None
    confidence: float | None = None
    split: Split | None = None
    domain: str | None = None
    parent_id: str | None = Field(default=None, description="for generated items: the real item it came from")

    @property
    def labeled_by_people(self) -> bool:
        """True when the item has a label and a person gave it (see :data:`PEOPLE_SOURCES`)."""
        return self.label is not None and self.label_source in PEOPLE_SOURCES


class Rejection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    reason: str


class Duplicate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    duplicate_of: str = Field(description="name of the first file with the same content")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str
    name: str
    classes: list[str]
    items: list[Item]
    rejected: list[Rejection] = []
    duplicates: list[Duplicate] = []

    def by_split(self, *splits: Split) -> list[Item]:
        return [i for i in self.items if i.split in splits]

    def labeled(self) -> list[Item]:
        return [i for i in self.items if i.label is not None]

    def label_indices(self, items: Sequence[Item]) -> np.ndarray:
        index = {c: n for n, c in enumerate(self.classes)}
        return np.array([index[i.label] for i in items if i.label is not None], dtype=np.int64)


def load_manifest(objects: ObjectStore, key: str) -> Manifest:
    return Manifest.model_validate_json(objects.get_bytes(key))


def save_manifest(objects: ObjectStore, key: str, manifest: Manifest) -> None:
    objects.put_bytes(key, manifest.model_dump_json().encode(), content_type="application/json")


def load_arrays(
    objects: ObjectStore, items: Iterable[Item], *, size: int, channels: int, threads: int = 4
) -> np.ndarray:
    """uint8 N x size x size x channels for ``items``, fetched and decoded in parallel."""

    def one(item: Item) -> np.ndarray:
        return to_array(decode(objects.get_bytes(item.key), name=item.name), size=size, channels=channels)

    items = list(items)
    if not items:
        return np.zeros((0, size, size, channels), dtype=np.uint8)
    with ThreadPoolExecutor(threads) as pool:
        return np.stack(list(pool.map(one, items)))
