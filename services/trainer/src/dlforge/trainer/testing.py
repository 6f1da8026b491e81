"""Tiny synthetic data sets and candidate checkpoints for tests, examples and notebooks.

Two classes of small grayscale images: ``good`` (smooth noise) and ``defect`` (the same with a
bright streak), split train/val/test, written to an object store with a manifest as the labeler
and augmenter write them.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from dlforge.common.objects import ObjectStore
from dlforge.vision.manifest import Item, Manifest, Split, save_manifest
from dlforge.vision.networks import build_network, save_checkpoint

if TYPE_CHECKING:
    from dlforge.trainer.runner import JobRunner

CLASSES = ["defect", "good"]


def _image(rng: np.random.Generator, label: str, size: int) -> bytes:
    base = rng.normal(110, 18, (size, size)).clip(0, 255)
    if label == "defect":
        row = int(rng.integers(size // 4, 3 * size // 4))
        width = max(2, size // 6)
        base[max(0, row - width):row + width, :] += 90
    buf = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(
    objects: ObjectStore,
    *,
    prefix: str = "testdata",
    per_class: dict[str, int] | None = None,
    size: int = 32,
    split_shares: tuple[float, float] = (0.15, 0.15),
    seed: int = 0,
) -> str:
    """Write images and a manifest (every item labeled and split); returns the manifest's key."""
    counts = per_class or {c: 40 for c in CLASSES}
    rng = np.random.default_rng(seed)
    items = []
    val_share, test_share = split_shares
    for label, n in counts.items():
        n_test, n_val = round(n * test_share), round(n * val_share)
        for i in range(n):
            data = _image(rng, label, size)
            item_id = f"{label}-{i:04d}"
            key = f"{prefix}/images/{item_id}.png"
            objects.put_bytes(key, data, content_type="image/png")
            split: Split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            items.append(Item(item_id=item_id, key=key, name=f"{item_id}.png", sha256=hashlib.sha256(data).hexdigest(),
                              width=size, height=size, label=label, label_source="given", confidence=1.0,
                              split=split))
    manifest = Manifest(dataset_id=prefix, name=prefix, classes=sorted(counts), items=items)
    key = f"{prefix}/manifest.json"
    save_manifest(objects, key, manifest)
    return key


def make_candidate(objects: ObjectStore, key: str, *, arch: str = "small_cnn", source_classes: int = 10,
                   seed: int = 0, pretrained: bool = False) -> str:
    """A candidate checkpoint as the proposer's repository holds them (a head for its source data set)."""
    torch.manual_seed(seed)
    model = build_network(arch, source_classes, pretrained=pretrained)
    if not pretrained:
        _calibrate_batchnorm(model, arch)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.pt"
        save_checkpoint(model, arch=arch, classes=[str(i) for i in range(source_classes)], path=str(path))
        objects.put_file(key, path)
    return key


def _calibrate_batchnorm(model: torch.nn.Module, arch: str) -> None:
    """Give a randomly initialized network batch-norm statistics that normalize (as a trained one has)."""
    from dlforge.vision.networks import spec_of

    spec = spec_of(arch)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, spec.in_channels, spec.input_size, spec.input_size) * 0.5)
    model.eval()


async def jobs_ended(*runners: JobRunner, timeout: float = 60.0) -> None:
    """Wait until every REST job task the runners have now has ended; AssertionError after ``timeout`` seconds."""
    tasks = [t for runner in runners for t in runner.tasks]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        assert not pending, f"{len(pending)} job task(s) still running after {timeout} s"


def answering_late(call: Callable[..., Awaitable[Any]], *, together: int = 1,
                   timeout: float = 10.0) -> Callable[..., Awaitable[Any]]:
    """``call`` (an async document-store method) answered as a networked store answers: every other task that is
    ready runs before the answer comes. With ``together`` > 1, the first ``together`` calls also wait for each
    other (at most ``timeout`` seconds), so what they read is read before any of them goes on: two readers
    interleave for certain instead of by the scheduler's order."""
    meet = asyncio.Barrier(together) if together > 1 else None
    calls = 0

    async def late(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if meet is not None and calls <= together:
            async with asyncio.timeout(timeout):
                await meet.wait()
        answer = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(answer.set_result, None)
        await answer  # one turn of the loop: the tasks ready now run first
        return await call(*args, **kwargs)

    return late
