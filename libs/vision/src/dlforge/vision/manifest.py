"""The dataset manifest: the contract between stages about which images exist and their labels.

A manifest is a JSON object in the object store. Ingestion writes one with ``label`` set where
the user gave it; the labeler writes the labeled manifest (every item with a source, confidence and split;
labeled unless it needs review); the augmenter writes the training manifest (adds generated items).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dlforge.common.objects import ObjectStore
from dlforge.vision.features import FeatureKey, FeatureKind, FeatureStore, feature_store
from dlforge.vision.images import canonical_pixels, decode, from_pixels

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

    @property
    def content_key(self) -> str:
        """A digest of the items' contents in their order: what a run's random choices (splits, seeds,
        subsamples) are keyed by, so the same images with the same seed get the same choices in every
        upload, whatever the dataset's id."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(item.sha256.encode())
            digest.update(b"\n")
        return digest.hexdigest()[:24]

    def rng(self, seed: int, purpose: str) -> np.random.Generator:
        """The random generator of one ``purpose`` of a run on these images (:func:`rng_for` of
        :attr:`content_key`)."""
        return rng_for(self.content_key, seed, purpose)

    def by_split(self, *splits: Split) -> list[Item]:
        return [i for i in self.items if i.split in splits]

    def labeled(self) -> list[Item]:
        return [i for i in self.items if i.label is not None]

    def label_indices(self, items: Sequence[Item]) -> np.ndarray:
        index = {c: n for n, c in enumerate(self.classes)}
        return np.array([index[i.label] for i in items if i.label is not None], dtype=np.int64)


def rng_for(data_key: str, seed: int, purpose: str) -> np.random.Generator:
    """A generator that depends only on the data (``Manifest.content_key``), the run's seed and what it is for
    (independent streams): the labeler's splits and questions and the augmenter's samples, one rule for both."""
    digest = hashlib.sha256(f"{data_key}:{seed}:{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def load_manifest(objects: ObjectStore, key: str) -> Manifest:
    return Manifest.model_validate_json(objects.get_bytes(key))


def save_manifest(objects: ObjectStore, key: str, manifest: Manifest) -> None:
    objects.put_bytes(key, manifest.model_dump_json().encode(), content_type="application/json")


PIXELS = FeatureKind("pixels", preprocess="pil-decode/L-or-RGB/v1")
"""Decoded images at their own size (see :func:`dlforge.vision.images.canonical_pixels`)."""

_CHUNK = 256  # items held decoded at once by load_arrays


def load_pixels(
    objects: ObjectStore, items: Sequence[Item], *, threads: int = 4, store: FeatureStore | None = None
) -> list[np.ndarray]:
    """Decoded pixels of ``items`` from the feature store; images not there yet are decoded once and stored."""
    store = store or feature_store(objects)

    def compute(missing: list[FeatureKey]) -> dict[FeatureKey, np.ndarray]:
        by_content = {i.sha256: i for i in items}

        def one(key: FeatureKey) -> np.ndarray:
            item = by_content[key.content]
            return canonical_pixels(decode(objects.get_bytes(item.key), name=item.name))

        with ThreadPoolExecutor(threads) as pool:
            return dict(zip(missing, pool.map(one, missing), strict=True))

    return store.get_or_compute([FeatureKey(PIXELS, i.sha256) for i in items], compute, compress=True)


def load_arrays(
    objects: ObjectStore, items: Iterable[Item], *, size: int, channels: int, threads: int = 4
) -> np.ndarray:
    """uint8 N x size x size x channels for ``items``, from the stored decoded pixels (decoded once)."""
    items = list(items)
    out = np.zeros((len(items), size, size, channels), dtype=np.uint8)
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(items), _CHUNK):
            pixels = load_pixels(objects, items[start:start + _CHUNK], threads=threads)
            resized = pool.map(lambda p: from_pixels(p, size=size, channels=channels), pixels)
            for n, arr in enumerate(resized):
                out[start + n] = arr
    return out
