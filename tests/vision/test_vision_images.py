"""Image decoding: the documented pixel limit (64 MP) is enforced from the header, before decoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dlforge.common.errors import InvalidInput
from dlforge.vision.images import MAX_PIXELS, decode


def png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR header claims ``width`` x ``height`` (CRC fixed): only a decoder
    that trusts the header before decoding sees the huge size; decoding the pixels would fail."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize(("width", "height", "mp"), [(11_000, 11_000, "121.0"), (9_000, 9_000, "81.0"),
                                                     (8_001, 8_000, "64.0")])
def test_an_image_over_64_megapixels_is_refused_from_its_header(width: int, height: int, mp: str) -> None:
    # 81 MP is between Pillow's limit and twice it, where Pillow only warns; 121 MP is the reported case
    with pytest.raises(InvalidInput) as info:
        decode(png_claiming(width, height), name="huge.png")
    assert info.value.status_code == 413
    assert str(info.value) == f"huge.png: image is {width}x{height} = {mp} MP, over the limit of 64 MP"


def test_the_limit_itself_is_not_refused_for_its_size() -> None:
    assert MAX_PIXELS == 8_000 * 8_000
    # exactly 64 MP passes the size check; the crafted file then fails to decode as what it is
    with pytest.raises(InvalidInput, match="not a readable image") as info:
        decode(png_claiming(8_000, 8_000), name="edge.png")
    assert info.value.status_code == 422


def test_beyond_twice_pillows_limit_is_refused_with_the_same_reason() -> None:
    with pytest.raises(InvalidInput, match=r"over the limit of 64 MP") as info:
        decode(png_claiming(20_000, 20_000), name="bomb.png")
    assert info.value.status_code == 413


def test_no_pixels_are_decoded_for_a_refused_image(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = png_claiming(11_000, 11_000)
    ok = io.BytesIO()
    Image.fromarray(np.full((16, 16), 7, dtype=np.uint8), mode="L").save(ok, format="PNG")
    loads: list[str] = []
    real_load = Image.Image.load

    def counting_load(self: Image.Image) -> object:
        loads.append(self.format or "?")
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    with pytest.raises(InvalidInput, match=r"121\.0 MP"):
        decode(huge)
    assert loads == []
    assert decode(ok.getvalue()).size == (16, 16)
    assert loads  # the counter does see a real decode
