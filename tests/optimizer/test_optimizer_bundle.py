"""The model bundle: what the worker stores after an optimization, its verification, and the API route."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import onnx
import onnxruntime
import pytest
from accounts import create_accounts
from bundle_testdata import altered_bundles, rewrite, stored_bundle
from fastapi.testclient import TestClient
from optimizer_testdata import CLASSES, SIZE, Optimized

from dlforge.common.app import create_app
from dlforge.common.backends import open_objects
from dlforge.common.events import Spec
from dlforge.optimizer.app import part
from dlforge.optimizer.bundle import BundleError, build_bundle, bundle_variant, verify_bundle
from dlforge.optimizer.handlers import OptimizationReport
from dlforge.optimizer.worker import REPORTS
from dlforge.vision.networks import spec_of

FILES = {"manifest.json", "model.onnx", "preprocessing.json", "classes.json", "decision.json", "spec.json",
         "spec_check.json"}
SPEC = Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.9, min_fps=1.0, input_size=256)


def stored_report(optimized: Optimized) -> OptimizationReport:
    objects = open_objects(f"file://{optimized.root}/objects")
    return OptimizationReport.model_validate(objects.get_json(optimized.report_key))


def test_the_worker_stores_a_bundle_of_the_chosen_variant(optimized: Optimized, tmp_path: Path) -> None:
    """Every file against its manifest entry (hashlib here, not the bundle code), and its contents against the
    optimizer's report, the network's spec and the stored variant file."""
    path = stored_bundle(optimized, tmp_path / "bundle.zip")
    report = stored_report(optimized)
    objects = open_objects(f"file://{optimized.root}/objects")
    with zipfile.ZipFile(path) as z:
        assert set(z.namelist()) == FILES
        manifest = json.loads(z.read("manifest.json"))
        contents = {name: z.read(name) for name in FILES - {"manifest.json"}}
    assert manifest["format"] == "dlforge-bundle" and manifest["format_version"] == 1
    assert set(manifest["files"]) == FILES - {"manifest.json"}
    for name, data in contents.items():
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    # the model is the chosen variant's stored file, byte for byte
    assert manifest["variant"] == optimized.chosen_variant == report.chosen_variant
    assert manifest["variant_note"] is None
    stored_model = objects.get_bytes(str(report.variants[report.chosen_variant].key))
    assert hashlib.sha256(contents["model.onnx"]).hexdigest() == hashlib.sha256(stored_model).hexdigest()
    opset = next(o.version for o in onnx.load_from_string(stored_model).opset_import if o.domain in ("", "ai.onnx"))
    assert manifest["producer"]["onnx_opset"] == opset
    assert manifest["producer"]["onnxruntime"] == onnxruntime.__version__
    assert manifest["producer"]["dlforge"] == "0.1.0"
    assert (manifest["dataset_id"], manifest["model_id"]) == ("ds1", "m1")
    # preprocessing: the network's own format (small_cnn, grey, trained at SIZE px)
    net = spec_of("small_cnn")
    pre = json.loads(contents["preprocessing.json"])
    assert (pre["colour_mode"], pre["in_channels"], pre["input_size"]) == ("L", 1, SIZE)
    assert pre["mean"] == list(net.mean) and pre["std"] == list(net.std)
    assert (pre["resize"], pre["divide_by"], pre["layout"]) == ("bilinear", 255.0, "NCHW")
    assert json.loads(contents["classes.json"]) == CLASSES
    decision = json.loads(contents["decision.json"])
    assert decision["positive_class"] == "defect" and decision["threshold"] == report.threshold
    assert ">= threshold" in decision["rule"]
    assert json.loads(contents["spec.json"]) == SPEC.model_dump(mode="json")
    check = json.loads(contents["spec_check.json"])
    assert check["spec_met"] == report.spec_met and check["variant"] == report.chosen_variant
    assert check["spec_check"]["fps"] == report.fps
    # what the platform's verification says agrees
    assert verify_bundle(path).model_dump(mode="json") == manifest


async def test_the_report_document_names_the_bundle(optimized: Optimized) -> None:
    from dlforge.common.runtime import Backends

    backends = Backends.from_settings(optimized.settings())
    await backends.start()
    try:
        [doc] = await backends.docs.find(REPORTS, {"dataset_id": "ds1"})
    finally:
        await backends.stop()
    assert doc["bundle_key"] == optimized.bundle_key == "optimizer/ds1/m1/bundle.zip"


def test_verification_refuses_altered_bundles(optimized: Optimized, tmp_path: Path) -> None:
    good = stored_bundle(optimized, tmp_path / "good.zip")
    assert verify_bundle(good).variant == optimized.chosen_variant
    for case, (path, message) in altered_bundles(good, tmp_path).items():
        with pytest.raises(BundleError) as refused:
            verify_bundle(path)
        assert message in str(refused.value), (case, str(refused.value))
    # an altered file whose manifest entry was updated to its new size but not its hash: still refused
    def grow(name: str, data: bytes) -> bytes:
        if name == "manifest.json":
            m = json.loads(data)
            m["files"]["spec.json"]["bytes"] += 1
            return json.dumps(m).encode()
        return data + b" " if name == "spec.json" else data
    with pytest.raises(BundleError, match=r"spec\.json does not match its checksum"):
        verify_bundle(rewrite(good, tmp_path / "grown.zip", change=grow))


def test_build_writes_whole_bundles_and_picks_a_cpu_variant(optimized: Optimized, tmp_path: Path) -> None:
    report = stored_report(optimized)
    objects = open_objects(f"file://{optimized.root}/objects")
    models = {name: objects.get_file(str(v.key), tmp_path / "models" / f"{name}.onnx")
              for name, v in report.variants.items() if v.key}
    # a named variant: its own threshold goes with it
    other = next(n for n in models if n != report.chosen_variant)
    manifest = build_bundle(report, model_path=models[other], out=tmp_path / "other.zip", variant=other)
    assert manifest.variant == other
    with zipfile.ZipFile(tmp_path / "other.zip") as z:
        assert json.loads(z.read("decision.json"))["threshold"] == report.variants[other].threshold.threshold
        assert z.read("model.onnx") == models[other].read_bytes()
    assert verify_bundle(tmp_path / "other.zip") == manifest
    # a GPU variant chosen: the bundle carries the CPU ONNX variant that meets the spec, then is fastest
    fp32 = report.variants["onnx_fp32"]
    gpu = fp32.model_copy(update={"name": "trt_fp16", "runtime": "tensorrt", "providers": ["TensorrtExecutionProvider"],
                                  "file_name": "trt_fp16.engine", "fps": 10 * fp32.fps})
    on_gpu = report.model_copy(update={"variants": {**report.variants, "trt_fp16": gpu}, "chosen_variant": "trt_fp16"})
    cpu = [v for v in report.variants.values() if v.runtime == "onnxruntime"]
    expected = max(cpu, key=lambda v: (v.spec_check.met, v.fps))
    picked, note = bundle_variant(on_gpu)
    assert picked.name == expected.name and note is not None and "trt_fp16" in note
    with pytest.raises(BundleError, match="does not exist"):
        build_bundle(report, model_path=tmp_path / "nope.onnx", out=tmp_path / "nope.zip")
    assert not (tmp_path / "nope.zip").exists()
    with pytest.raises(BundleError, match="no variant 'int4'"):
        build_bundle(report, model_path=models[other], out=tmp_path / "int4.zip", variant="int4")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != "") == ["other.zip"]


def _copy(optimized: Optimized, to: Path) -> Optimized:
    shutil.copytree(optimized.root, to)
    return replace(optimized, root=to)


def test_the_bundle_route(optimized: Optimized, tmp_path: Path) -> None:
    from dlforge.common.runtime import Backends

    mine = _copy(optimized, tmp_path / "state")
    stored = stored_bundle(mine, tmp_path / "stored.zip").read_bytes()
    backends = Backends.from_settings(mine.settings())

    async def old_report() -> None:  # a model optimized before bundles existed
        await backends.start()
        await backends.docs.upsert(REPORTS, {"_id": "ds-old:m0", "dataset_id": "ds-old", "model_id": "m0",
                                             "run_id": "run-old", "report_key": "optimizer/ds-old/m0/report.json",
                                             "updated_at": "2026-01-01T00:00:00+00:00"})
        await backends.stop()

    asyncio.run(old_report())
    app = create_app([part()], settings=mine.settings(), run_workers=False)
    with TestClient(app) as client:
        for query in ("", "?model_id=m1", f"?run_id={mine.run_id}", f"?run_id={mine.run_id}&model_id=m1"):
            r = client.get(f"/models/ds1/bundle{query}")
            assert r.status_code == 200, (query, r.text)
            assert r.headers["content-type"] == "application/zip"
            assert r.headers["content-disposition"] == 'attachment; filename="dlforge-ds1-m1.zip"'
            assert r.content == stored
        r = client.get("/models/ds1/bundle?run_id=run-other")
        assert r.status_code == 404 and r.json()["detail"] == "no optimized model for dataset 'ds1' of run 'run-other'"
        r = client.get("/models/ds-none/bundle")
        assert r.status_code == 404 and "no optimized model for dataset 'ds-none'" in r.json()["detail"]
        r = client.get("/models/ds-old/bundle")
        assert r.status_code == 409 and "optimized before model bundles" in r.json()["detail"]
        r = client.get("/models/ds1/bundle", params={"model_id": "m" * 201})
        assert r.status_code == 422
        # the bundle object gone from the store: said so
        (mine.root / "objects" / mine.bundle_key).unlink()
        r = client.get("/models/ds1/bundle")
        assert r.status_code == 404 and "is not in the object store" in r.json()["detail"]


def test_the_bundle_route_needs_a_viewer_of_the_datasets_project(optimized: Optimized, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from dlforge.common import runs
    from dlforge.common.auth import routes as auth_routes

    monkeypatch.setenv("DLFORGE_AUTH", "required")
    mine = _copy(optimized, tmp_path / "state")
    settings = mine.settings(auth="required")
    tokens = asyncio.run(create_accounts(settings.docs, {"vera": {"default": "viewer"}, "pia": {"p": "operator"}}))
    app = create_app([part(), runs.part(), auth_routes.part()], settings=settings, mount_prefix=True,
                     run_workers=False)
    with TestClient(app) as client:
        assert client.get("/optimizer/models/ds1/bundle").status_code == 401
        r = client.get("/optimizer/models/ds1/bundle", headers={"Authorization": f"Bearer {tokens['vera']}"})
        assert r.status_code == 200 and zipfile.ZipFile(io.BytesIO(r.content)).testzip() is None
        # another project's operator: the dataset looks unknown
        r = client.get("/optimizer/models/ds1/bundle", headers={"Authorization": f"Bearer {tokens['pia']}"})
        assert r.status_code == 404
