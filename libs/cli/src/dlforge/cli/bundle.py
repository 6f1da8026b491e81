"""``dlforge bundle RUN_ID -o FILE``: download a run's model bundle through the API.

The run view (``GET /runs/{run_id}``) says which dataset the run is on and whether its optimizer stage
has finished; ``GET /optimizer/models/{dataset_id}/bundle?run_id=…`` returns the bundle the optimizer
stored for that run's model. ``dlforge demo`` uses the same path to write the bundle beside its report.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from dlforge.common.errors import ConfigError, DlforgeError

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_run_id(run_id: str) -> str:
    """``run_id`` if it can be one (letters, digits, ``._-``, at most 200), else ConfigError saying so."""
    if not RUN_ID.match(run_id):
        raise ConfigError(f"RUN_ID {run_id!r} is not a run id (letters, digits, '.', '_' and '-', at most 200)")
    return run_id


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)


def _refused(response: httpx.Response, what: str) -> DlforgeError:
    if response.status_code in (401, 403):
        return DlforgeError(f"{what}: the API refused the request ({response.status_code}: {_detail(response)}); "
                            "set DLFORGE_TOKEN to a token with the viewer role in the run's project "
                            "(dlforge admin create-token USER --role viewer)")
    return DlforgeError(f"{what}: the API answered {response.status_code}: {_detail(response)}")


async def fetch_bundle(client: httpx.AsyncClient, run_id: str, out: Path) -> dict[str, Any]:
    """Download the model bundle of run ``run_id`` to ``out`` (streamed to a ``.partial`` file of its own beside
    it, renamed to ``out``
    once whole and its manifest read: written whole or not at all, and no ``.partial`` left on any failure).

    Returns what the report names: ``file``, ``bytes``, ``sha256``, ``dataset_id``, ``model_id``,
    ``variant``. DlforgeError for an unknown run, a run whose model is not optimized yet, a refusal, a body
    that is not a bundle, a download cut off, or a file that cannot be written.
    """
    check_run_id(run_id)
    r = await client.get(f"/runs/{quote(run_id)}")
    if r.status_code == 404:
        raise DlforgeError(f"unknown run {run_id!r}: the API has no such run ({_detail(r)})")
    if r.status_code != 200:
        raise _refused(r, f"run {run_id!r}")
    run = _run_view(r, run_id)
    stages = {name: st for name, st in (run.get("stages") or {}).items() if isinstance(st, dict)}
    optimizer = stages.get("optimizer") or {}
    dataset_id = run.get("dataset_id")
    if optimizer.get("state") != "succeeded" or not isinstance(dataset_id, str) or not dataset_id:
        at = [s for s, st in stages.items() if st.get("state") in ("running", "failed")]
        where = f"; stage {at[0]} is {stages[at[0]]['state']}" if at else ""
        raise DlforgeError(f"run {run_id!r} has no model yet: it is {run.get('state')} and its optimizer stage is "
                           f"{optimizer.get('state', 'pending')}{where}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as exc:
        raise DlforgeError(f"cannot write the bundle of run {run_id!r} to {out} ({exc})") from exc
    os.close(fd)
    partial = Path(name)  # this call's own: another download to the same file keeps its own
    try:
        async with client.stream("GET", f"/optimizer/models/{quote(str(dataset_id))}/bundle",
                                 params={"run_id": run_id}) as r:
            if r.status_code != 200:
                await r.aread()
                if r.status_code in (404, 409):
                    raise DlforgeError(f"run {run_id!r} has no model bundle: {_detail(r)}")
                raise _refused(r, f"the bundle of run {run_id!r}")
            size, digest = await _download(r, partial, out=out, run_id=run_id)
        manifest = _manifest(partial, run_id)
        try:
            partial.replace(out)
        except OSError as exc:
            raise DlforgeError(f"cannot write the bundle of run {run_id!r} to {out} ({exc})") from exc
    except BaseException:  # a refusal, a cut download, a full disk, Ctrl-C: no half-written file is left
        partial.unlink(missing_ok=True)
        raise
    return {"file": str(out), "bytes": size, "sha256": digest, "dataset_id": dataset_id,
            "model_id": manifest.get("model_id"), "variant": manifest.get("variant"),
            "format_version": manifest.get("format_version")}


def _run_view(response: httpx.Response, run_id: str) -> dict[str, Any]:
    """The run view's JSON object (DlforgeError, not a traceback, when the answer is not one: a proxy's error
    page, a cut body, another service on the port)."""
    try:
        run = response.json()
    except ValueError as exc:
        raise DlforgeError(f"run {run_id!r}: the API's answer is not JSON ({_detail(response)[:80]!r}); is "
                           "DLFORGE_API the dlforge API?") from exc
    if not isinstance(run, dict) or not isinstance(run.get("stages", {}), dict):
        raise DlforgeError(f"run {run_id!r}: the API's answer is not a run view ({json.dumps(run)[:60]})")
    return run


async def _download(response: httpx.Response, partial: Path, *, out: Path, run_id: str) -> tuple[int, str]:
    """Stream ``response``'s body to ``partial``: its size and sha256."""
    digest, size = hashlib.sha256(), 0
    try:
        with partial.open("wb") as f:
            async for chunk in response.aiter_bytes():
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise DlforgeError(f"cannot write the bundle of run {run_id!r} to {out} ({exc})") from exc
    except httpx.TransportError as exc:
        raise DlforgeError(f"the bundle of run {run_id!r} did not arrive whole ({exc}); nothing was written to "
                           f"{out}") from exc
    return size, digest.hexdigest()


def _manifest(bundle: Path, run_id: str) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(bundle) as z:
            manifest = json.loads(z.read("manifest.json"))
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, ValueError) as exc:
        raise DlforgeError(f"the bundle of run {run_id!r} the API sent is not a bundle ({exc})") from exc
    if not isinstance(manifest, dict):
        raise DlforgeError(f"the bundle of run {run_id!r} the API sent is not a bundle (its manifest.json is "
                           f"{json.dumps(manifest)[:40]}, not a JSON object)")
    return manifest


def bundle_downloader(out: Path, into: dict[str, Any]) -> Callable[[httpx.AsyncClient, dict[str, Any]],
                                                                   Awaitable[None]]:
    """The ``after`` hook of :func:`dlforge.cli.pipeline.run_in_process` that writes a succeeded run's bundle
    to ``out`` and puts what the report names into ``into`` (``error`` instead when it could not)."""

    async def download(client: httpx.AsyncClient, run: dict[str, Any]) -> None:
        if run.get("state") != "succeeded":
            return
        try:
            into.update(await fetch_bundle(client, run["run_id"], out))
        except DlforgeError as exc:  # the run's report is still written, saying what went wrong
            into.update({"file": None, "error": str(exc)})

    return download
