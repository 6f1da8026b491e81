"""A small least-recently-used cache of loaded models whose first load of a key happens once.

The API's class activation maps need the trained torch model of a checkpoint: it is downloaded to a
local file and loaded, which takes seconds and memory. :class:`LoadedModels` keeps the last few and
lets concurrent first requests of one key wait for the one load (two loads would write one local file
at once) while requests of other keys go on.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class LoadedModels(Generic[T]):
    """At most ``capacity`` loaded values by key, least recently used dropped first; thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._values: OrderedDict[str, T] = OrderedDict()
        self._loading: dict[str, Future[T]] = {}
        self._waiting: dict[str, int] = {}

    def get(self, key: str, load: Callable[[], T]) -> T:
        """The value of ``key``, loaded with ``load()`` if it is not kept; while one thread loads a key the
        others asking for it wait for that load (and see its error if it fails; the next request tries again)."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            pending = self._loading.get(key)
            if pending is None:
                pending = self._loading[key] = Future()
                mine = True
            else:
                self._waiting[key] = self._waiting.get(key, 0) + 1
                mine = False
        if not mine:
            try:
                return pending.result()
            finally:
                with self._lock:
                    self._waiting[key] -= 1
                    if not self._waiting[key]:
                        del self._waiting[key]
        try:
            value = load()
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)
        pending.set_result(value)
        return value

    def waiting(self, key: str) -> int:
        """How many requests wait for the load of ``key`` now."""
        with self._lock:
            return self._waiting.get(key, 0)

    def keys(self) -> list[str]:
        """The kept keys, least recently used first."""
        with self._lock:
            return list(self._values)


__all__ = ["LoadedModels"]
