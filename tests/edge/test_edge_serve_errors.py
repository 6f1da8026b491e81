"""``dlforge-edge serve`` when handling a request fails unexpectedly: a 500 with a short JSON body (the traceback
in the server's log, not in the answer), and the next request is served. ``/healthz`` with a query string."""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from dlforge_edge.bundle import load_bundle
from dlforge_edge.model import Decision, EdgeModel
from dlforge_edge.serve import make_server
from edge_testdata import handmade_bundle
from PIL import Image

SECRET = "internal state 0xdeadbeef"  # what the failure says: it belongs in the log, not in the answer


class FailsOnce(EdgeModel):
    """The bundle's model, whose first ``predict`` raises an error no handler expects."""

    failed = False

    def predict(self, data: bytes, *, name: str = "image") -> Decision:
        if not self.failed:
            self.failed = True
            raise RuntimeError(SECRET)
        return super().predict(data, name=name)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, int]]:
    model = FailsOnce(load_bundle(handmade_bundle(tmp_path / "bundle.zip")))
    server = make_server(model, host="127.0.0.1", port=0, timeout=30)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def ask(where: tuple[str, int], method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(*where, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def grey_png(value: int) -> bytes:
    buf = BytesIO()
    Image.new("L", (20, 20), value).save(buf, format="PNG")
    return buf.getvalue()


def test_an_unexpected_error_is_answered_500_logged_and_the_next_request_served(
        served: tuple[str, int], caplog: pytest.LogCaptureFixture) -> None:
    image = grey_png(51)
    with caplog.at_level(logging.ERROR, logger="dlforge_edge.serve"):
        status, body = ask(served, "POST", "/predict", image)
    assert status == 500
    assert list(body) == ["detail"] and SECRET not in body["detail"] and "Traceback" not in body["detail"]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(failures) == 1 and failures[0].name == "dlforge_edge.serve"
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is RuntimeError
    assert SECRET in caplog.text and "Traceback" in caplog.text

    assert ask(served, "GET", "/healthz") == (200, {"status": "ok"})
    status, body = ask(served, "POST", "/predict", image)  # the same image, now decided
    assert status == 200, body
    x = (51 / 255 - 0.5) / 0.25  # the hand-made model's logits are [x, -x]
    assert body["label"] == "dark"
    assert body["probabilities"]["bright"] == pytest.approx(1 / (1 + math.exp(-2 * x)), abs=1e-6)


@pytest.mark.parametrize("path", ["/healthz?x", "/healthz?probe=1&from=lb"])
def test_healthz_with_a_query_string_is_answered_as_healthz(served: tuple[str, int], path: str) -> None:
    assert ask(served, "GET", path) == (200, {"status": "ok"})
