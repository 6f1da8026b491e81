"""The labeler's multi-stage embedding through the vision core equals a direct forward of the raw network."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

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


def test_stored_multi_stage_embedding_matches_the_raw_network(tmp_path: Path) -> None:
    from dlforge.labeler.embeddings import EfficientNetLite0Embedder, embed_items
    from dlforge.vision.images import decode, to_array
    from dlforge.vision.observe import CountingObserver, observing

    torch.set_num_threads(1)
    objects = open_objects(f"file://{tmp_path}/o")
    rng = np.random.default_rng(0)
    items = []
    for n in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (90, 110), dtype=np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()
        objects.put_bytes(f"i/{n}.png", data)
        items.append(Item(item_id=str(n), key=f"i/{n}.png", name=f"{n}.png", sha256=hashlib.sha256(data).hexdigest(),
                          width=110, height=90))
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
