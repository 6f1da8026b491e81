"""The feature store: expensive derived values of images, content-addressed in the object store.

A value (decoded pixels, pooled features, activations at a freeze boundary) is named by a
:class:`FeatureKey`: *what kind of value* (:class:`FeatureKind`: kind, the digest of the weights
that produce it, the preprocessing, the input side, the stage) and *of which image* (the sha256
of the image's bytes, ``Item.sha256`` in the manifest). Anything that changes the value changes
the key, so a value is computed once and then read by every stage and every run that needs it.

Layout in the object store (any :class:`~dlforge.common.objects.ObjectStore` backend)::

    features/<kind>-<namespace digest>/<shard id>.npz    the values of many items (one array each)
    features/<kind>-<namespace digest>/<shard id>.json   the shard's content hashes (written last)

Values are written in shards (:meth:`FeatureStore.put_many` groups them), so a data set of
thousands of images is a handful of objects. A reader lists a namespace once and keeps the
content -> shard index in memory, re-listing only when it misses.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlforge.common.errors import InvalidInput, NotFound
from dlforge.common.objects import ObjectStore

FEATURES_PREFIX = "features"
KEY_VERSION = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KIND = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class FeatureKind:
    """Everything but the image that determines a value.

    ``kind``: what the value is (``pixels``, ``pooled``, ``activation``, ...); ``weights``: digest of
    the weights producing it ("" when none do); ``preprocess``: how pixels became the network input;
    ``size``: the input side in px (0: the image's own size); ``stage``: where in the network.
    """

    kind: str
    weights: str = ""
    preprocess: str = ""
    size: int = 0
    stage: str = ""

    def __post_init__(self) -> None:
        if not _KIND.match(self.kind):
            raise InvalidInput(f"feature kind {self.kind!r}: lower-case letters, digits and '_' only")
        if self.size < 0:
            raise InvalidInput(f"feature size {self.size} must be >= 0")

    def canonical(self) -> str:
        """The kind as a canonical JSON string (sorted keys, no spaces): the namespace digest's input."""
        return json.dumps({"v": KEY_VERSION, "kind": self.kind, "weights": self.weights,
                           "preprocess": self.preprocess, "size": self.size, "stage": self.stage},
                          sort_keys=True, separators=(",", ":"))

    @property
    def namespace(self) -> str:
        return f"{self.kind}-{hashlib.sha256(self.canonical().encode()).hexdigest()[:32]}"


@dataclass(frozen=True)
class FeatureKey:
    """One value: a :class:`FeatureKind` of the image whose bytes have sha256 ``content``."""

    kind: FeatureKind
    content: str

    def __post_init__(self) -> None:
        if not _HEX64.match(self.content):
            raise InvalidInput(f"feature content {self.content!r} is not a lower-case sha256 hex digest")

    def __str__(self) -> str:
        return f"{self.kind.namespace}/{self.content}"


class FeatureStore:
    """Port-like access to the feature store on an object store (see the module docstring)."""

    def __init__(self, objects: ObjectStore, *, prefix: str = FEATURES_PREFIX, shard_bytes: int = 64 << 20) -> None:
        self.objects = objects
        self.prefix = prefix.strip("/")
        self.shard_bytes = shard_bytes
        self._index: dict[str, dict[str, str]] = {}  # namespace -> content -> shard id
        self._lock = threading.RLock()
        self._compute_locks: dict[str, threading.Lock] = {}

    def _dir(self, namespace: str) -> str:
        return f"{self.prefix}/{namespace}"

    def _refresh(self, namespace: str) -> dict[str, str]:
        known = self._index.setdefault(namespace, {})
        seen = set(known.values())
        d = self._dir(namespace) + "/"
        for info in self.objects.list(d):
            name = info.key[len(d):]
            if "/" in name or not name.endswith(".json"):
                continue
            shard = name[:-len(".json")]
            if shard in seen:
                continue
            for content in self.objects.get_json(info.key)["contents"]:
                known.setdefault(content, shard)
        return known

    def _locate(self, keys: Sequence[FeatureKey]) -> list[str | None]:
        with self._lock:
            out: list[str | None] = []
            refreshed: set[str] = set()
            for key in keys:
                ns = key.kind.namespace
                index = self._index.get(ns)
                if (index is None or key.content not in index) and ns not in refreshed:
                    index = self._refresh(ns)
                    refreshed.add(ns)
                out.append(None if index is None else index.get(key.content))
            return out

    def get_many(self, keys: Sequence[FeatureKey]) -> list[np.ndarray | None]:
        """The stored values of ``keys`` in order (None where nothing is stored); each shard read once."""
        shards = self._locate(keys)
        by_shard: dict[tuple[str, str], list[int]] = {}
        for n, (key, shard) in enumerate(zip(keys, shards, strict=True)):
            if shard is not None:
                by_shard.setdefault((key.kind.namespace, shard), []).append(n)
        out: list[np.ndarray | None] = [None] * len(keys)
        for (ns, shard), rows in by_shard.items():
            try:
                data = self.objects.get_bytes(f"{self._dir(ns)}/{shard}.npz")
            except NotFound:
                with self._lock:  # deleted behind our back: forget it, the caller recomputes
                    self._index[ns] = {c: s for c, s in self._index.get(ns, {}).items() if s != shard}
                continue
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                for n in rows:
                    out[n] = np.asarray(npz[keys[n].content])
        return out

    def put_many(self, values: Mapping[FeatureKey, np.ndarray], *, compress: bool = False) -> None:
        """Store ``values`` (grouped into shards of at most ``shard_bytes``); existing values are kept."""
        by_ns: dict[str, list[tuple[FeatureKey, np.ndarray]]] = {}
        for key, value in values.items():
            by_ns.setdefault(key.kind.namespace, []).append((key, np.asarray(value)))
        for ns, pairs in by_ns.items():
            chunk: list[tuple[FeatureKey, np.ndarray]] = []
            size = 0
            for key, value in pairs:
                if chunk and size + value.nbytes > self.shard_bytes:
                    self._write_shard(ns, chunk, compress=compress)
                    chunk, size = [], 0
                chunk.append((key, value))
                size += value.nbytes
            if chunk:
                self._write_shard(ns, chunk, compress=compress)

    def _write_shard(self, ns: str, pairs: Sequence[tuple[FeatureKey, np.ndarray]], *, compress: bool) -> None:
        contents = sorted({k.content for k, _ in pairs})
        arrays = {k.content: v for k, v in pairs}
        shard = hashlib.sha256("\n".join(contents).encode()).hexdigest()[:32]
        buf = io.BytesIO()
        save: Any = np.savez_compressed if compress else np.savez
        save(buf, **arrays)
        self.objects.put_bytes(f"{self._dir(ns)}/{shard}.npz", buf.getvalue())
        self.objects.put_json(f"{self._dir(ns)}/{shard}.json", {"contents": contents})  # last: marks it complete
        with self._lock:
            index = self._index.setdefault(ns, {})
            for c in contents:
                index[c] = shard

    def get_or_compute(
        self,
        keys: Sequence[FeatureKey],
        compute: Callable[[list[FeatureKey]], Mapping[FeatureKey, np.ndarray]],
        *,
        compress: bool = False,
    ) -> list[np.ndarray]:
        """The values of ``keys``; the missing ones computed by ``compute(missing)`` and stored.

        ``compute`` must return a value for every key it is given and may return more (other outputs
        of the same pass), which are stored too. Callers computing the same namespaces wait for
        each other, so a value is computed once per process even when stages run concurrently.
        """
        found = self.get_many(keys)
        if all(v is not None for v in found):
            return [v for v in found if v is not None]
        names = ",".join(sorted({k.kind.namespace for k in keys}))
        with self._lock:
            lock = self._compute_locks.setdefault(names, threading.Lock())
        with lock:
            found = self.get_many(keys)  # another thread may have computed them meanwhile
            missing = [k for k, v in zip(keys, found, strict=True) if v is None]
            if missing:
                computed = dict(compute(list(dict.fromkeys(missing))))
                absent = [str(k) for k in missing if k not in computed]
                if absent:
                    raise RuntimeError(f"compute() returned no value for {absent[:3]}")
                self.put_many(computed, compress=compress)
                found = [computed[k] if v is None else v for k, v in zip(keys, found, strict=True)]
        return [v for v in found if v is not None]


_stores: weakref.WeakKeyDictionary[ObjectStore, FeatureStore] = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()


def feature_store(objects: ObjectStore) -> FeatureStore:
    """The process's feature store on ``objects`` (one per object store, so its index is shared)."""
    with _stores_lock:
        store = _stores.get(objects)
        if store is None:
            store = _stores[objects] = FeatureStore(objects)
        return store
