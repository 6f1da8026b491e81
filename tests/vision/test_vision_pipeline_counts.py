"""Over one whole pipeline run, each image is decoded at most twice and run through the ImageNet trunk
from pixels at most once per input size (the vision core's feature store serves every other use).

The run is the end-to-end test's small one (240 ELPV cells, two trials, one epoch) on the embedded
default's durable SQLite bus, SQLite documents and filesystem object store. Counts come from the observers
of :mod:`dlforge.vision.observe`, which :func:`dlforge.vision.images.decode` and
:class:`dlforge.vision.trunk.TrunkFeatures` report to.

The feature store's reads and writes on S3 are ``tests/vision/test_vision_features.py``'s (every backend),
and a whole run on S3 is the end-to-end suite's; this run on S3 too cost three CPU minutes of CI for no
path of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from uuid import uuid4

import pytest

from dlforge.vision.observe import CountingObserver, observing
from dlforge.vision.staged import imagenet_trunk
from dlforge.vision.trunk import TrunkFeatures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_one_run_decodes_each_image_at_most_twice_and_embeds_it_once_per_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects_url = f"file://{tmp_path}/objects"
    from small_run import small_run

    from dlforge.cli.pipeline import run_in_process

    _, app, data, _, upload = small_run(tmp_path, monkeypatch, bus=f"sqlite:///{tmp_path}/bus.db", objects=objects_url,
                                        dataset_id=f"counts-{uuid4().hex[:8]}")

    with observing(CountingObserver()) as counts:
        run, _, _ = asyncio.run(run_in_process(app, upload=upload, on_progress=lambda r: None, timeout=1500))
    assert run["state"] == "succeeded", run.get("failure")

    real = {hashlib.sha256(p.read_bytes()).hexdigest() for p in data.rglob("*.png")}
    assert len(real) == 240
    # every real image was decoded (at ingestion), none more than twice; generated ones too
    assert real <= set(counts.decodes)
    worst = counts.decodes.most_common(1)[0]
    assert worst[1] <= 2, f"image {worst[0][:12]} decoded {worst[1]} times"

    imagenet = TrunkFeatures(None, imagenet_trunk()).trunk_id()
    by_size: dict[int, set[str]] = {}
    for (trunk, size, content), n in counts.embeds.items():
        assert n <= 1, f"image {content[:12]} embedded {n} times by {trunk} at {size} px"
        if trunk == imagenet:
            by_size.setdefault(size, set()).add(content)
    # the instrumented path is the one used: the labeler embedded every real image at 224 px; the
    # augmenter, the proposer and the trainer (EfficientNet-Lite0 trains at 224 px) read that pass, so
    # no real image was run again at 224 (a label-preserving view the trainer adds is its own input,
    # counted as "<content>/<view>", once too)
    assert real <= by_size.get(224, set())
