"""The labeler's multi-stage embedding through the vision core equals a direct forward of the raw network."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dlforge.common.backends import open_objects
from dlforge.vision.manifest import Item

pytest.importorskip("onnxruntime")


def _reference(images: np.ndarray) -> np.ndarray:
    """The raw EfficientNet-Lite0: pooled ends of the 40/80/112/192/320 stages and the head, each L2-normalized,
    concatenated, divided by sqrt(6) (written against the network's own modules, not dlforge.vision.staged)."""
    from dlforge.vision.networks import efficientnet_lite0_imagenet

    net = efficientnet_lite0_imagenet().eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    pooled = []
    with torch.inference_mode():
        h = net._swish(net._bn0(net._conv_stem(x)))
        for idx, block in enumerate(net._blocks):
            h = block(h)
            if idx in (4, 7, 10, 14, 15):
                pooled.append(h.mean((2, 3)))
        pooled.append(net._swish(net._bn1(net._conv_head(h))).mean((2, 3)))
    parts = [torch.nn.functional.normalize(p, dim=1) for p in pooled]
    return (torch.cat(parts, 1) / np.sqrt(6)).numpy()


def _stored_noise(objects: Any, n: int, shape: tuple[int, ...], *, seed: int) -> list[Item]:
    """``n`` PNGs of random pixels (``shape``: H x W or H x W x 3) in ``objects``, as manifest items."""
    rng = np.random.default_rng(seed)
    items = []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()
        objects.put_bytes(f"i/{k}.png", data)
        items.append(Item(item_id=str(k), key=f"i/{k}.png", name=f"{k}.png", sha256=hashlib.sha256(data).hexdigest(),
                          width=shape[1], height=shape[0]))
    return items


def test_stored_multi_stage_embedding_matches_the_raw_network(tmp_path: Path) -> None:
    from dlforge.labeler.embeddings import EfficientNetLite0Embedder, embed_items
    from dlforge.vision.images import decode, to_array
    from dlforge.vision.observe import CountingObserver, observing

    torch.set_num_threads(1)
    objects = open_objects(f"file://{tmp_path}/o")
    items = _stored_noise(objects, 4, (90, 110), seed=0)
    embedder = EfficientNetLite0Embedder(size=96, threads=1)
    with observing(CountingObserver()) as counts:
        first = embed_items(objects, items, embedder, batch_size=3)
        again = embed_items(objects, items[::-1], EfficientNetLite0Embedder(size=96, threads=1))
    assert sorted(counts.embeds.values()) == [1] * 4 and sorted(counts.decodes.values()) == [1] * 4
    np.testing.assert_array_equal(again, first[::-1])
    pixels = np.stack([to_array(decode(objects.get_bytes(i.key)), size=96, channels=3) for i in items])
    assert first.shape == (4, 40 + 80 + 112 + 192 + 320 + 1280)
    np.testing.assert_allclose(first, _reference(pixels), atol=1e-5)
    np.testing.assert_allclose(embedder.embed(pixels), first, atol=1e-5)  # arrays, not stored: same vectors


def _square_views(images: np.ndarray) -> list[np.ndarray]:
    """The eight symmetries of a square, enumerated as the four quarter turns of the image and of its
    transpose (not how the views' table writes them)."""
    transposed = images.transpose(0, 2, 1, 3)
    return [np.ascontiguousarray(np.rot90(im, k, axes=(1, 2))) for im in (images, transposed) for k in range(4)]


def test_dihedral_views_append_an_orientation_free_half_computed_once_per_view(tmp_path: Path) -> None:
    from dlforge.labeler.embeddings import EfficientNetLite0Embedder, embed_items
    from dlforge.vision.images import decode, to_array
    from dlforge.vision.observe import CountingObserver, observing

    torch.set_num_threads(1)
    objects = open_objects(f"file://{tmp_path}/o")
    items = _stored_noise(objects, 3, (70, 80, 3), seed=1)
    embedder = EfficientNetLite0Embedder(size=64, threads=1, views="dihedral")
    assert embedder.name.endswith("-dihedral")
    with observing(CountingObserver()) as counts:
        vectors = embed_items(objects, items, embedder, batch_size=2)
        again = embed_items(objects, items, EfficientNetLite0Embedder(size=64, threads=1, views="dihedral"))
    # decoded once per image; each image run through the trunk once per view, never again
    assert sorted(counts.decodes.values()) == [1] * 3
    assert len(counts.embeds) == 3 * 8 and set(counts.embeds.values()) == {1}
    np.testing.assert_array_equal(again, vectors)

    pixels = np.stack([to_array(decode(objects.get_bytes(i.key)), size=64, channels=3) for i in items])
    d = 40 + 80 + 112 + 192 + 320 + 1280
    assert vectors.shape == (3, 2 * d)
    # first half: the plain multi-stage vector (the raw network); second half: its mean over the 8 views
    np.testing.assert_allclose(vectors[:, :d] * np.sqrt(2), _reference(pixels), atol=1e-5)
    mean = np.mean([_reference(v) for v in _square_views(pixels)], axis=0)
    np.testing.assert_allclose(vectors[:, d:] * np.sqrt(2), mean, atol=1e-5)
    # so a turned or mirrored image has the same second half, and (random pixels) another first half
    turned = EfficientNetLite0Embedder(size=64, threads=1, views="dihedral").embed(
        np.ascontiguousarray(np.rot90(pixels.transpose(0, 2, 1, 3), 1, axes=(1, 2))))
    np.testing.assert_allclose(turned[:, d:], vectors[:, d:], atol=1e-5)
    assert np.abs(turned[:, :d] - vectors[:, :d]).max() > 1e-3

    # the views store only the pooled stages the labeler reads; the plain view also the standard set
    # (the 9 named stages' pooled features and the shared-boundary activation) for the other services
    spaces = [p.name for p in (tmp_path / "o" / "features").iterdir()]
    assert sum(s.startswith("activation-") for s in spaces) == 1
    assert sum(s.startswith("pooled-") for s in spaces) == 9 + 7 * 6


def test_unknown_views_are_refused_by_name() -> None:
    from dlforge.common.errors import ConfigError
    from dlforge.labeler.embeddings import make_embedder
    from dlforge.vision.images import dihedral_view

    with pytest.raises(ConfigError, match="DLFORGE_LABELER_EMBED_VIEWS: unknown views 'octagonal'"):
        make_embedder("efficientnet_lite0", views="octagonal")
    with pytest.raises(Exception, match="views need square images"):
        dihedral_view(np.zeros((1, 4, 5, 3), dtype=np.uint8), "rot90")


def test_the_view_table_is_the_eight_symmetries_of_the_square_and_the_trainers() -> None:
    from dlforge.trainer.views import VIEW_NAMES, apply_view
    from dlforge.vision.images import DIHEDRAL_VIEWS, dihedral_view

    grid = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
    expected = {v.tobytes() for v in _square_views(grid)}
    got = {name: dihedral_view(grid, name).tobytes() for name in DIHEDRAL_VIEWS}
    assert len(set(got.values())) == 8 and set(got.values()) == expected
    # the trainer names the same pixels the same way (the name is in the feature store's keys)
    assert set(VIEW_NAMES) == set(DIHEDRAL_VIEWS)
    assert all(apply_view(name, grid).tobytes() == got[name] for name in VIEW_NAMES)
    assert dihedral_view(grid, "hflip")[0, 0, 0].tolist() == grid[0, 0, 3].tolist()
    assert dihedral_view(grid, "rot90")[0, 0, 0].tolist() == grid[0, 0, 3].tolist()  # counter-clockwise
    assert dihedral_view(grid, "rot90")[0, 3, 0].tolist() == grid[0, 0, 0].tolist()
