"""The feature store: keys name everything that determines a value; shards round-trip on fs and S3."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlforge.common.backends import open_objects
from dlforge.common.errors import InvalidInput
from dlforge.common.objects import ObjectStore
from dlforge.vision.features import FeatureKey, FeatureKind, FeatureStore

C1 = hashlib.sha256(b"image one").hexdigest()
C2 = hashlib.sha256(b"image two").hexdigest()
BASE = FeatureKind("pooled", weights="w1", preprocess="pil-bilinear-RGB", size=224, stage="block14")


def test_key_is_the_namespace_digest_of_the_canonical_kind_and_the_content() -> None:
    # Written out by hand: the canonical form is sorted-key compact JSON with a version field.
    canonical = ('{"kind":"pooled","preprocess":"pil-bilinear-RGB","size":224,"stage":"block14",'
                 '"v":1,"weights":"w1"}')
    expected = "pooled-" + hashlib.sha256(canonical.encode()).hexdigest()[:32] + "/" + C1
    assert str(FeatureKey(BASE, C1)) == expected


@pytest.mark.parametrize("change", [
    {"weights": "w2"}, {"preprocess": "pil-bicubic-RGB"}, {"size": 256}, {"stage": "block15"},
    {"kind": "activation"},
])
def test_changing_any_determinant_changes_the_key(change: dict[str, object]) -> None:
    fields = {"kind": BASE.kind, "weights": BASE.weights, "preprocess": BASE.preprocess, "size": BASE.size,
              "stage": BASE.stage, **change}
    other = FeatureKind(**fields)  # type: ignore[arg-type]
    assert str(FeatureKey(other, C1)) != str(FeatureKey(BASE, C1))
    assert other.namespace != BASE.namespace


def test_same_inputs_same_key_and_content_changes_only_the_tail() -> None:
    again = FeatureKind("pooled", weights="w1", preprocess="pil-bilinear-RGB", size=224, stage="block14")
    assert FeatureKey(again, C1) == FeatureKey(BASE, C1)
    assert str(FeatureKey(again, C1)) == str(FeatureKey(BASE, C1))
    assert str(FeatureKey(BASE, C2)) == f"{BASE.namespace}/{C2}" != str(FeatureKey(BASE, C1))


def test_bad_keys_are_refused_with_a_message() -> None:
    with pytest.raises(InvalidInput, match="sha256"):
        FeatureKey(BASE, "not-a-digest")
    with pytest.raises(InvalidInput, match="feature kind"):
        FeatureKind("Pooled/x")
    with pytest.raises(InvalidInput, match="size"):
        FeatureKind("pooled", size=-1)


@pytest.fixture(params=[pytest.param("fs", id="fs"), pytest.param("s3", id="s3", marks=pytest.mark.s3)])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    url = f"file://{tmp_path}/objects" if request.param == "fs" else str(request.getfixturevalue("s3_url"))
    store = open_objects(url)
    yield store
    for info in list(store.list()):
        store.delete(info.key)


def _content(n: int) -> str:
    return hashlib.sha256(f"item {n}".encode()).hexdigest()


def test_round_trip_in_shards_and_a_fresh_reader_finds_everything(objects: ObjectStore) -> None:
    store = FeatureStore(objects, shard_bytes=3 * 40 * 4)  # three 40-float rows per shard
    rng = np.random.default_rng(0)
    values = {FeatureKey(BASE, _content(n)): rng.normal(size=40).astype(np.float32) for n in range(8)}
    odd = {FeatureKey(BASE.__class__("pixels"), _content(n)): rng.integers(0, 255, (5 + n, 7, 3), dtype=np.uint8)
           for n in range(3)}
    store.put_many(values)
    store.put_many(odd, compress=True)
    npz = [i.key for i in objects.list("features/") if i.key.endswith(".npz")]
    assert len(npz) == 3 + 1  # 8 rows in shards of 3, and one shard of pixels: not one object per item

    reader = FeatureStore(objects)  # another process: knows nothing but what is in the object store
    keys = [*values, FeatureKey(BASE, _content(99)), *odd]
    got = reader.get_many(keys)
    for key, value in [*values.items(), *odd.items()]:
        np.testing.assert_array_equal(got[keys.index(key)], value)
    assert got[len(values)] is None
    assert got[keys.index(next(iter(odd)))].shape == (5, 7, 3)


def test_get_or_compute_computes_only_the_missing_once_and_stores_extras(objects: ObjectStore) -> None:
    store = FeatureStore(objects)
    other = FeatureKind("pooled", weights="w1", preprocess="pil-bilinear-RGB", size=224, stage="head")
    calls: list[list[str]] = []

    def compute(missing: list[FeatureKey]) -> dict[FeatureKey, np.ndarray]:
        calls.append([k.content for k in missing])
        out = {k: np.full(2, int(k.content[:4], 16), dtype=np.float32) for k in missing}
        out.update({FeatureKey(other, k.content): np.zeros(3, dtype=np.float32) for k in missing})
        return out

    store.put_many({FeatureKey(BASE, _content(0)): np.array([7.0, 7.0], dtype=np.float32)})
    keys = [FeatureKey(BASE, _content(n)) for n in (0, 1, 2, 1)]
    first = store.get_or_compute(keys, compute)
    assert calls == [[_content(1), _content(2)]]  # the stored one is read, the duplicate computed once
    assert first[0].tolist() == [7.0, 7.0]
    assert first[1].tolist() == [float(int(_content(1)[:4], 16))] * 2
    np.testing.assert_array_equal(first[1], first[3])
    second = FeatureStore(objects).get_or_compute(keys, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(np.stack(first), np.stack(second))
    extras = FeatureStore(objects).get_many([FeatureKey(other, _content(n)) for n in (1, 2)])
    assert all(e is not None and e.shape == (3,) for e in extras)


def test_load_arrays_decodes_each_image_once_and_matches_direct_decoding(tmp_path: Path) -> None:
    from dlforge.vision.images import decode, to_array
    from dlforge.vision.manifest import Item, load_arrays
    from dlforge.vision.observe import CountingObserver, observing

    objects = open_objects(f"file://{tmp_path}/objects")
    rng = np.random.default_rng(1)
    items, raw = [], []
    for n, mode in enumerate(["L", "RGB", "P"]):
        img = Image.fromarray(rng.integers(0, 255, (40 + n, 50, 3), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
        objects.put_bytes(f"img/{n}.png", data)
        raw.append(data)
        items.append(Item(item_id=str(n), key=f"img/{n}.png", name=f"{n}.png", sha256=hashlib.sha256(data).hexdigest(),
                          width=50, height=40 + n))
    with observing(CountingObserver()) as counts:
        a = load_arrays(objects, items, size=32, channels=3)
        b = load_arrays(objects, items, size=20, channels=1)
    assert sorted(counts.decodes.values()) == [1, 1, 1]
    for n, data in enumerate(raw):
        img = decode(data)
        np.testing.assert_array_equal(a[n], to_array(img, size=32, channels=3))
        np.testing.assert_array_equal(b[n], to_array(img, size=20, channels=1))


def test_a_manifests_content_key_is_its_images_not_its_ids_or_labels() -> None:
    from dlforge.vision.manifest import Item, Manifest

    def manifest(dataset_id: str, digests: list[str], label: str | None = None) -> Manifest:
        items = [Item(item_id=d[:20], key=f"{dataset_id}/{d}", name=f"{n}.png", sha256=d, width=8, height=8,
                      label=label) for n, d in enumerate(digests)]
        return Manifest(dataset_id=dataset_id, name=dataset_id, classes=["a"], items=items)

    # pinned: the first 24 hex digits of sha256 over "<digest>\n" per item, in order. Changing the format
    # changes every run's splits and questions, so it must be a deliberate change of this constant.
    expected = "71374ae0577b7261355dd7b6"
    assert manifest("ds-1", [C1, C2]).content_key == expected
    assert manifest("ds-2", [C1, C2], label="a").content_key == expected
    assert manifest("ds-1", [C2, C1]).content_key != expected
    assert manifest("ds-1", [C1]).content_key != expected
