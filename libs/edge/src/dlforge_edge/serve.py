"""A small HTTP endpoint for a bundle (standard library only), on 127.0.0.1 unless told otherwise.

- ``POST /predict``: the body is one encoded image (PNG, JPEG, ...), sent as is
  (``curl --data-binary @cell.png -H 'Content-Type: application/octet-stream' http://127.0.0.1:8080/predict``);
  the answer is the decision as JSON (label, probabilities, positive class, threshold).
- ``GET /info``: the bundle's model, variant, classes, decision rule, preprocessing and spec.
- ``GET /healthz``: ``{"status": "ok"}``.

A query string does not change the route (``/healthz?x`` is ``/healthz``). An error the handler does not expect
is answered 500 with a short JSON ``detail`` (its traceback goes to the log, not to the client) and the
connection is closed; the server goes on serving.

Bad requests get a 4xx whose JSON ``detail`` says what was wrong: no length (411), a body over
:data:`MAX_BODY_BYTES` (413, refused before it is read), an empty body (400), a multipart form (415),
an image that cannot be read or is smaller than 8x8 (422), one over 64 MP (413). A connection that
sends nothing for :data:`TIMEOUT_SECONDS` (a request or body that stops half-way) is closed, so a
stalled client does not hold a thread for ever.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dlforge_edge.model import EdgeModel, ImageRejected

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 2**20
TIMEOUT_SECONDS = 30.0


def info(model: EdgeModel) -> dict[str, Any]:
    """What ``GET /info`` answers."""
    b = model.bundle
    return {"model_id": b.model_id, "variant": b.variant, "dataset_id": b.manifest.get("dataset_id"),
            "format_version": b.manifest.get("format_version"), "producer": b.manifest.get("producer"),
            "classes": b.classes, "positive_class": b.positive_class, "threshold": b.threshold,
            "preprocessing": asdict(b.preprocessing), "spec": b.spec,
            "spec_met": b.spec_check.get("spec_met")}


def make_server(model: EdgeModel, *, host: str = "127.0.0.1", port: int = 8080,
                timeout: float = TIMEOUT_SECONDS) -> ThreadingHTTPServer:
    """The server (not yet serving; ``port`` 0 picks a free one: see ``server.server_address``).

    ``timeout``: seconds a connection may stay silent (while sending its request or body, or idle between
    requests) before it is closed.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds (got {timeout})")
    seconds = timeout

    class Handler(BaseHTTPRequestHandler):
        server_version = "dlforge-edge"
        protocol_version = "HTTP/1.1"
        timeout = seconds  # the socket's: a silent client's read raises TimeoutError and the connection is closed
        answered = False  # whether the answer to the request being handled has begun (set by _send)

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.answered = True
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _refuse(self, status: int, detail: str, *, close: bool = False) -> None:
            if close:  # the body was not read: the connection cannot carry another request
                self.close_connection = True
            self._send(status, {"detail": detail})

        def _guarded(self, handle: Callable[[], None]) -> None:
            """``handle()``; an error it does not expect is logged with its traceback and answered 500 (its text
            is not sent), and the connection closed. A stalled or vanished client still just ends the connection."""
            self.answered = False
            try:
                handle()
            except (TimeoutError, ConnectionError):
                raise
            except Exception:
                log.exception("%s %s: unexpected error", self.command, self.path)
                self.close_connection = True  # where the request's body stands is not known
                if not self.answered:  # else part of an answer is out: the connection is closed mid-way
                    self._send(500, {"detail": "internal error while handling the request (the server's log "
                                               "has the details)"})

        def do_GET(self) -> None:
            self._guarded(self._get)

        def do_POST(self) -> None:
            self._guarded(self._post)

        def _get(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, {"status": "ok"})
            elif path == "/info":
                self._send(200, info(model))
            elif path == "/predict":
                self._refuse(405, "POST the image's bytes to /predict")
            else:
                self._refuse(404, f"no route {self.path!r}; routes: POST /predict, GET /info, GET /healthz")

        def _post(self) -> None:
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
