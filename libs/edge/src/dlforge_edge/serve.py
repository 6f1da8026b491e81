"""A small HTTP endpoint for a bundle (standard library only), on 127.0.0.1 unless told otherwise.

- ``POST /predict``: the body is one encoded image (PNG, JPEG, ...), sent as is
  (``curl --data-binary @cell.png -H 'Content-Type: application/octet-stream' http://127.0.0.1:8080/predict``);
  the answer is the decision as JSON (label, probabilities, positive class, threshold).
- ``GET /info``: the bundle's model, variant, classes, decision rule, preprocessing and spec.
- ``GET /healthz``: ``{"status": "ok"}``.

Bad requests get a 4xx whose JSON ``detail`` says what was wrong: no length (411), a body over
:data:`MAX_BODY_BYTES` (413, refused before it is read), an empty body (400), a multipart form (415),
an image that cannot be read or is smaller than 8x8 (422), one over 64 MP (413).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dlforge_edge.model import EdgeModel, ImageRejected

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 2**20


def info(model: EdgeModel) -> dict[str, Any]:
    """What ``GET /info`` answers."""
    b = model.bundle
    return {"model_id": b.model_id, "variant": b.variant, "dataset_id": b.manifest.get("dataset_id"),
            "format_version": b.manifest.get("format_version"), "producer": b.manifest.get("producer"),
            "classes": b.classes, "positive_class": b.positive_class, "threshold": b.threshold,
            "preprocessing": asdict(b.preprocessing), "spec": b.spec,
            "spec_met": b.spec_check.get("spec_met")}


def make_server(model: EdgeModel, *, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """The server (not yet serving; ``port`` 0 picks a free one: see ``server.server_address``)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "dlforge-edge"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _refuse(self, status: int, detail: str, *, close: bool = False) -> None:
            if close:  # the body was not read: the connection cannot carry another request
                self.close_connection = True
            self._send(status, {"detail": detail})

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, {"status": "ok"})
            elif self.path == "/info":
                self._send(200, info(model))
            elif self.path == "/predict":
                self._refuse(405, "POST the image's bytes to /predict")
            else:
                self._refuse(404, f"no route {self.path!r}; routes: POST /predict, GET /info, GET /healthz")

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/predict":
                self._refuse(404, f"no route {self.path!r}; POST the image's bytes to /predict", close=True)
                return
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self._refuse(411, "send the image with a Content-Length (chunked bodies are not accepted)",
                             close=True)
                return
            length_text = self.headers.get("Content-Length")
            if length_text is None:
                self._refuse(411, "a Content-Length header is required", close=True)
                return
            try:
                length = int(length_text)
                if length < 0:
                    raise ValueError(length_text)
            except ValueError:
                self._refuse(400, f"Content-Length {length_text!r} is not a byte count", close=True)
                return
            if length > MAX_BODY_BYTES:
                self._refuse(413, f"image of {length} bytes, over the limit of {MAX_BODY_BYTES} bytes "
                             f"({MAX_BODY_BYTES // 2**20} MiB)", close=True)
                return
            data = self.rfile.read(length)
            if len(data) < length:
                self._refuse(400, f"the body ended after {len(data)} of {length} bytes", close=True)
                return
            if self.headers.get_content_type() == "multipart/form-data":
                self._refuse(415, "send the image's bytes as the body (e.g. curl --data-binary @cell.png), "
                             "not a multipart form")
                return
            if not data:
                self._refuse(400, "the body is empty: send the image's bytes")
                return
            try:
                decision = model.predict(data, name="body")
            except ImageRejected as exc:
                self._refuse(exc.status, str(exc))
                return
            self._send(200, {**decision.as_dict(), "variant": model.bundle.variant,
                             "model_id": model.bundle.model_id})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
