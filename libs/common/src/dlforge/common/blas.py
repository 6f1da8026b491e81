"""NumPy's BLAS on one thread for the small linear algebra of the services.

The regressions, SVDs and discriminants the labeler, the augmenter and the proposer run have a few
hundred to a few thousand rows: threaded OpenBLAS costs more than it gains there, and on a busy
machine (another service's torch threads, another process) its spinning threads stall — measured
10-100x slower on the 2-core machines (e.g. a 400 x 1280 SVD: 8.3 s with two BLAS threads beside a
torch process, 0.07 s with one). torch keeps its own threads (MKL and OpenMP): only the ``blas``
libraries NumPy and SciPy load are limited, for the duration of the block, and restored after it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from threadpoolctl import threadpool_limits

P = ParamSpec("P")
R = TypeVar("R")


def single_threaded_blas() -> threadpool_limits:
    """A context manager: BLAS on one thread inside the ``with`` block."""
    return threadpool_limits(limits=1, user_api="blas")


def small_blas(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate ``fn`` to run with :func:`single_threaded_blas`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with single_threaded_blas():
            return fn(*args, **kwargs)

    return wrapper
