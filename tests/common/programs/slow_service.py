"""A service with one slow handler, served the way every dlforge service is (for the SIGTERM test).

Environment: the usual DLFORGE_* settings, plus
  SLOW_SERVICE_DIR      folder for the "started" flag file and the final report (JSON)
  SLOW_SERVICE_SECONDS  how long the handler works (default 2)
  SLOW_SERVICE_PUBLISH  "1": publish the event itself at start (an in-process bus has no other producer)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from dlforge.common.app import ServicePart, create_app, serve
from dlforge.common.events import Event, LabelsRequested, LabelsSubmitted, Topic
from dlforge.common.runtime import Backends, HandlerContext, Service
from dlforge.common.settings import load_settings

OUT = Path(os.environ["SLOW_SERVICE_DIR"])
SECONDS = float(os.environ.get("SLOW_SERVICE_SECONDS", "2"))
service = Service("slowpoke")


@service.handles(Topic.LABELS_SUBMITTED)
async def slow(event: Event, ctx: HandlerContext) -> Event:
    p = event.payload
    assert isinstance(p, LabelsSubmitted)
    (OUT / "started").write_text(str(time.time()))
    await asyncio.sleep(SECONDS)  # SIGTERM arrives in here
    await ctx.docs.upsert("slowpoke_done", {"_id": event.event_id, "finished_at": time.time()})
    return event.follow(LabelsRequested(dataset_id=p.dataset_id, batch_id="next", round=2, item_ids=[],
                                        reason="uncertain"))


async def publish_one(backends: Backends) -> None:
    if os.environ.get("SLOW_SERVICE_PUBLISH") == "1":
        event = Event.new(LabelsSubmitted(dataset_id="d", batch_id="b", labels={"i": "good"}, annotator="a"),
                          run_id="run-sigterm")
        await backends.publish(event)


def main() -> None:
    settings = load_settings()
    app = create_app([ServicePart(service, on_start=publish_one)], settings=settings)
    serve(app, settings)
    # serve() returned: the lifespan ended after the worker finished; report what it did
    report: dict[str, object] = {
        "processed": {k.value: v for k, v in app.state.workers["slowpoke"].processed.items()}
    }
    backlog = getattr(app.state.backends.bus, "backlog", None)
    if backlog is not None:  # the in-process bus can tell what its group left uncommitted
        report["backlog"] = backlog(service.group)
    (OUT / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
