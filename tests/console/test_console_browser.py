"""The console in a real browser (Playwright driving the system Chromium) against ``dlforge up``.

One server for the module: ``dlforge up`` in its own process on 127.0.0.1 with embedded backends in a
tmp dir, auth required (an operator and a labeler of the default project, made with ``dlforge admin
create-user``), and 240 ELPV cells in a folder under the import roots; no simulated annotator, so the
run waits for people. The tests sign in through the form, start a run through the start form, label
20 items with the keyboard on the labeling page (the rest through the API), watch the stage graph
reach the optimizer, open the report, download the model and try it; a labeler's start is refused
(403). Every page is saved as a screenshot under ``reports/screenshots/`` (gitignored).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dlforge.common.events import MAX_HPO_TRIALS, PipelineOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for p in (ROOT / "libs").glob("*/src")] + [p for p in (ROOT / "services").glob("*/src")]
SHOTS = ROOT / "reports" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TRACE_URL = "http://127.0.0.1:16686/trace/{trace_id}"
# people of the default project: an operator (starts runs) and a labeler (labels only)
OPERATOR = ("olga", "olga-operates-1")
LABELER = ("lars", "lars-labels-1")


@dataclass
class Console:
    url: str
    folder: Path
    truth: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes]
    token: str = ""  # the operator's, for the test's own API calls

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.token}"})

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _until(what: str, check: Any, *, timeout: float, every: float = 0.25, console: Console | None = None) -> Any:
    """Call ``check()`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\nserver log:\n{console.log_tail()}" if console else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(every)  # the poll interval of a wait with a deadline, not a proof that nothing happened


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    if not os.access(CHROMIUM, os.X_OK):
        why = f"no {CHROMIUM}: apt-get install chromium chromium-driver (scripts/install-system.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    from dlforge.labeler.demo_data import materialize_elpv

    tmp = tmp_path_factory.mktemp("console")
    folder = tmp / "imports" / "elpv"
    truth = materialize_elpv(folder, limit=240)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLFORGE_", "OTEL_"))}
    env.update({
        "DLFORGE_BUS": "memory://", "DLFORGE_OBJECTS": f"file://{tmp}/objects", "DLFORGE_DOCS": f"sqlite:///{tmp}/docs.db",
        "DLFORGE_WORK_DIR": str(tmp / "work"), "DLFORGE_TUNER_STORAGE": f"sqlite:///{tmp}/tuner.db",
        "DLFORGE_HTTP_HOST": "127.0.0.1", "DLFORGE_HTTP_PORT": str(port), "DLFORGE_POLL_SECONDS": "0.2",
        "DLFORGE_LABELER_IMPORT_ROOTS": str(tmp / "imports"), "DLFORGE_OPTIMIZER_ROUNDS": "1",
        "DLFORGE_AUTH": "required", "DLFORGE_CONSOLE_TRACE_URL": TRACE_URL,
    })
    env["PYTHONPATH"] = os.pathsep.join([*map(str, SOURCES), env.get("PYTHONPATH", "")])
    for (name, password), role in ((OPERATOR, "operator"), (LABELER, "labeler")):
        made = subprocess.run([sys.executable, "-m", "dlforge.cli.main", "admin", "create-user", name, "--project",
                               "default", "--role", role], env=env, cwd=tmp, input=f"{password}\n", text=True,
                              capture_output=True, timeout=120)
        assert made.returncode == 0, made.stderr
    log = tmp / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dlforge.cli.main", "up"], env=env, cwd=tmp, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Console(url=f"http://127.0.0.1:{port}", folder=folder, truth=truth, log=log, proc=proc)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"dlforge up exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            return httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _until("dlforge up to answer /readyz", ready, timeout=300, console=server)
        login = httpx.post(f"{server.url}/auth/login", json={"username": OPERATOR[0], "password": OPERATOR[1]},
                           timeout=30)
        assert login.status_code == 200, login.text
        server.token = login.json()["token"]
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


def sign_in(pg: Any, console: Console, who: tuple[str, str], shots: Path | None = None) -> None:
    """Through the sign-in form, as a person would; lands on the runs list."""
    pg.goto(f"{console.url}/console/#/runs")
    pg.wait_for_url(re.compile(r"#/signin"))
    pg.fill("#username", who[0])
    pg.fill("#password", who[1])
    if shots is not None:
        pg.screenshot(path=str(shots / "signin.png"), full_page=True)
    pg.click("#signin button[type=submit]")
    pg.wait_for_url(re.compile(r"/console/#/runs$"))
    assert pg.locator("#who .user").inner_text() == who[0]


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1300, "height": 900})
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: Any, console: Console, shots: Path) -> Iterator[Any]:
    """A fresh browser context signed in as the operator through the sign-in form."""
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(pg, console, OPERATOR, shots)
    yield pg
    assert not errors, f"script errors on the page: {errors}"


def test_the_start_form_takes_its_fields_from_the_api_and_shows_refusals(page: Any, console: Console,
                                                                         shots: Path) -> None:
    page.goto(f"{console.url}/console/#/runs/new")
    trials = page.locator("#opt-hpo_trials")
    trials.wait_for(state="attached")
    # defaults and bounds come from PipelineOptions through /openapi.json
    assert trials.get_attribute("min") == "1" and trials.get_attribute("max") == str(MAX_HPO_TRIALS)
    assert trials.input_value() == str(PipelineOptions().hpo_trials)
    assert "each trial trains a model" in page.locator("#opt-hpo_trials-help").text_content()
    assert page.locator("#opt-auto_label_all").is_checked() is False
    assert page.locator("#spec-input_size").get_attribute("max") == "4096"
    assert page.locator("#project").input_value() == "default"

    # a folder outside the import roots: the server's 403 shows next to the form, as text, nothing starts
    page.check("#source-folder")
    page.fill("#folder", "/etc/<img src=x>")
    page.click("#start")
    error = page.locator("#start-error")
    error.get_by_text("outside the allowed import roots").wait_for(timeout=15_000)
    assert "403" in error.inner_text() and "'/etc/<img src=x>'" in error.inner_text()
    assert error.locator("img").count() == 0  # the path the server echoed is text, not markup
    assert "#/runs/new" in page.url

    # a bad positive class: the server's 422 names the field, shown under it
    page.fill("#folder", str(console.folder))
    page.fill("#spec-positive_class", "a/b")
    page.click("#start")
    page.locator("#spec-positive_class-error").filter(has_text="not a valid class name").wait_for(timeout=15_000)
    assert "422" in error.inner_text()
    page.screenshot(path=str(shots / "start-refused.png"), full_page=True)
    with console.api() as api:
        assert api.get("/runs").json() == []  # neither refusal started a run


def _label_waiting_batch(console: Console, dataset_id: str) -> int:
    """Label every item of the waiting batch through the API with the true labels; the number labeled."""
    with console.api() as api:
        queue = api.get(f"/labeler/datasets/{dataset_id}/queue").json()
        if not queue.get("batch_id") or not queue["items"]:
            return 0
        labels = {item["item_id"]: console.truth[item["name"]] for item in queue["items"]}
        response = api.post("/labeler/labels", json={"dataset_id": dataset_id, "batch_id": queue["batch_id"],
                                                     "labels": labels})
        assert response.status_code == 202, response.text
        return len(labels)


def test_a_run_from_the_form_through_the_graph_to_the_report(page: Any, console: Console, shots: Path) -> None:
    page.goto(f"{console.url}/console/#/runs")
    page.get_by_text("No runs yet.").wait_for()
    page.screenshot(path=str(shots / "runs-empty.png"), full_page=True)

    # start the run through the form
    page.goto(f"{console.url}/console/#/runs/new")
    page.check("#source-folder")
    page.fill("#folder", str(console.folder))
    page.fill("#name", "elpv <b>small</b>")  # shown as text wherever it appears
    page.fill("#classes", "defect, good")
    page.fill("#spec-positive_class", "defect")
    page.fill("#spec-min_recall", "0.9")
    page.fill("#spec-min_accuracy", "0.5")
    page.fill("#spec-min_fps", "1")
    page.click("details summary")
    for name, value in {"hpo_trials": "2", "train_epochs": "1", "min_per_class": "120", "seed_fraction": "0.1",
                        "batch_fraction": "0.05"}.items():
        page.fill(f"#opt-{name}", value)
    page.check("#opt-auto_label_all")
    page.screenshot(path=str(shots / "start.png"), full_page=True)
    page.click("#start")
    page.wait_for_url(re.compile(r"/console/#/runs/(?!new$)[^/]+$"), timeout=60_000)
    run_id = page.url.rsplit("/", 1)[-1]
    with console.api() as api:
        dataset_id = _until("the run's record", lambda: api.get(f"/runs/{run_id}").json().get("dataset_id"),
                            timeout=30, console=console)
        assert api.get(f"/labeler/datasets/{dataset_id}").json()["name"] == "elpv <b>small</b>"

    # the labeler waits for people: the run page links to labeling
    page.locator("#label-link").wait_for(timeout=120_000)
    assert page.locator("#stage-graph g[data-stage='labeler']").get_attribute("data-state") == "running"
    with console.api() as api:
        trace_id = api.get(f"/runs/{run_id}").json()["trace_id"]
    assert trace_id and page.locator("#trace-link").get_attribute("href") == TRACE_URL.format(trace_id=trace_id)
    page.screenshot(path=str(shots / "run-labeling.png"), full_page=True)

    # a person labels 20 items with the keyboard only: the digit of the right class on each
    page.click("#label-link")
    page.wait_for_selector("#label-image", timeout=60_000)
    page.screenshot(path=str(shots / "label.png"), full_page=True)
    given: dict[str, str] = {}
    for _ in range(20):
        item = page.get_attribute("#label-image", "data-item")
        name = page.text_content("#label-name")
        assert item and name
        classes = page.eval_on_selector_all("#label-classes button[data-class]", "els => els.map(e => e.dataset.class)")
        page.keyboard.press(str(classes.index(console.truth[name]) + 1))
        page.wait_for_function("item => document.querySelector('#label-image')?.dataset.item !== item", arg=item)
        given[item] = console.truth[name]
    with console.api() as api:
        def stored() -> bool:
            items = api.get(f"/labeler/datasets/{dataset_id}/labels").json()["items"]
            have = {i["item_id"]: i["label"] for i in items}
            return all(have.get(item) == label for item, label in given.items())

        _until("the 20 labels from the page to be stored", stored, timeout=60, console=console)
    page.goto(f"{console.url}/console/#/runs/{run_id}")

    # people label the rest of every batch (through the API) until the labeler is done
    labeled = len(given)

    def labeler_done() -> bool:
        nonlocal labeled
        with console.api() as api:
            state = api.get(f"/runs/{run_id}").json()
        if state["state"] != "running":
            pytest.fail(f"the run {state['state']} while labeling: {state.get('failure')}")
        if state["stages"]["labeler"]["state"] == "succeeded":
            return True
        labeled += _label_waiting_batch(console, dataset_id)
        return False

    _until("the labeler to finish", labeler_done, timeout=300, every=0.5, console=console)
    assert labeled > 20

    # the graph follows the run to the optimizer
    optimizer = page.locator("#stage-graph g[data-stage='optimizer']")
    page.wait_for_function(
        "() => ['running', 'succeeded'].includes(document.querySelector(\"#stage-graph g[data-stage='optimizer']\")"
        "?.dataset.state)", timeout=600_000)
    for stage in ("labeler", "augmenter", "proposer", "tuner", "trainer"):
        assert page.locator(f"#stage-graph g[data-stage='{stage}']").get_attribute("data-state") == "succeeded"
    page.screenshot(path=str(shots / "run-graph.png"), full_page=True)
    page.wait_for_function("() => document.querySelector('#run-state')?.textContent !== 'running'", timeout=600_000)
    assert page.locator("#run-state").inner_text() == "succeeded", page.locator("#failure").inner_text()
    assert optimizer.get_attribute("data-state") == "succeeded"
    page.click("#view-tree")
    tuner_row = page.locator("details.tl-row[data-stage='tuner']")
    tuner_row.locator("summary").click()
    assert tuner_row.locator("table.events td", has_text="hpo.completed").count() == 1
    page.screenshot(path=str(shots / "run-timeline.png"), full_page=True)

    # the report: the verdict first, agreeing with the run
    with console.api() as api:
        final = api.get(f"/runs/{run_id}").json()
    page.click("#report-link")
    head = page.locator("#verdict-head")
    head.wait_for(timeout=60_000)
    assert head.inner_text().startswith("The spec is met" if final["spec_met"] else "The spec is not met")
    assert page.locator("#plots figure").count() >= 3
    assert page.locator("#trials tbody tr").count() == 2
    with console.api() as api:
        served = api.get(f"/runs/{run_id}/report").json()
    reasons = page.locator("#verdict-reasons li").all_inner_texts()
    assert reasons == served["verdict"]["reasons"] and reasons  # every reason, in full
    # each trial's validation loss (the tie-break between equal accuracies), as the tuner recorded it
    losses = [t["val_loss"] for t in served["trials"]]
    assert all(isinstance(v, float) and v > 0 for v in losses), losses
    assert page.locator("#trials tbody tr td:nth-child(4)").all_inner_texts() == [f"{v:.4f}" for v in losses]
    # the head names the server's status: met on the point estimates only is neither "met" nor "not met"
    assert head.inner_text() == {"met": "The spec is met with 95 % confidence",
                                 "met_point_estimate": "The spec is met on the point estimates only",
                                 "not_met": "The spec is not met"}[served["verdict"]["status"]]
    page.screenshot(path=str(shots / "report.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#download-model")
    with zipfile.ZipFile(download.value.path()) as zf:
        names = zf.namelist()
        assert json.loads(zf.read("report.json"))["verdict"] == served["verdict"]
    assert any(n.endswith(".onnx") for n in names), names
    with page.expect_download() as download:
        page.click("#download-json")
    assert json.loads(Path(download.value.path()).read_text()) == served

    # the model page classifies an uploaded cell
    page.click("text=Try the model")
    page.locator("#image").set_input_files(str(console.folder / sorted(console.truth)[0]))
    page.click("#predict")
    page.locator("#predicted").wait_for(timeout=60_000)
    assert page.locator("#predicted").inner_text().split(" — ")[0] in {"defect", "good"}
    cam = page.locator("#cam")
    assert cam.evaluate("img => img.complete && img.naturalWidth > 0")  # the class activation map decoded
    page.screenshot(path=str(shots / "model.png"), full_page=True)

    # the runs list shows the finished run with its timing
    page.goto(f"{console.url}/console/#/runs")
    row = page.locator(f"tr[data-run='{run_id}']")
    row.wait_for()
    assert "succeeded" in row.inner_text()
    page.screenshot(path=str(shots / "runs.png"), full_page=True)

    # re-run with a changed option: a new run on the same images; this one stays
    page.goto(f"{console.url}/console/#/runs/{run_id}")
    page.click("#rerun-open")
    page.locator("#rerun-opt-hpo_trials").wait_for()
    assert page.locator("#rerun-opt-hpo_trials").input_value() == "2"  # the run's own options, not the defaults
    page.fill("#rerun-opt-hpo_trials", "1")
    page.screenshot(path=str(shots / "run-rerun.png"), full_page=True)
    page.click("#rerun-submit")
    page.wait_for_url(re.compile(rf"/console/#/runs/(?!{run_id}$)[^/]+$"), timeout=60_000)
    rerun_id = page.url.rsplit("/", 1)[-1]
    with console.api() as api:
        rerun = _until("the re-run's record", lambda: api.get(f"/runs/{rerun_id}").json().get("options"),
                       timeout=60, console=console)
        assert rerun["hpo_trials"] == 1 and rerun["train_epochs"] == 1
        assert api.get(f"/runs/{run_id}").json()["state"] == "succeeded"
    page.locator("#cancel").click()  # people would label it; the test stops it
    page.wait_for_function("() => document.querySelector('#run-state')?.textContent === 'cancelled'", timeout=60_000)



def test_a_zip_upload_from_the_form_then_cancel_and_delete(page: Any, console: Console, shots: Path,
                                                            tmp_path: Path) -> None:
    archive = tmp_path / "cells.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in sorted(console.truth)[:60]:
            zf.write(console.folder / name, arcname=f"cells/{name}")
    page.goto(f"{console.url}/console/#/runs/new")
    page.locator("#zip").set_input_files(str(archive))
    page.fill("#spec-positive_class", "defect")
    page.click("#start")
    page.wait_for_url(re.compile(r"/console/#/runs/(?!new$)[^/]+$"), timeout=60_000)
    run_id = page.url.rsplit("/", 1)[-1]
    with console.api() as api:
        dataset_id = _until("the run's record", lambda: api.get(f"/runs/{run_id}").json().get("dataset_id"),
                            timeout=30, console=console)
        record = api.get(f"/labeler/datasets/{dataset_id}").json()
    assert (record["source"], record["name"], record["counts"]["items"]) == ("zip", "cells", 60)
    page.locator("#cancel").wait_for(timeout=60_000)
    page.click("#cancel")
    page.wait_for_function("() => document.querySelector('#run-state')?.textContent === 'cancelled'", timeout=60_000)
    assert "cancelled in the console" in page.locator("#run-head").inner_text()
    page.screenshot(path=str(shots / "run-cancelled.png"), full_page=True)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete")
    page.wait_for_url(re.compile(r"/console/#/runs$"), timeout=30_000)
    with console.api() as api:
        _until("the run to be deleted", lambda: api.get(f"/runs/{run_id}").status_code == 404, timeout=60,
               console=console)


def test_a_labeler_cannot_start_a_run(browser: Any, console: Console, shots: Path) -> None:
    ctx = browser.new_context(viewport={"width": 1300, "height": 900})
    try:
        pg = ctx.new_page()
        sign_in(pg, console, LABELER)
        pg.goto(f"{console.url}/console/#/runs/new")
        pg.locator("#project-role").get_by_text("needs the operator role").wait_for()
        pg.check("#source-folder")
        pg.fill("#folder", str(console.folder))
        with console.api() as api:
            before = {r["run_id"] for r in api.get("/runs").json()}
        pg.click("#start")
        error = pg.locator("#start-error")
        error.locator(".status-code").wait_for(timeout=30_000)
        assert error.inner_text().startswith("403") and "null" not in error.inner_text()
        pg.screenshot(path=str(shots / "start-forbidden.png"), full_page=True)
        assert "#/runs/new" in pg.url
        with console.api() as api:
            assert {r["run_id"] for r in api.get("/runs").json()} == before  # nothing started
    finally:
        ctx.close()
