"""``python -m dlforge.common.check_settings``: fail fast on bad settings, before a service starts.

Loads the settings from the environment, opens the three backends and (unless ``--no-connect``)
reaches each of them. Exit status 0 when all is well; 2 with the problem, naming the variable
(``DLFORGE_BUS``, ``DLFORGE_OBJECTS``, ``DLFORGE_DOCS``, ...), on standard error otherwise.
Usable as a container init step or a Kubernetes init container.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from urllib.parse import urlsplit, urlunsplit

from dlforge.common.errors import ConfigError
from dlforge.common.runtime import Backends
from dlforge.common.settings import CommonSettings, load_settings


def redact(url: str) -> str:
    """``url`` with its password replaced, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _reach(backends: Backends, timeout: float) -> None:
    s = backends.settings

    async def probe(variable: str, url: str, check: object) -> None:
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can drop a cancellation
                await check  # type: ignore[misc]
        except Exception as exc:  # any failure to reach a backend is reported the same way
            raise ConfigError(f"{variable}: cannot reach {redact(url)}: {type(exc).__name__}: {exc}") from exc

    async def bus() -> None:
        await backends.bus.start()
        try:
            await backends.bus.ping()
        finally:
            await backends.bus.stop()

    try:
        await probe("DLFORGE_BUS", s.bus, bus())
        await probe("DLFORGE_DOCS", s.docs, backends.docs.ping())
        await probe("DLFORGE_OBJECTS", s.objects, asyncio.to_thread(backends.objects.ping))
    finally:
        await backends.docs.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlforge.common.check_settings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-connect", action="store_true", help="only validate the settings and open the backends")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to reach each backend")
    args = parser.parse_args(argv)
    try:
        settings: CommonSettings = load_settings()
        backends = Backends.from_settings(settings)
        if not args.no_connect:
            asyncio.run(_reach(backends, args.timeout))
    except ConfigError as exc:
        sys.stderr.write(f"dlforge: {exc}\n")
        return 2
    sys.stdout.write(f"settings ok: DLFORGE_BUS={redact(settings.bus)} DLFORGE_OBJECTS={redact(settings.objects)} "
                     f"DLFORGE_DOCS={redact(settings.docs)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
