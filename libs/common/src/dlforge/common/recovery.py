"""What the services' start-up reconciles and run deletions share.

Each service reconciles its own unfinished work in its ``reconcile.py`` (reading only its own
collections). On a durable bus (Kafka, the embedded log) the event whose handling a crash cut
short is delivered again and its handler, idempotent, resumes the work; what nothing will resume
(the in-memory bus lost the event, or no event drives it) is failed with the reason and one
``run.failed`` whose event id is derived from the stage, the run and the work, so reconciling
twice emits it once.
"""

from __future__ import annotations

import logging
import uuid

from dlforge.common.events import Event, RunFailed
from dlforge.common.objects import ObjectStore
from dlforge.common.runtime import Backends

log = logging.getLogger(__name__)


def bus_is_durable(backends: Backends) -> bool:
    """False for the in-memory bus: a restart lost every event in flight, so nothing is redelivered."""
    return not backends.settings.bus.startswith("memory:")


def derived_event_id(*parts: str) -> str:
    """An event id that is the same every time it is derived from the same parts (re-emits deduplicate)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, "dlforge:" + ":".join(parts)).hex


async def fail_run(backends: Backends, *, stage: str, run_id: str, work: str, reason: str) -> Event:
    """Publish the ``run.failed`` of interrupted ``work`` of ``stage`` (the same event id every time)."""
    event = Event.new(RunFailed(stage=stage, reason=reason), run_id=run_id)
    event = event.model_copy(update={"event_id": derived_event_id(stage, run_id, work, "failed")})
    log.warning("%s: run %s failed at start-up: %s", stage, run_id, reason)
    await backends.publish(event)
    return event


def delete_prefix(objects: ObjectStore, prefix: str) -> int:
    """Delete every object under ``prefix`` (which must end with ``/``); returns how many."""
    if not prefix.endswith("/"):
        raise ValueError(f"a prefix to delete must end with '/': {prefix!r}")
    keys = [info.key for info in objects.list(prefix)]
    for key in keys:
        objects.delete(key)
    return len(keys)
