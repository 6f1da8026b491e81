"""The AsyncAPI 3.0 document of dlforge's events, generated from the payload classes.

One channel per :class:`~dlforge.common.events.Topic`, one message per schema version of its payload.
A message's payload schema is the whole JSON value on the wire: the :class:`~dlforge.common.events.Event`
envelope with ``event_type`` and ``schema_version`` fixed, and the payload class's schema in
``payload``. Schemas are AsyncAPI Schema objects (a superset of JSON Schema draft 07), named in
``components.schemas`` by topic and version (``dataset.uploaded.v2``, its payload
``dataset.uploaded.v2.payload``, the types it uses ``dataset.uploaded.v2.Spec``...), so each version
stands alone.

A payload class describes only its current version. The schemas of older versions are what was
published before: :func:`build_document` copies them from the previous document unchanged (a version,
once published, never changes) and fails when one is missing. ``scripts/asyncapi.py`` writes
``docs/asyncapi.yaml``; after adding a topic or bumping a ``SCHEMA_VERSION`` run it again.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from dlforge.common.events import PAYLOAD_TYPES, Event, Payload, Topic

ASYNCAPI_VERSION = "3.0.0"

DESCRIPTION = """\
Every message of the dlforge pipeline is one JSON object (UTF-8): the event envelope
(`event_id`, the idempotency key; `event_type`, its topic; `schema_version` of the payload;
a time-zone-aware `occurred_at`; the pipeline `run_id`; the `causation_id` of the event that
caused it) and the payload of its topic and version.

Each topic is a channel; each schema version of its payload is a message of that channel.
Producers send the newest version; a consumer must accept every version listed (dlforge's own
services upcast older ones). A version, once published, never changes: a change to a payload is a
new version. Unknown fields are refused.

Kafka: the topic name is the channel's address (after the deployment's `topic_prefix`, if any);
the message key is the `run_id`, except on the trial-scoped topics `hpo.trial`, `hpo.trial.reported`
and `hpo.trial.decision`, where it is `<run_id>:<trial_number>` (one trial's messages stay in order,
a run's trials spread over partitions); the W3C trace context travels in the message headers, never
in the payload.
"""

TRACE_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "W3C trace context of the producer's span (Kafka headers, UTF-8 strings)",
    "properties": {
        "traceparent": {"type": "string", "description": "W3C traceparent, e.g. 00-<trace id>-<span id>-01"},
        "tracestate": {"type": "string", "description": "W3C tracestate"},
    },
}


class PublishedSchemaMissing(ValueError):
    """An older schema version of a topic is not in the previous document and cannot be generated."""


def _name(topic: Topic | str, version: int) -> str:
    return f"{topic}.v{version}"


def _rename_refs(node: Any, prefix: str) -> Any:
    """``#/$defs/X`` -> ``#/components/schemas/<prefix>.X`` throughout a pydantic JSON schema."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = f"#/components/schemas/{prefix}.{value.removeprefix('#/$defs/')}"
            else:
                out[key] = _rename_refs(value, prefix)
        return out
    if isinstance(node, list):
        return [_rename_refs(v, prefix) for v in node]
    return node


def _is_nullable(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") == "null" or any(_is_nullable(s) for s in schema.get("anyOf", ()))


def version_schemas(topic: Topic, payload_cls: type[Payload]) -> dict[str, Any]:
    """The component schemas of the current version of ``topic``: envelope, payload, the types they use."""
    version = payload_cls.SCHEMA_VERSION
    name = _name(topic, version)
    payload = payload_cls.model_json_schema(mode="validation")
    defs = payload.pop("$defs", {})
    schemas: dict[str, Any] = {f"{name}.{k}": _rename_refs(v, name) for k, v in defs.items()}
    schemas[f"{name}.payload"] = _rename_refs(payload, name)

    envelope = Event.model_json_schema(mode="serialization")
    envelope.pop("$defs", None)
    props = dict(envelope["properties"])
    props["event_type"] = {"const": topic.value, "type": "string", "title": "Event Type"}
    props["schema_version"] = {"const": version, "type": "integer", "title": "Schema Version"}
    props["payload"] = {"$ref": f"#/components/schemas/{name}.payload"}
    meaning = inspect.cleandoc(payload_cls.__doc__ or "")
    schemas[name] = {
        "title": f"{topic.value} v{version}",
        "description": meaning or f"A {topic.value} event, schema version {version}.",
        "type": "object",
        "properties": props,
        # decode() needs every field that cannot be null; a missing causation_id reads as none
        "required": [k for k, v in props.items() if not _is_nullable(v)],
        "additionalProperties": False,
    }
    return dict(sorted(schemas.items()))


def _published(previous: Mapping[str, Any] | None, topic: Topic, version: int) -> dict[str, Any] | None:
    """The component schemas of one published version in ``previous`` (None if it has none)."""
    if previous is None:
        return None
    schemas: Mapping[str, Any] = previous.get("components", {}).get("schemas", {})
    name = _name(topic, version)
    found = {k: v for k, v in schemas.items() if k == name or k.startswith(f"{name}.")}
    return found if name in found and f"{name}.payload" in found else None


def _message(topic: Topic, version: int, *, current: bool) -> dict[str, Any]:
    name = _name(topic, version)
    return {
        "name": topic.value,
        "title": f"{topic.value}, schema version {version}" + ("" if current else " (older: still accepted)"),
        "contentType": "application/json",
        "headers": {"$ref": "#/components/schemas/TraceHeaders"},
        "payload": {"$ref": f"#/components/schemas/{name}"},
    }


def build_document(
    *,
    previous: Mapping[str, Any] | None = None,
    payload_types: Mapping[Topic, type[Payload]] = PAYLOAD_TYPES,
    version: str = "1.0.0",
) -> dict[str, Any]:
    """The AsyncAPI document: current versions from the classes, older ones kept from ``previous``."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {"TraceHeaders": TRACE_HEADERS}
    for topic in Topic:
        payload_cls = payload_types.get(topic)
        if payload_cls is None:
            continue
        current = payload_cls.SCHEMA_VERSION
        for v in range(1, current):
            kept = _published(previous, topic, v)
            if kept is None:
                raise PublishedSchemaMissing(
                    f"{topic.value} schema version {v} is not in the previous document, and the payload class "
                    f"{payload_cls.__name__} describes only version {current}: generate from the document that "
                    f"published version {v} (see docs/asyncapi.yaml in git)")
            schemas.update(kept)
        schemas.update(version_schemas(topic, payload_cls))
        channel_messages = {}
        for v in range(1, current + 1):
            messages[_name(topic, v)] = _message(topic, v, current=v == current)
            channel_messages[_name(topic, v)] = {"$ref": f"#/components/messages/{_name(topic, v)}"}
        channels[topic.value] = {
            "address": topic.value,
            "title": topic.value,
            "description": inspect.cleandoc(payload_cls.__doc__ or "") or f"Events of {topic.value}.",
            "messages": channel_messages,
        }
        operations[f"publish.{topic.value}"] = {
            "action": "send",
            "title": f"A dlforge service publishes {topic.value}",
            "channel": {"$ref": f"#/channels/{topic.value}"},
            "messages": [{"$ref": f"#/channels/{topic.value}/messages/{_name(topic, current)}"}],
        }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {"title": "dlforge events", "version": version, "description": DESCRIPTION},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
    }


def _shape(node: Any) -> Any:
    """A schema without its words (titles, descriptions): what a change of it can break."""
    if isinstance(node, dict):
        return {k: _shape(v) for k, v in node.items() if k not in ("title", "description")}
    if isinstance(node, list):
        return [_shape(v) for v in node]
    return node


def _version_schemas_in(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    schemas: Mapping[str, Any] = document.get("components", {}).get("schemas", {})
    return {k: _shape(v) for k, v in schemas.items() if k == name or k.startswith(f"{name}.")}


def changed_versions(previous: Mapping[str, Any] | None, document: Mapping[str, Any]) -> list[str]:
    """The versions (``topic.vN``) published in ``previous`` whose schemas ``document`` changes (not just words)."""
    if previous is None:
        return []
    changed = []
    for name in document.get("components", {}).get("messages", {}):
        old = _version_schemas_in(previous, name)
        if old and old != _version_schemas_in(document, name):
            changed.append(name)
    return changed
