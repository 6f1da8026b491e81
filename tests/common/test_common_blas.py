"""NumPy's BLAS on one thread for a block or a function, and the setting restored after."""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits

from dlforge.common.blas import single_threaded_blas, small_blas


def blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_single_threaded_blas_in_a_block_and_in_a_decorated_function() -> None:
    @small_blas
    def inside(x: int) -> tuple[int, list[int]]:
        return x + 1, blas_threads()

    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() and set(blas_threads()) == {2}  # NumPy's OpenBLAS is loaded
        with single_threaded_blas():
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {2}
        assert inside(1) == (2, [1] * len(blas_threads()))
        assert set(blas_threads()) == {2}
        assert inside.__name__ == "inside"
