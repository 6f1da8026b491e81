"""Per-item booleans as text (a trial's val results in hpo.trial.completed): packing against hand-packed bytes."""

from __future__ import annotations

import numpy as np
import pytest

from dlforge.common.packed import pack_bools, unpack_bools


def test_packing_is_eight_items_a_byte_first_item_in_the_high_bit() -> None:
    # 10 items: the first eight right (0xff), the ninth wrong, the tenth right (0b01 then six padding zeros: 0x40)
    assert pack_bools([True] * 8 + [False, True]) == "10:ff40"
    assert pack_bools([]) == "0:"
    assert pack_bools(np.array([False, False, True])) == "3:20"
    assert unpack_bools("10:ff40").tolist() == [True] * 8 + [False, True]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 108, 1000])
def test_packing_round_trips(n: int) -> None:
    bits = np.random.default_rng(n).random(n) < 0.8
    assert unpack_bools(pack_bools(bits)).tolist() == bits.tolist()


@pytest.mark.parametrize("bad", ["ff40", "10:FF40", "10:ff", "8:ff00", "3:21", "x:00", "10:ff40 "])
def test_unpacking_refuses_what_packing_cannot_produce(bad: str) -> None:
    with pytest.raises(ValueError, match="per-item results"):
        unpack_bools(bad)
