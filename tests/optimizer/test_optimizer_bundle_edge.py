"""dlforge-edge in a fresh virtual environment (no system site packages) with only ``pip install libs/edge``:
no torch, no dlforge. It predicts a bundle the platform built as the platform's Predictor does, benchmarks
it, serves it, and refuses altered bundles.

The venv is built once per module; pip installs onnxruntime, numpy and Pillow from PyPI (or pip's cache).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_testdata import altered_bundles, stored_bundle
from optimizer_testdata import CLASSES, Optimized, png, separable
from PIL import Image

from dlforge.common.backends import open_objects
from dlforge.optimizer.predictor import Predictor

REPO = Path(__file__).resolve().parents[2]
EDGE = REPO / "libs" / "edge"


def clean_env() -> dict[str, str]:
    """The environment without what would let the venv see this checkout or the shared venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only dlforge-edge installed (not editable: a copy, as on an inspection PC)."""
    venv = tmp_path_factory.mktemp("edge") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env(), timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", str(EDGE)],
                         env=clean_env(), capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, f"pip install libs/edge failed:\n{pip.stdout}\n{pip.stderr}"
    return venv


def edge(venv: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "dlforge-edge"), *args], env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=venv.parent)


def test_only_the_edge_distribution_is_there(edge_venv: Path) -> None:
    probe = ("import importlib.util as u, importlib.metadata as m, json, sys; "
             "print(json.dumps({'torch': u.find_spec('torch') is not None,"
             " 'dlforge': u.find_spec('dlforge') is not None,"
             " 'edge': u.find_spec('dlforge_edge') is not None, 'prefix': sys.prefix, 'base': sys.base_prefix,"
             " 'requires': m.requires('dlforge-edge'),"
             " 'dists': sorted(d.metadata['Name'].lower() for d in m.distributions())}))")
    out = subprocess.run([str(edge_venv / "bin" / "python"), "-c", probe], env=clean_env(), capture_output=True,
                         text=True, check=True, timeout=60)
    found = json.loads(out.stdout)
    assert found["edge"] and not found["torch"] and not found["dlforge"]
    assert found["prefix"] == str(edge_venv) and found["prefix"] != found["base"]
    assert sorted(r.split(">")[0].split("=")[0].strip().lower() for r in found["requires"]) == \
        ["numpy", "onnxruntime", "pillow"]
    assert not [d for d in found["dists"] if d.startswith("dlforge") and d != "dlforge-edge"]
    assert "torch" not in found["dists"]
    torch = subprocess.run([str(edge_venv / "bin" / "python"), "-c", "import torch"], env=clean_env(),
                           capture_output=True, text=True, timeout=60)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr


def twenty_images(folder: Path) -> list[Path]:
    """20 images as a camera would give them: grey at several sizes, RGB, and a JPEG."""
    folder.mkdir()
    x, y = separable(20, seed=4242, size=120)
    paths = []
    for i, img in enumerate(x):
        pixels = img[:, :, 0]
        if i % 5 == 1:  # another size
            pixels = np.asarray(Image.fromarray(pixels).resize((77, 91)))
        image = Image.fromarray(pixels)
        if i % 5 == 2:  # RGB: the bundle's preprocessing converts it to grey
            image = image.convert("RGB")
        path = folder / f"cell-{i:02d}-{CLASSES[y[i]]}.{'jpg' if i % 5 == 3 else 'png'}"
        image.save(path, **({"quality": 95} if i % 5 == 3 else {}))
        paths.append(path)
    return paths


def test_edge_predicts_as_the_platform_does(optimized: Optimized, edge_venv: Path, tmp_path: Path) -> None:
    bundle = stored_bundle(optimized, tmp_path / "bundle.zip")
    images = twenty_images(tmp_path / "images")
    run = edge(edge_venv, "predict", str(bundle), *map(str, images), "--json")
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["variant"] == optimized.chosen_variant and body["model_id"] == "m1"
    got = body["predictions"]
    assert [g["image"] for g in got] == [str(p) for p in images]

    objects = open_objects(f"file://{optimized.root}/objects")
    predictor = Predictor.load(objects, optimized.report_key, cache_dir=tmp_path / "cache")
    assert predictor.variant == optimized.chosen_variant
    expected = [predictor.predict(p.read_bytes(), name=p.name) for p in images]
    for g, e in zip(got, expected, strict=True):
        assert g["label"] == e.label, (g, e)
        assert set(g["probabilities"]) == set(e.probabilities) == set(CLASSES)
        for c in CLASSES:
            assert abs(g["probabilities"][c] - e.probabilities[c]) <= 1e-4, (g["image"], c)
        assert g["threshold"] == e.threshold and g["positive_class"] == e.positive_class == "defect"
    # the model does its job on these images (the truth is in each file's name)
    right = sum(g["label"] in Path(g["image"]).stem for g in got)
    assert right >= 18, right
    # the text form names each image and its decision
    text = edge(edge_venv, "predict", str(bundle), str(images[0]))
    assert text.returncode == 0 and text.stdout.startswith(f"{images[0]}: {got[0]['label']} (p = ")


def test_edge_refuses_altered_bundles_and_bad_images(optimized: Optimized, edge_venv: Path, tmp_path: Path) -> None:
    good = stored_bundle(optimized, tmp_path / "good.zip")
    for case, (path, message) in altered_bundles(good, tmp_path).items():
        run = edge(edge_venv, "predict", str(path), str(good))
        assert run.returncode == 2, (case, run.stdout, run.stderr)
        assert run.stderr.startswith("dlforge-edge: refused: ") and message in run.stderr, (case, run.stderr)
        assert run.stdout == ""
    missing = edge(edge_venv, "bench", str(tmp_path / "none.zip"))
    assert missing.returncode == 2 and "none.zip: no such file" in missing.stderr
    # an image that cannot be read is reported, the others are still decided; the exit status says so
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "ok.png").write_bytes(png(separable(1, seed=1, size=64)[0][0]))
    run = edge(edge_venv, "predict", str(good), str(tmp_path / "broken.png"), str(tmp_path / "ok.png"), "--json")
    assert run.returncode == 1
    broken, ok = json.loads(run.stdout)["predictions"]
    assert "not a readable image" in broken["error"] and ok["label"] in CLASSES


def test_edge_bench_says_whether_the_spec_fps_is_met(optimized: Optimized, edge_venv: Path, tmp_path: Path) -> None:
    bundle = stored_bundle(optimized, tmp_path / "bundle.zip")
    run = edge(edge_venv, "bench", str(bundle), "--size", "64", "--iterations", "20", "--warmup", "2", "--json",
               "--threads", "1")
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert (r["frame_size"], r["input_size"], r["iterations"], r["threads"]) == (64, 32, 20, 1)
    assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"]
    # FPS is calls over their total time: at least one over the slowest call, at most one over the fastest
    assert 1000 / r["latency_p99_ms"] * 0.99 <= r["fps"]
    assert r["spec_min_fps"] == 1.0 and r["spec_fps_met"] == (r["fps"] >= 1.0)
    assert 10 < r["peak_rss_mb"] < 4096
    text = edge(edge_venv, "bench", str(bundle), "--iterations", "5", "--warmup", "0")
    assert text.returncode == 0, text.stderr
    assert "256x256 frame -> 32x32 input" in text.stdout  # the spec's frame size by default
    assert "spec FPS 1: MET" in text.stdout or "spec FPS 1: NOT MET" in text.stdout


@pytest.fixture
def served(optimized: Optimized, edge_venv: Path, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """``dlforge-edge serve`` in the fresh venv on a free port; stopped by its pid."""
    bundle = stored_bundle(optimized, tmp_path / "bundle.zip")
    proc = subprocess.Popen([str(edge_venv / "bin" / "dlforge-edge"), "serve", str(bundle), "--port", "0"],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not lines and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lines, f"the server did not start: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"  # type: ignore[union-attr]
        url = lines[0].split(" at http://", 1)[1].split("/predict", 1)[0]
        host, port = url.rsplit(":", 1)
        yield host, int(port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def request(host: str, port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_edge_serve_answers_and_refuses_with_reasons(served: tuple[str, int], optimized: Optimized,
                                                     tmp_path: Path) -> None:
    host, port = served
    assert host == "127.0.0.1"  # the default: this machine only
    assert request(host, port, "GET", "/healthz") == (200, {"status": "ok"})
    status, info = request(host, port, "GET", "/info")
    assert status == 200 and info["classes"] == CLASSES and info["variant"] == optimized.chosen_variant
    assert info["preprocessing"]["input_size"] == 32 and info["spec"]["min_fps"] == 1.0

    objects = open_objects(f"file://{optimized.root}/objects")
    predictor = Predictor.load(objects, optimized.report_key, cache_dir=tmp_path / "cache")
    image = png(separable(1, seed=77, size=90)[0][0])
    status, got = request(host, port, "POST", "/predict", image, {"Content-Type": "image/png"})
    expected = predictor.predict(image)
    assert status == 200 and got["label"] == expected.label
    assert all(abs(got["probabilities"][c] - expected.probabilities[c]) <= 1e-4 for c in CLASSES)

    def refused(status: int, detail: str, *args: Any, **kwargs: Any) -> None:
        got_status, body = request(host, port, *args, **kwargs)
        assert (got_status, detail in body["detail"]) == (status, True), (got_status, body)

    refused(400, "the body is empty", "POST", "/predict", b"")
    refused(422, "not a readable image", "POST", "/predict", b"GIF89a? no")
    tiny = io.BytesIO()
    Image.new("L", (4, 4)).save(tiny, format="PNG")
    refused(422, "image is 4x4, smaller than 8x8", "POST", "/predict", tiny.getvalue())
    refused(415, "not a multipart form", "POST", "/predict", image,
            {"Content-Type": "multipart/form-data; boundary=x"})
    refused(404, "no route '/nope'", "GET", "/nope")
    refused(405, "POST the image", "GET", "/predict")
    # a declared body over the limit is refused before a byte of it is read
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Length", str(33 * 2**20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "over the limit of 33554432 bytes" in json.loads(r.read())["detail"]
    conn.close()
    conn = http.client.HTTPConnection(host, port, timeout=60)  # no length at all
    conn.putrequest("POST", "/predict")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["detail"]
    conn.close()
    # still serving after all that
    assert request(host, port, "POST", "/predict", image)[0] == 200
