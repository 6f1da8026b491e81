"""Observers of the expensive vision work: image decodes and trunk passes over stored items.

:func:`dlforge.vision.images.decode` reports every decode (by the sha256 of the bytes) and
:class:`dlforge.vision.trunk.TrunkFeatures` every pass of a trunk from pixels (by content hash,
trunk id and input side). Nothing is reported while no observer is attached, and then no hash is
computed. Observers are attached explicitly (like ``logging`` handlers), e.g. by a test that counts
how often a pipeline run decodes and embeds each image::

    with observing(CountingObserver()) as counts:
        run_pipeline()
    assert max(counts.decodes.values()) <= 2
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol


class VisionObserver(Protocol):
    """Told about decodes and trunk passes (called from worker threads: implementations lock)."""

    def decoded(self, content: str) -> None:
        """An image whose bytes have sha256 ``content`` was decoded."""
        ...

    def embedded(self, *, trunk: str, size: int, contents: Sequence[str]) -> None:
        """``trunk`` ran from pixels at ``size`` px over the items with these content hashes."""
        ...


_observers: list[VisionObserver] = []
_lock = threading.Lock()


def add_observer(observer: VisionObserver) -> None:
    with _lock:
        _observers.append(observer)


def remove_observer(observer: VisionObserver) -> None:
    with _lock:
        if observer in _observers:
            _observers.remove(observer)


def active() -> bool:
    return bool(_observers)


def notify_decoded(data: bytes) -> None:
    if not _observers:
        return
    content = hashlib.sha256(data).hexdigest()
    for obs in list(_observers):
        obs.decoded(content)


def notify_embedded(*, trunk: str, size: int, contents: Sequence[str]) -> None:
    for obs in list(_observers):
        obs.embedded(trunk=trunk, size=size, contents=list(contents))


class CountingObserver:
    """Counts decodes per content hash and trunk passes per (trunk, size, content hash)."""

    def __init__(self) -> None:
        self.decodes: Counter[str] = Counter()
        self.embeds: Counter[tuple[str, int, str]] = Counter()
        self._lock = threading.Lock()

    def decoded(self, content: str) -> None:
        with self._lock:
            self.decodes[content] += 1

    def embedded(self, *, trunk: str, size: int, contents: Sequence[str]) -> None:
        with self._lock:
            for c in contents:
                self.embeds[(trunk, size, c)] += 1


@contextmanager
def observing(observer: CountingObserver) -> Iterator[CountingObserver]:
    """Attach ``observer`` for the duration of the block."""
    add_observer(observer)
    try:
        yield observer
    finally:
        remove_observer(observer)
