"""The trainer's activation cache of an ImageNet EfficientNet-Lite0 reads the vision core's feature store:
an image another stage put through the same frozen weights at the same size is not run again."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlforge.common.backends import open_objects
from dlforge.vision.images import decode, to_array, to_tensor
from dlforge.vision.manifest import Item, Manifest, Split, save_manifest
from dlforge.vision.networks import build_network, spec_of
from dlforge.vision.observe import CountingObserver, observing
from dlforge.vision.trunk import TrunkFeatures

SIZE = 64


def _dataset(objects, n: int = 6) -> tuple[Manifest, bytes, list[bytes]]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    items, raw = [], []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()
        raw.append(data)
        split: Split = "train" if k < 4 else "val" if k < 5 else "test"
        objects.put_bytes(f"d/{k}.png", data)
        items.append(Item(item_id=f"i{k}", key=f"d/{k}.png", name=f"{k}.png", sha256=hashlib.sha256(data).hexdigest(),
                          width=80, height=70, label="a" if k % 2 else "b", label_source="given", split=split))
    manifest = Manifest(dataset_id="d", name="d", classes=["a", "b"], items=items)
    save_manifest(objects, "d/manifest.json", manifest)
    return manifest, objects.get_bytes("d/manifest.json"), raw


def test_cache_reuses_the_labelers_pass_and_matches_the_prefix(tmp_path: Path) -> None:
    from dlforge.trainer.cache import ActivationCache, TorchPrefixRunner, manifest_digest
    from dlforge.trainer.stages import staged

    torch.set_num_threads(1)
    objects = open_objects(f"file://{tmp_path}/objects")
    manifest, raw_manifest, raw = _dataset(objects)
    model = build_network("efficientnet_lite0", 2, pretrained=True).eval()
    net, spec = staged(model), spec_of("efficientnet_lite0")
    cache = ActivationCache(objects, work_dir=tmp_path / "work", runner=TorchPrefixRunner())
    common = dict(net=net, spec=spec, manifest=manifest, manifest_digest=manifest_digest(raw_manifest),
                  weights_digest="w", input_size=SIZE)
    with observing(CountingObserver()) as counts:
        # the labeler's pass at the same size over the same images, with the bundled ImageNet trunk
        trunk = TrunkFeatures.on(objects, runtime="torch")
        trunk.pooled([i.sha256 for i in manifest.items], size=SIZE, stages=["c40", "head"],
                     load=trunk.for_items(objects, manifest.items, size=SIZE))
        # the images (and their decoded pixels) are gone: only stored features can answer now
        for info in [*objects.list("d/"), *objects.list("features/pixels-")]:
            if not info.key.endswith("manifest.json"):
                objects.delete(info.key)
        got = cache.get(**common, boundary=net.boundary(3), from_boundary=net.boundary(3))  # type: ignore[arg-type]
        pooled = cache.get(**common, boundary=net.boundary(0))  # type: ignore[arg-type]
    assert sorted(counts.embeds.values()) == [1] * 6  # the labeler's pass only
    assert got.source == "computed"  # in the trainer's own cache: computed (from the feature store)

    images = np.stack([to_array(decode(d), size=SIZE, channels=3) for d in raw])
    x = to_tensor(images, spec.__class__(**{**spec.__dict__, "input_size": SIZE}))
    with torch.inference_mode():
        want = net.span(0, net.boundary(3))(x).numpy()
        features = model.features(x).numpy()
    rows = {"train": slice(0, 4), "val": slice(4, 5), "test": slice(5, 6)}
    for split, sl in rows.items():
        assert got.splits[split].item_ids == [f"i{k}" for k in range(6)][sl]
        np.testing.assert_allclose(np.asarray(got.splits[split].x, dtype=np.float32), want[sl], atol=5e-2, rtol=1e-2)
        np.testing.assert_allclose(np.asarray(pooled.splits[split].x, dtype=np.float32), features[sl],
                                   atol=5e-2, rtol=1e-2)


def test_views_are_their_own_passes_through_the_store(tmp_path: Path) -> None:
    from dlforge.trainer.cache import ActivationCache, TorchPrefixRunner, manifest_digest
    from dlforge.trainer.stages import staged

    torch.set_num_threads(1)
    objects = open_objects(f"file://{tmp_path}/objects")
    manifest, raw_manifest, raw = _dataset(objects, n=6)
    model = build_network("efficientnet_lite0", 2, pretrained=True).eval()
    net, spec = staged(model), spec_of("efficientnet_lite0")
    cache = ActivationCache(objects, work_dir=tmp_path / "work", runner=TorchPrefixRunner())
    with observing(CountingObserver()) as counts:
        got = cache.get(net=net, spec=spec, manifest=manifest, manifest_digest=manifest_digest(raw_manifest),
                        weights_digest="w", input_size=SIZE, boundary=net.boundary(1), views=("identity", "hflip"))
    contents = [i.sha256 for i in manifest.items]
    assert {c for (_, size, c) in counts.embeds if size == SIZE} == {*contents, *(f"{c}/hflip" for c in contents)}
    assert max(counts.embeds.values()) == 1
    images = np.stack([to_array(decode(d), size=SIZE, channels=3) for d in raw])[:4, :, ::-1]
    x = to_tensor(np.ascontiguousarray(images), spec.__class__(**{**spec.__dict__, "input_size": SIZE}))
    with torch.inference_mode():
        want = net.span(0, net.boundary(1))(x).numpy()
    np.testing.assert_allclose(np.asarray(got.views["hflip"]["train"].x, dtype=np.float32), want, atol=5e-2,
                               rtol=2e-2)


@pytest.mark.parametrize("unfreeze", [0, 3])
def test_a_fine_tuned_prefix_has_keys_of_its_own(tmp_path: Path, unfreeze: int) -> None:
    from dlforge.vision.staged import StagedNetwork, imagenet_trunk

    model = build_network("efficientnet_lite0", 2, pretrained=True)
    with torch.no_grad():
        model.backbone.net._blocks[3]._project_conv.weight.mul_(1.01)  # type: ignore[union-attr,index,operator]
    tuned = StagedNetwork(model, arch="efficientnet_lite0")
    b = tuned.boundary(unfreeze)
    assert tuned.digest(b) != imagenet_trunk().digest(b)
    assert tuned.digest(4) == imagenet_trunk().digest(4)  # the units before the change still agree
