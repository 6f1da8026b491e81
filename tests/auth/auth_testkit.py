"""Helpers of the auth tests: accounts made through the auth store before an app starts (as `dlforge admin`
does), uploads, and the TEST STUB embedder."""

from __future__ import annotations

import asyncio
import io
import zipfile
import zlib
from collections.abc import Mapping

import accounts  # tests/accounts.py
import numpy as np
from PIL import Image

from dlforge.common.settings import CommonSettings

PASSWORD = accounts.PASSWORD
ROLE_USERS = {"vera": "viewer", "lars": "labeler", "otto": "operator", "ada": "admin"}


def docs_path(settings: CommonSettings) -> str:
    return settings.docs.removeprefix("sqlite:///")


async def create_accounts(settings: CommonSettings, users: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Create each user (password ``PASSWORD``, the given grants) and one API token of theirs: name -> token."""
    return await accounts.create_accounts(settings.docs, users)


def seed_accounts(settings: CommonSettings, users: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """:func:`create_accounts` outside an event loop."""
    return asyncio.run(create_accounts(settings, users))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cells_zip(n: int = 8) -> bytes:
    """``n`` distinct 16x16 grey PNGs in two class folders."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            image = io.BytesIO()
            pixels = np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(image, format="PNG")
            zf.writestr(f"{'good' if i < n // 2 else 'defect'}/cell{i}.png", image.getvalue())
    return buf.getvalue()


def flat_zip(levels: Mapping[str, int]) -> bytes:
    """Unlabeled 24x24 PNGs, each of one grey level (bright and dark cells are told apart by the stub embedder)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, level in levels.items():
            image = io.BytesIO()
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            pixels = np.clip(level + rng.integers(-20, 20, (24, 24)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(image, format="PNG")
            zf.writestr(name, image.getvalue())
    return buf.getvalue()


class StubEmbedder:
    """TEST STUB, not a real backbone: 8x8 downsampled pixels plus mean brightness (the labeling loop's logic only)."""

    name = "test-stub-stats"

    def prepare(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BILINEAR), dtype=np.uint8)[:, :, None]

    def embed(self, batch: np.ndarray) -> np.ndarray:
        x = batch.reshape(len(batch), -1).astype(np.float32) / 255.0
        mean = x.mean(axis=1, keepdims=True)
        return np.hstack([x - mean, 4.0 * mean, 4.0 * (1 - mean)]).astype(np.float32)
