"""Benchmark of ``POST /labels``: many people labeling at once, over HTTP, none lost.

    python benchmarks/labels.py [--submissions 1000] [--concurrency 50] [--items 1100] [--rounds 1]

A real uvicorn server (``python -m dlforge.labeler``, the labeler app with its worker) listens on
127.0.0.1 in a child process, on the embedded default backends: SQLite documents, file objects
and the default bus, all under a fresh temporary folder. The benchmark uploads ``--items`` small
generated images with a label budget of 100 % and a seed fraction of 100 %, so the first batch
asks people for every item, and waits until that batch is open. Then ``--concurrency`` clients
send ``--submissions`` label submissions (one item each, every item once, each client over its
own HTTP/1.1 keep-alive connection: a minimal asyncio client, since ``httpx`` costs as much CPU per
request as the server on this shared 2-core machine) and the latency of each is measured from send to response.

Afterwards it waits until the worker has applied every accepted submission and reads the labels
back (``GET /datasets/{id}/labels``): ``lost`` counts 202s whose label is not there, ``stored_once``
whether each item holds exactly the one label sent, once (no duplicated history), and the record's
``counts.human`` must equal the submissions. ``--rounds N`` repeats the measurement on N fresh
servers (each its own data set) and reports each run and the median. ``--compare CHECKOUT`` runs
the server from another source tree too (e.g. ``git archive BASE libs services`` unpacked), round
by round interleaved with this one: code from before the label log has no ``GET .../labels``, so
there only the record's ``counts.human`` is read back (``stored once`` n/a).

Auth is on, as in a deployment: before the server starts, an operator (who uploads and reads) and
one labeler account per client are created in its document store, each with an API token; every
request carries its client's token, and the labels are the token's user's (no ``annotator`` sent).
The per-token rate limit is raised through the settings (``DLFORGE_AUTH_RATE``/``BURST``), so what
is measured is the cost of the checks, not the limit.

Prints a table and writes ``benchmarks/results/labels.json`` with ``requests_per_second``,
``p50_ms``, ``p99_ms``, ``lost``, the CPU name and the load average (a busy shared machine
slows both the server and the clients, which share its cores).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from machine import cpu_name
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("good", "defect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def images_zip(n: int, seed: int) -> bytes:
    """``n`` distinct 16x16 grey PNGs in a flat zip (no labels: people give them)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(n):
            arr = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            png = io.BytesIO()
            Image.fromarray(arr, mode="L").save(png, format="PNG")
            zf.writestr(f"cell-{i:05d}.png", png.getvalue())
    return buf.getvalue()


def python_path(root: Path) -> str:
    paths = [str(p) for p in sorted((root / "libs").glob("*/src")) + sorted((root / "services").glob("*/src"))]
    return os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])


class Server:
    """The labeler (API + worker) in a child process on 127.0.0.1, on embedded backends under ``folder``."""

    def __init__(self, folder: Path, *, root: Path = ROOT, profile: Path | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": python_path(root),
            "DLFORGE_HTTP_HOST": "127.0.0.1",
            "DLFORGE_HTTP_PORT": str(self.port),
            "DLFORGE_OBJECTS": f"file://{folder}/objects",
            "DLFORGE_DOCS": f"sqlite:///{folder}/docs.db",
            "DLFORGE_WORK_DIR": str(folder / "work"),
            "DLFORGE_LABELER_EMBED_SIZE": "64",  # the images are 16 px; embedding is set-up, not measured
            "DLFORGE_AUTH": "required",
            "DLFORGE_AUTH_RATE": "1000000",  # 50 people at full speed: the limit is not what is measured
            "DLFORGE_AUTH_BURST": "1000000",
        }
        self.log = (folder / "server.log").open("wb")
        wrap = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        self.proc = subprocess.Popen([sys.executable, *wrap, "-m", "dlforge.labeler"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)

    async def ready(self, client: httpx.AsyncClient, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if (await client.get(f"{self.base}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the server did not get ready in {timeout} s")

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class KeepAlive:
    """One HTTP/1.1 keep-alive connection that POSTs JSON: a client light enough not to be what is measured
    (``httpx`` spends several CPU milliseconds per request, as much as the server on this path)."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port, self.token = host, port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                          f"Authorization: Bearer {self.token}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = dict(h.split(":", 1) for h in head[1:] if ":" in h)
        length = int(next(v for k, v in headers.items() if k.strip().lower() == "content-length"))
        payload = await self.reader.readexactly(length)
        if any(k.strip().lower() == "connection" and v.strip().lower() == "close" for k, v in headers.items()):
            await self.close()
        return status, json.loads(payload)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
            self.writer = None


async def wait_for(what: str, probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise RuntimeError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def accounts(folder: Path, people: int) -> tuple[str, list[str]]:
    """An operator's token and one labeler's token per person, made in the server's document store."""
    from dlforge.common.auth import AuthStore
    from dlforge.common.docs.sqlite import SqliteDocumentStore

    docs = SqliteDocumentStore(folder / "docs.db")
    store = AuthStore(docs)
    await store.ensure_indexes()
    made: list[str] = []
    for name, grants in [("bench-operator", {"default": "operator"}),
                         *((f"person-{k}", {"default": "labeler"}) for k in range(people))]:
        await store.create_user(name, password=secrets.token_urlsafe(12), grants=grants)
        token, _ = await store.issue_token(name, kind="api", name="benchmark", grants=None, expires_at=None)
        made.append(token)
    await docs.close()
    return made[0], made[1:]


async def one_run(args: argparse.Namespace, seed: int, root: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dlforge-labels-") as tmp:
        operator, labelers = await accounts(Path(tmp), args.concurrency)
        server = Server(Path(tmp), root=root, profile=args.profile)
        try:
            limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
            async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=60,
                                         headers={"Authorization": f"Bearer {operator}"}) as client:
                await server.ready(client)
                return await measure(client, args, seed, server, labelers)
        finally:
            server.stop()


async def measure(client: httpx.AsyncClient, args: argparse.Namespace, seed: int, server: Server,
                  labelers: list[str]) -> dict[str, Any]:
    options = {"label_budget": 1.0, "seed_fraction": 1.0, "batch_fraction": 0.05, "seed": seed}
    r = await client.post("/datasets", files={"file": ("cells.zip", images_zip(args.items, seed))},
                          data={"options": json.dumps(options), "name": "labels-benchmark"})
    r.raise_for_status()
    dataset_id = r.json()["dataset_id"]

    async def labeling() -> dict[str, Any] | None:
        record: dict[str, Any] = (await client.get(f"/datasets/{dataset_id}")).json()
        if record["state"] == "failed":
            raise RuntimeError(f"the dataset failed: {record.get('error')}")
        return record if record["state"] == "labeling" else None

    await wait_for("the first batch", labeling, timeout=600)
    queue = (await client.get(f"/datasets/{dataset_id}/queue")).json()
    items = [i["item_id"] for i in queue["items"]]
    if len(items) < args.submissions:
        raise RuntimeError(f"the first batch asks {len(items)} items, fewer than {args.submissions} submissions")
    rng = np.random.default_rng(seed)
    sent = {item: CLASSES[int(rng.integers(2))] for item in items[:args.submissions]}
    work: asyncio.Queue[str] = asyncio.Queue()
    for item in sent:
        work.put_nowait(item)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted: dict[str, int] = {}

    connections = [KeepAlive("127.0.0.1", server.port, labelers[k]) for k in range(args.concurrency)]

    async def annotator(k: int) -> None:
        while not work.empty():
            item = work.get_nowait()
            body = {"dataset_id": dataset_id, "batch_id": queue["batch_id"], "labels": {item: sent[item]}}
            started = time.perf_counter()
            status, answer = await connections[k].post_json("/labels", body)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 202:
                accepted[item] = answer.get("sequence", 0)  # code from before the label log has none

    server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(annotator(k) for k in range(args.concurrency)))
    wall = time.perf_counter() - started
    server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
    for c in connections:
        await c.close()

    async def applied() -> dict[str, Any] | None:
        r = await client.get(f"/datasets/{dataset_id}/labels", params={"limit": 100_000})
        if r.status_code == 404:  # code from before the label log: the record's count is all there is
            record: dict[str, Any] = (await client.get(f"/datasets/{dataset_id}")).json()
            return {"items": None} if record["counts"]["human"] >= len(accepted) else None
        got: dict[str, Any] = r.json()
        return got if got["pending"] == 0 else None

    waited = time.perf_counter()
    try:
        got = await wait_for("every accepted label applied", applied, timeout=args.apply_timeout)
    except RuntimeError:
        got = {"items": None}
    apply_s = time.perf_counter() - waited
    record = (await client.get(f"/datasets/{dataset_id}")).json()
    if got["items"] is None:  # only the count can be read back
        lost = max(0, len(accepted) - int(record["counts"]["human"]))
        stored_once = None
    else:
        by_item = {i["item_id"]: i for i in got["items"]}
        lost = sum(1 for item in accepted if item not in by_item or by_item[item]["label"] != sent[item])
        stored_once = all(len(by_item[i]["history"]) == 1 for i in accepted if i in by_item) \
            and set(by_item) == set(accepted) and record["counts"]["human"] == len(accepted)
    ms = np.array(latencies) * 1000
    return {
        "submissions": len(sent), "accepted": len(accepted), "statuses": statuses,
        "requests_per_second": round(len(latencies) / wall, 1), "wall_s": round(wall, 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2),
        "lost": lost, "stored_once": stored_once, "record_human": record["counts"]["human"],
        "applied_after_s": round(apply_s, 3),
        # CPU time per request while the requests ran: the server's (API and worker) and the clients'
        "server_cpu_ms_per_request": round(server_cpu * 1000 / len(latencies), 3),
        "client_cpu_ms_per_request": round(client_cpu * 1000 / len(latencies), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--items", type=int, default=1100, help="images in the data set (>= submissions)")
    parser.add_argument("--rounds", type=int, default=1, help="measurements, each on a fresh server")
    parser.add_argument("--out", type=Path, default=RESULTS / "labels.json")
    parser.add_argument("--profile", type=Path, default=None, help="write the server's cProfile stats here")
    parser.add_argument("--apply-timeout", type=float, default=120, help="seconds to wait for the labels to apply")
    parser.add_argument("--compare", type=Path, default=None, metavar="CHECKOUT",
                        help="also run the server from another checkout (e.g. before a change), interleaved with "
                        "this one, run for run")
    args = parser.parse_args()
    variants = {"this": ROOT, **({"compare": args.compare.resolve()} if args.compare else {})}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for seed in range(args.rounds):  # interleaved: each round runs every variant once
        for name, root in variants.items():
            runs[name].append(asyncio.run(one_run(args, seed, root)))
    head = ("code", "run", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "202s", "lost", "stored once",
            "applied after s", "server CPU ms/req", "client CPU ms/req")
    rows = [(name, str(i + 1), f"{r['requests_per_second']:.0f}", f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}",
             f"{r['p99_ms']:.1f}", f"{r['max_ms']:.1f}", f"{r['accepted']}/{r['submissions']}", str(r["lost"]),
             "n/a" if r["stored_once"] is None else str(r["stored_once"]), f"{r['applied_after_s']:.2f}",
             f"{r['server_cpu_ms_per_request']:.2f}", f"{r['client_cpu_ms_per_request']:.2f}")
            for name, rs in runs.items() for i, r in enumerate(rs)]
    widths = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(head)]
    print(f"POST /labels: {args.submissions} submissions, {args.concurrency} concurrent, over HTTP "
          f"(uvicorn on 127.0.0.1, embedded backends); CPU {cpu_name()}, load {os.getloadavg()[0]:.2f}")
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {**{k: statistics.median(r[k] for r in rs) for k in ("requests_per_second", "p50_ms", "p99_ms",
                                                                      "server_cpu_ms_per_request")},
                "lost": sum(r["lost"] for r in rs),
                "stored_once": all(r["stored_once"] for r in rs) if all(r["stored_once"] is not None for r in rs)
                else None}

    mine = summary(runs["this"])
    result = {
        "benchmark": "labels", "submissions": args.submissions, "concurrency": args.concurrency,
        "items": args.items, "cpu": cpu_name(), "load_average": [round(x, 2) for x in os.getloadavg()],
        **mine, "targets": {"requests_per_second": 500, "p99_ms": 100}, "runs": runs["this"],
    }
    if args.compare:
        before = summary(runs["compare"])
        result["compare"] = {"checkout": str(args.compare), **before, "runs": runs["compare"],
                             "requests_per_second_ratio": round(mine["requests_per_second"]
                                                                / before["requests_per_second"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median of {args.rounds}: {mine['requests_per_second']:.0f} req/s, p99 {mine['p99_ms']:.1f} ms, "
          f"lost {mine['lost']}" + (f"; {result['compare']['requests_per_second_ratio']}x the requests/s of "
                                     f"{args.compare}" if args.compare else "") + f"; wrote {args.out}")


if __name__ == "__main__":
    main()
