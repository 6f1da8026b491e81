"""The optimizer worker on the memory bus: model.trained -> model.optimized, stored artifacts, Predictor, REST."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi.testclient import TestClient
from optimizer_testdata import CLASSES, Trained, png, separable

from dlforge.common.app import create_app
from dlforge.common.bus import Delivery
from dlforge.common.errors import InvalidInput
from dlforge.common.events import Event, ModelOptimized, ModelTrained, PipelineOptions, Spec, Topic, decode, encode
from dlforge.common.runtime import Backends, Outcome, Worker
from dlforge.common.settings import load_settings
from dlforge.optimizer.app import FORM_FIELDS_BYTES, MAX_IMAGE_BYTES, part
from dlforge.optimizer.compressors import Source, Variant
from dlforge.optimizer.handlers import OptimizationReport
from dlforge.optimizer.predictor import Predictor
from dlforge.optimizer.settings import OptimizerSettings
from dlforge.optimizer.worker import REPORTS, OptimizerDeps, build_deps, service
from dlforge.vision.manifest import Item, Manifest, save_manifest

SPLITS = {"train": 40, "val": 60, "test": 60}
SPEC = Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.9, min_fps=1.0, input_size=256)


@pytest_asyncio.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Backends]:
    settings = load_settings(
        OptimizerSettings, bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
        work_dir=str(tmp_path / "work"), retry_attempts=1, optimizer_rounds=1, optimizer_warmup=1,
        optimizer_iterations=5,
        optimizer_iterations_large_batch=2, optimizer_batch_sizes=[1, 8], optimizer_calibration_images=16,
        optimizer_calibration_methods=["minmax"],
    )
    b = Backends.from_settings(settings)
    await b.start()
    yield b
    await b.stop()


def _dataset(backends: Backends, trained: Trained) -> ModelTrained:
    """A tiny labeled manifest (images stored as 48x48 PNGs: the worker resizes them) and the checkpoint."""
    items = []
    for n, (split, count) in enumerate(SPLITS.items()):
        x, y = separable(count, seed=100 + n, size=48)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            data = png(img)
            key = f"labeler/ds1/images/{split}-{i}.png"
            backends.objects.put_bytes(key, data, content_type="image/png")
            items.append(Item(item_id=f"{split}-{i}", key=key, name=f"{split}-{i}.png",
                              sha256=hashlib.sha256(data).hexdigest(), width=48, height=48, label=CLASSES[label],
                              label_source="human", split=split))  # type: ignore[arg-type]
    # a generated training item: never used for calibration while real ones suffice
    items.append(items[0].model_copy(update={"item_id": "gen-0", "label_source": "generated"}))
    save_manifest(backends.objects, "augmenter/ds1/manifest.json",
                  Manifest(dataset_id="ds1", name="tiny", classes=CLASSES, items=items))
    backends.objects.put_file("trainer/ds1/m1/final.pt", trained.checkpoint)
    return ModelTrained(dataset_id="ds1", model_id="m1", arch="small_cnn", checkpoint_key="trainer/ds1/m1/final.pt",
                        manifest_key="augmenter/ds1/manifest.json", classes=CLASSES, params={"lr": 0.01},
                        metrics={"val_accuracy": 1.0}, no_of_workers=1, spec=SPEC, options=PipelineOptions(seed=5))


async def _process(backends: Backends, event: Event) -> Outcome:
    delivery = Delivery(topic=event.event_type.value, key=event.run_id, value=encode(event))
    return await Worker(service, backends, deps=await deps_of(backends)).process(delivery)


async def deps_of(backends: Backends) -> OptimizerDeps:
    assert isinstance(backends.settings, OptimizerSettings)
    return await build_deps(backends.settings, backends)


async def _emitted(backends: Backends, topic: Topic) -> list[Event]:
    sub = await backends.bus.subscribe(group="test-reader", topics=[topic])
    out = []
    while (d := await sub.get(timeout=0.05)) is not None:
        out.append(decode(d.value))
        await sub.commit(d)
    await sub.close()
    return out


async def test_model_trained_to_model_optimized(backends: Backends, trained: Trained, tmp_path: Path) -> None:
    trained_event = Event.new(_dataset(backends, trained), run_id="run-7")
    assert await _process(backends, trained_event) == Outcome.HANDLED

    [event] = await _emitted(backends, Topic.MODEL_OPTIMIZED)
    assert event.run_id == "run-7" and event.causation_id == trained_event.event_id
    p = event.payload
    assert isinstance(p, ModelOptimized)
    assert p.dataset_id == "ds1" and p.model_id == "m1" and p.spec == SPEC
    assert p.artifacts == {"onnx_fp32": "optimizer/ds1/m1/onnx_fp32.onnx",
                           "onnx_int8": "optimizer/ds1/m1/onnx_int8.onnx"}
    assert p.report_key == "optimizer/ds1/m1/report.json"
    assert all(backends.objects.exists(k) for k in [*p.artifacts.values(), p.report_key])
    assert not list(backends.objects.list("optimizer/ds1/m1/tmp"))

    stored = OptimizationReport.model_validate(backends.objects.get_json(p.report_key))
    assert stored.source_event_id == trained_event.event_id
    assert stored.model_dump(mode="json") == p.report
    assert p.chosen_variant == stored.chosen_variant and p.spec_met == stored.spec_met
    assert stored.calibration.images == 16
    assert stored.variants["onnx_int8"].test.n == SPLITS["test"]
    assert stored.int8_speedup_vs_onnx_fp32 is not None and stored.int8_accuracy_drop is not None
    assert stored.variants["onnx_int8"].key == p.artifacts["onnx_int8"]
    assert stored.variants["torch_fp32"].key is None  # the baseline is the trainer's checkpoint, not copied

    [doc] = await backends.docs.find(REPORTS, {"dataset_id": "ds1"})
    assert doc["_id"] == "ds1:m1" and doc["run_id"] == "run-7" and doc["report_key"] == p.report_key
    assert doc["artifacts"] == p.artifacts and doc["chosen_variant"] == p.chosen_variant
    # the work directory is cleaned up
    assert not any((tmp_path / "work" / "optimizer").iterdir())

    # a redelivered event is a duplicate: nothing is redone; at most the same event is re-published
    assert await _process(backends, trained_event) == Outcome.DUPLICATE
    again = await _emitted(backends, Topic.MODEL_OPTIMIZED)
    assert [e.event_id for e in again] in ([], [event.event_id])

    # the optimized model loads from the store and predicts
    predictor = Predictor.load(backends.objects, p.report_key, cache_dir=tmp_path / "cache")
    assert predictor.variant == p.chosen_variant and predictor.threshold == stored.threshold
    x, y = separable(20, seed=999, size=200)  # any image size: the predictor resizes
    preds = [predictor.predict(png(img)) for img in x]
    labels = [CLASSES[k] for k in y]
    assert sum(pr.label == t for pr, t in zip(preds, labels, strict=True)) >= 18
    for pr in preds:
        assert pr.positive_class == "defect" and pr.positive_probability is not None
        assert (pr.label == "defect") == (pr.positive_probability >= stored.threshold)
        assert pr.probabilities[pr.label] == pytest.approx(pr.probability)
        assert sum(pr.probabilities.values()) == pytest.approx(1.0)
    int8 = Predictor.load(backends.objects, p.report_key, cache_dir=tmp_path / "cache", variant="onnx_int8")
    assert int8.predict(png(x[0])).label == preds[0].label
    with pytest.raises(InvalidInput, match="not a readable image"):
        predictor.predict(b"\x89PNG garbage", name="broken.png")


async def test_rest_report_and_predict(backends: Backends, trained: Trained) -> None:
    await _process(backends, Event.new(_dataset(backends, trained), run_id="run-8"))
    app = create_app([part()], backends=backends, run_workers=False)
    x, y = separable(4, seed=5, size=256)
    with TestClient(app) as client:
        r = client.get("/reports/ds1")
        assert r.status_code == 200
        body = r.json()
        assert body["model_id"] == "m1" and body["report_key"] == "optimizer/ds1/m1/report.json"
        assert body["report"]["chosen_variant"] in body["artifacts"]
        assert client.get("/reports/nope").status_code == 404

        for img, label in zip(x, y, strict=True):
            r = client.post("/models/ds1/predict", files={"file": ("cell.png", png(img), "image/png")})
            assert r.status_code == 200, r.text
            pred = r.json()
            assert pred["label"] == CLASSES[label]
            assert pred["threshold"] == pytest.approx(body["report"]["threshold"])
            assert (pred["label"] == "defect") == (pred["positive_probability"] >= pred["threshold"])
        r = client.post("/models/ds1/predict?variant=onnx_fp32", files={"file": ("c.png", png(x[0]), "image/png")})
        assert r.status_code == 200 and r.json()["variant"] == "onnx_fp32"
        r = client.post("/models/ds1/predict", files={"file": ("bad.png", b"not an image", "image/png")})
        assert r.status_code == 422 and "bad.png" in r.json()["detail"]
        r = client.post("/models/ds1/predict", files={"file": ("empty.png", b"", "image/png")})
        assert r.status_code == 422
        # the documented 64 MP limit, from the header: 121 MP is not decoded (Pillow alone would, with a warning)
        r = client.post("/models/ds1/predict", files={"file": ("huge.png", png_claiming(11_000, 11_000), "image/png")})
        assert r.status_code == 413
        assert r.json()["detail"] == "huge.png: image is 11000x11000 = 121.0 MP, over the limit of 64 MP"
        r = client.post("/models/ds1/predict?variant=trt_fp16", files={"file": ("c.png", png(x[0]), "image/png")})
        assert r.status_code == 404 and "stored variants" in r.json()["detail"]
        r = client.post("/models/other/predict", files={"file": ("c.png", png(x[0]), "image/png")})
        assert r.status_code == 404


async def test_poison_when_the_manifest_is_missing(backends: Backends, trained: Trained) -> None:
    payload = _dataset(backends, trained).model_copy(update={"manifest_key": "augmenter/ds1/missing.json"})
    assert await _process(backends, Event.new(payload, run_id="run-9")) == Outcome.DEAD_LETTERED
    [failed] = await _emitted(backends, Topic.RUN_FAILED)
    assert failed.payload.stage == "optimizer"  # type: ignore[attr-defined]
    assert "missing.json" in failed.payload.reason  # type: ignore[attr-defined]
    assert await _emitted(backends, Topic.MODEL_OPTIMIZED) == []


class MustNotRun:
    """A compressor plug-in that fails the test when an optimization reaches its compressors."""

    name = "must_not_run"

    def unavailable(self) -> str | None:
        raise AssertionError("the optimization ran again for the same event")

    def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
        raise AssertionError("the optimization ran again for the same event")


async def test_a_redone_event_reuses_its_stored_report(backends: Backends, trained: Trained) -> None:
    """A crash after the report was written but before the marker: the rerun does not optimize again."""
    from dlforge.optimizer import worker

    payload = _dataset(backends, trained)
    deps = await deps_of(backends)
    first = worker._run(backends.objects, payload, "event-1", deps)
    guarded = replace(deps, compressors=[MustNotRun()])
    again = worker._run(backends.objects, payload, "event-1", guarded)
    assert again == first
    with pytest.raises(AssertionError, match="ran again"):  # another event for the same model is redone
        worker._run(backends.objects, payload, "event-2", guarded)


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (see tests/vision/test_vision_images.py)."""
    import struct
    import zlib

    data = bytearray(png(np.zeros((8, 8, 1), dtype=np.uint8)))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


async def test_predict_stops_reading_an_upload_at_the_limit(backends: Backends) -> None:
    limit = MAX_IMAGE_BYTES + FORM_FIELDS_BYTES
    chunk = 1 << 20
    pulled = 0

    async def body() -> AsyncIterator[bytes]:  # a 100 MB image upload, chunked (no Content-Length)
        nonlocal pulled
        head = (b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                b"Content-Type: image/png\r\n\r\n")
        pulled += len(head)
        yield head
        while pulled < 100 * chunk:
            pulled += chunk
            yield b"\0" * chunk
        yield b"\r\n--b0undary--\r\n"

    app = create_app([part()], backends=backends, run_workers=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://optimizer") as client:
            r = await client.post("/models/ds1/predict", content=body(),
                                  headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 413, r.text
    assert f"over the limit of {limit} bytes" in r.json()["detail"]
    assert limit < pulled <= limit + chunk


def _square_image(size: int, *, top: int, left: int, side: int, seed: int) -> np.ndarray:
    """Noise like :func:`separable`'s, with one bright square (the 'defect' evidence) at a known place."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 110, (size, size, 1)).astype(np.uint8)
    x[top:top + side, left:left + side] = 230
    return x


async def test_predict_with_a_class_activation_map(backends: Backends, trained: Trained) -> None:
    """The map is drawn at the image's size, or on a copy at most 1024 px on its long side for a larger
    image, and peaks (in the upload's pixels) on the square that makes the image a 'defect'."""
    import base64
    import io

    from PIL import Image

    await _process(backends, Event.new(_dataset(backends, trained), run_id="run-cam"))
    app = create_app([part()], backends=backends, run_workers=False)
    with TestClient(app) as client:
        for n, (w, top, left) in enumerate([(120, 10, 70), (96, 60, 8), (160, 50, 50), (2048, 700, 1200)]):
            side = w // 3
            img = _square_image(w, top=top, left=left, side=side, seed=n)
            r = client.post("/models/ds1/predict?cam=true&cam_class=defect",
                            files={"file": ("cell.png", png(img), "image/png")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["probabilities"]["defect"] > 0.9 and body["cam_class"] == "defect"
            assert sum(body["probabilities"].values()) == pytest.approx(1.0)
            overlay = Image.open(io.BytesIO(base64.b64decode(body["cam_png"])))
            shown = 1024 if w > 1024 else w
            assert overlay.size == (shown, shown) and body["cam_size"] == {"width": shown, "height": shown}
            peak = body["cam_peak"]
            margin = w // 10  # the map is 4x4 at 32 px: a cell is an eighth of the image
            assert left - margin <= peak["x"] < left + side + margin, (peak, left, side)
            assert top - margin <= peak["y"] < top + side + margin, (peak, top, side)
        plain = client.post("/models/ds1/predict", files={"file": ("c.png", png(img), "image/png")}).json()
        assert plain["cam_png"] is None and plain["probabilities"] == body["probabilities"]
        decided = client.post("/models/ds1/predict?cam=true", files={"file": ("c.png", png(img), "image/png")}).json()
        assert decided["cam_class"] == decided["label"]
        r = client.post("/models/ds1/predict?cam=true&cam_class=scratch",
                        files={"file": ("c.png", png(img), "image/png")})
        assert r.status_code == 422 and "'scratch' is not a class" in r.json()["detail"]


def test_the_map_is_where_the_score_comes_from(trained: Trained) -> None:
    """Independent of the CAM code's scaling: the mean of sum_k w_ck A_k plus the bias is the class's logit."""
    import torch

    from dlforge.vision.cam import feature_maps

    model = trained.model.eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        maps = feature_maps(model, x)[0]
        logits = model(x)[0]
        for c in range(len(CLASSES)):
            raw = torch.einsum("k,khw->hw", model.head.weight[c], maps)
            assert float(raw.mean() + model.head.bias[c]) == pytest.approx(float(logits[c]), abs=1e-4)


async def test_training_images_are_loaded_for_a_plug_in_that_needs_them(backends: Backends, trained: Trained) -> None:
    from dlforge.optimizer.compressors import Need, OrtFp32

    class NeedsTraining:
        name, kind, libraries, competes_as = "recovered", "compressed-torch", (), None
        needs = frozenset({Need.TORCH_MODEL, Need.TRAINING_IMAGES})
        seen: Source | None = None

        def unavailable(self) -> str | None:
            return None

        def compress(self, source: Source, calibration: np.ndarray, workdir: Path) -> Variant:
            type(self).seen = source
            out = workdir / "recovered.onnx"
            out.write_bytes(source.onnx_path.read_bytes())
            return Variant(self.name, "onnxruntime", "fp32", out)

    deps = await deps_of(backends)
    deps.compressors = [OrtFp32(), NeedsTraining()]  # type: ignore[list-item]
    event = Event.new(_dataset(backends, trained), run_id="run-t")
    delivery = Delivery(topic=event.event_type.value, key=event.run_id, value=encode(event))
    assert await Worker(service, backends, deps=deps).process(delivery) == Outcome.HANDLED
    seen = NeedsTraining.seen
    assert seen is not None and seen.train_images is not None and seen.train_labels is not None
    # the 40 real training items, topped up with the one generated item (512 asked for), at the net's 32 px
    assert seen.train_images.shape == (41, 1, 32, 32)
    _, y = separable(SPLITS["train"], seed=100, size=48)
    assert sorted(seen.train_labels.tolist()) == sorted([*y.tolist(), int(y[0])])
