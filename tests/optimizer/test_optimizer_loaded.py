"""The optimizer's cache of loaded models: the last few kept, one load per key however many ask at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dlforge.optimizer.loaded import LoadedModels


def test_the_least_recently_used_is_dropped() -> None:
    loads: list[str] = []
    cache: LoadedModels[str] = LoadedModels(2)

    def get(key: str) -> str:
        return cache.get(key, lambda: loads.append(key) or f"model {key}")

    assert get("a") == "model a" and get("b") == "model b"
    assert get("a") == "model a"  # kept, and now the most recent
    get("c")
    assert cache.keys() == ["a", "c"] and loads == ["a", "b", "c"]
    get("b")  # dropped: loaded again
    assert loads == ["a", "b", "c", "b"] and cache.keys() == ["c", "b"]


def test_concurrent_first_requests_of_a_key_share_one_load() -> None:
    cache: LoadedModels[object] = LoadedModels(4)
    entered, release = threading.Event(), threading.Event()
    loads: list[object] = []

    def load() -> object:
        value = object()
        loads.append(value)
        entered.set()
        assert release.wait(30), "the test never released the load"
        return value

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cache.get, "k", load)
        assert entered.wait(30)
        second = pool.submit(cache.get, "k", load)
        deadline = time.monotonic() + 30  # the second request is waiting for the first's load, or loading too
        while cache.waiting("k") == 0 and len(loads) == 1:
            assert time.monotonic() < deadline, "the second request neither waits nor loads"
            time.sleep(0.005)
        release.set()
        assert first.result(30) is second.result(30) is loads[0]
    assert len(loads) == 1


def test_a_failed_load_is_every_waiters_error_and_is_tried_again() -> None:
    cache: LoadedModels[str] = LoadedModels(1)

    def broken() -> str:
        raise OSError("download failed")

    with pytest.raises(OSError, match="download failed"):
        cache.get("k", broken)
    assert cache.get("k", lambda: "loaded") == "loaded"
