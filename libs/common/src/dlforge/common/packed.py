"""Per-item booleans as short text: ``"<n>:<hex>"``, the ``n`` values packed eight to a byte, the first item in
the most significant bit, the padding bits after the last item 0 (a trial's val results in ``hpo.trial.completed``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

PACKED_PATTERN = r"^(\d{1,9}):([0-9a-f]*)$"  # also the event field's pattern (hpo.trial.completed)
_PACKED = re.compile(PACKED_PATTERN)


def pack_bools(values: Sequence[bool] | np.ndarray) -> str:
    """``"<n>:<hex>"`` of ``values`` (see the module)."""
    bits = np.asarray(values, dtype=bool).ravel()
    return f"{len(bits)}:{np.packbits(bits).tobytes().hex()}"


def unpack_bools(text: str) -> np.ndarray:
    """The booleans :func:`pack_bools` packed (``ValueError`` when ``text`` is not what it can produce)."""
    m = _PACKED.match(text)
    if m is None:
        raise ValueError("per-item results must read '<count>:<lower-case hex>'")
    n, hexed = int(m.group(1)), m.group(2)
    if len(hexed) != 2 * math.ceil(n / 8):
        raise ValueError(f"per-item results: {n} items need {2 * math.ceil(n / 8)} hex digits, got {len(hexed)}")
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8))
    if bits[n:].any():
        raise ValueError("per-item results: the padding bits after the last item must be 0")
    return bits[:n].astype(bool)
