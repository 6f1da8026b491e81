"""What the console's run, report and model pages read: the run document's trace id, spec and options,
the live stream (over a real HTTP connection), the report with its verdict, the HTML page, the model zip."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
import uvicorn
from opentelemetry import trace

from dlforge.common import runs
from dlforge.common.app import create_app
from dlforge.common.events import (
    DatasetUploaded,
    Event,
    ModelOptimized,
    PipelineOptions,
    RunFailed,
    Spec,
)
from dlforge.common.runtime import Backends
from dlforge.common.settings import load_settings
from dlforge.common.tracing import tracer

SPEC = Spec(positive_class="defect", min_recall=0.9, min_accuracy=0.5, min_fps=1.0, input_size=64)
OPTIONS = PipelineOptions(hpo_trials=2, seed=5)


def _uploaded(run_id: str) -> Event:
    return Event.new(DatasetUploaded(dataset_id=f"ds-{run_id}", name="cells", item_count=10,
                                     classes=["defect", "good"], labeled_count=0, rejected_count=0,
                                     duplicate_count=0, manifest_key="m.json", spec=SPEC, options=OPTIONS),
                     run_id=run_id)


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Backends, str]]:
    """The run view with its worker, served by uvicorn on 127.0.0.1 (a real connection for the stream)."""
    settings = load_settings(bus="memory://", objects=f"file://{tmp_path}/o", docs=f"sqlite:///{tmp_path}/d.db",
                             poll_seconds=0.05)
    backends = Backends.from_settings(settings)
    app = create_app([runs.part()], backends=backends)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    yield backends, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def _until(client: httpx.AsyncClient, path: str, check: Any, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get(path)
        if r.status_code == 200 and check(r.json()):
            return r.json()  # type: ignore[no-any-return]
        await asyncio.sleep(0.03)
    raise AssertionError(f"{path}: condition not reached")


async def _sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each server-sent event; comment lines are skipped."""
    name, data = "message", []
    async for line in lines:
        if line == "":
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())


async def test_the_run_document_keeps_the_trace_spec_and_options(served: tuple[Backends, str]) -> None:
    backends, base = served
    with tracer().start_as_current_span("upload") as span:  # the producer's trace travels in the headers
        expected = format(span.get_span_context().trace_id, "032x")
        await backends.publish(_uploaded("r1"))
    async with httpx.AsyncClient(base_url=base) as client:
        doc = await _until(client, "/runs/r1", lambda d: True)
        assert doc["trace_id"] == expected and len(expected) == 32
        assert doc["spec"] == SPEC.model_dump() and doc["options"] == OPTIONS.model_dump()
        assert runs.LAST_EVENTS not in doc  # kept for the report, not served
        listed = (await client.get("/runs")).json()
        assert runs.LAST_EVENTS not in listed[0] and listed[0]["trace_id"] == expected
    assert trace.get_current_span().get_span_context().is_valid is False


async def test_the_stream_sends_the_run_at_once_on_each_change_and_ends(served: tuple[Backends, str]) -> None:
    backends, base = served
    first = _uploaded("r2")
    await backends.publish(first)
    async with httpx.AsyncClient(base_url=base, timeout=20) as client:
        await _until(client, "/runs/r2", lambda d: True)
        assert (await client.get("/runs/nope/stream")).status_code == 404
        seen: list[tuple[str, dict[str, Any]]] = []
        async with client.stream("GET", "/runs/r2/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for name, data in _sse(response.aiter_lines()):
                seen.append((name, json.loads(data)))
                if len(seen) == 1:  # the document at once; then a change: the labeler fails
                    await backends.publish(first.follow(RunFailed(stage="labeler", reason="broken manifest")))
        # the stream closed by itself after 'end'
    names = [n for n, _ in seen]
    assert names[0] == "run" and names[-1] == "end" and names.count("end") == 1
    assert seen[0][1]["state"] == "running" and seen[0][1]["stages"]["labeler"]["state"] == "running"
    last_run = [d for n, d in seen if n == "run"][-1]
    assert last_run["state"] == "failed" and last_run["failure"]["reason"] == "broken manifest"
    assert seen[-1][1] == {"state": "failed"}
    assert runs.LAST_EVENTS not in last_run and "seen" not in last_run


async def test_report_html_and_model_download(served: tuple[Backends, str]) -> None:
    backends, base = served
    first = _uploaded("r3")
    await backends.publish(first)
    async with httpx.AsyncClient(base_url=base, timeout=20) as client:
        await _until(client, "/runs/r3", lambda d: True)
        r = await client.get("/runs/r3/report")
        assert r.status_code == 409 and "running" in r.json()["detail"]
        assert (await client.get("/runs/r3/model")).status_code == 409
        assert (await client.get("/runs/nope/report")).status_code == 404
        model_bytes = b"ONNX model bytes"
        backends.objects.put_bytes("optimizer/ds-r3/m1/onnx_int8.onnx", model_bytes)
        report = {"chosen_variant": "onnx_int8", "classes": ["defect", "good"], "positive_class": "defect",
                  "input": {"in_channels": 1, "input_size": 64, "mean": [0.5], "std": [0.5]},
                  "variants": {"onnx_int8": {"runtime": "onnxruntime", "threshold": {"threshold": 0.25}}}}
        await backends.publish(first.follow(ModelOptimized(
            dataset_id="ds-r3", model_id="m1", chosen_variant="onnx_int8",
            artifacts={"onnx_int8": "optimizer/ds-r3/m1/onnx_int8.onnx"}, report_key="optimizer/ds-r3/m1/report.json",
            report=report, spec_met=False, spec=SPEC)))
        await _until(client, "/runs/r3", lambda d: d["state"] == "succeeded")
        body = (await client.get("/runs/r3/report")).json()
        assert next(iter(body)) == "verdict" and body["verdict"]["met"] is False
        assert body["run_id"] == "r3" and body["dataset"]["dataset_id"] == "ds-r3"
        page = await client.get("/runs/r3/report.html")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "dlforge run r3" in page.text
        r = await client.get("/runs/r3/model")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        assert "dlforge-r3-onnx_int8.zip" in r.headers["content-disposition"]
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            assert sorted(z.namelist()) == ["model.json", "onnx_int8.onnx", "optimizer_report.json", "report.json"]
            assert z.read("onnx_int8.onnx") == model_bytes
            about = json.loads(z.read("model.json"))
            assert about["threshold"] == 0.25 and about["classes"] == ["defect", "good"]
            assert json.loads(z.read("report.json"))["verdict"] == body["verdict"]
        assert (await client.post("/runs/r3/retry")).status_code == 409  # succeeded: nothing to retry


async def test_retry_and_download_refuse_honestly(served: tuple[Backends, str]) -> None:
    backends, base = served
    # a run that failed before the run view saw its stage's input: nothing to emit again
    await backends.publish(Event.new(RunFailed(stage="labeler", reason="no manifest"), run_id="r4"))
    # a succeeded run whose model file is gone from the object store
    first = _uploaded("r5")
    await backends.publish(first)
    await backends.publish(first.follow(ModelOptimized(
        dataset_id="ds-r5", model_id="m1", chosen_variant="onnx_fp32", artifacts={"onnx_fp32": "optimizer/gone.onnx"},
        report_key="optimizer/ds-r5/m1/report.json", report={"chosen_variant": "onnx_fp32"}, spec_met=True,
        spec=SPEC)))
    async with httpx.AsyncClient(base_url=base, timeout=20) as client:
        await _until(client, "/runs/r4", lambda d: d["state"] == "failed")
        r = await client.post("/runs/r4/retry")
        assert r.status_code == 409 and "no stage input to emit again" in r.json()["detail"]
        assert (await client.get("/runs/r4")).json()["state"] == "failed"  # unchanged
        await _until(client, "/runs/r5", lambda d: d["state"] == "succeeded")
        r = await client.get("/runs/r5/model")
        assert r.status_code == 404 and "optimizer/gone.onnx" in r.json()["detail"]


def test_a_later_upload_never_moves_a_run_to_another_project() -> None:
    first = Event.new(DatasetUploaded(dataset_id="ds-a", name="cells", item_count=10, classes=["defect", "good"],
                                      labeled_count=0, rejected_count=0, duplicate_count=0, manifest_key="m.json",
                                      spec=SPEC, options=OPTIONS, project="p"), run_id="run-a")
    later = Event.new(first.payload.model_copy(update={"project": "q", "dataset_id": "ds-b"}), run_id="run-a")
    doc = runs.apply(runs.apply(None, first), later)
    assert doc["project"] == "p"
