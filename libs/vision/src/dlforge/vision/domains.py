"""Domains between two domains: images and features carried part of the way from one domain toward another.

Used by the augmenter's domain adaptation (:mod:`dlforge.augmenter.domain`: intermediate domains for
gradual self-training) and the labeler (:func:`standardize_domains`: each domain of a data set given the
same feature moments before the auto-labeling classifier sees them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dlforge.common.errors import InvalidInput


def mean_amplitude(images: np.ndarray) -> np.ndarray:
    """The mean Fourier amplitude (centred, ``H x W x C`` float64) of uint8 ``N x H x W x C`` images."""
    x = np.asarray(images)
    if x.ndim != 4 or len(x) == 0:
        raise InvalidInput(f"images must be N x H x W x C with N >= 1, got shape {x.shape}")
    total = np.zeros(x.shape[1:], dtype=np.float64)
    for start in range(0, len(x), 256):  # bounded memory: 256 complex spectra at a time
        spec = np.fft.fft2(x[start:start + 256].astype(np.float64), axes=(1, 2))
        total += np.abs(np.fft.fftshift(spec, axes=(1, 2))).sum(axis=0)
    return total / len(x)


def amplitude_blend(images: np.ndarray, target_amplitude: np.ndarray, lam: float, *, beta: float = 0.1) -> np.ndarray:
    """``images`` (uint8 ``N x H x W x C``) with the centred ``beta`` square of their amplitude spectrum moved
    ``lam`` of the way to ``target_amplitude`` (:func:`mean_amplitude` of the target), phase kept; uint8."""
    x = np.asarray(images)
    if x.ndim != 4 or target_amplitude.shape != x.shape[1:]:
        raise InvalidInput(f"images {x.shape} and the target amplitude {target_amplitude.shape} must share H x W x C")
    if not 0.0 <= lam <= 1.0 or not 0.0 < beta <= 1.0:
        raise InvalidInput(f"lam must be in [0, 1] and beta in (0, 1], got {lam} and {beta}")
    h, w = x.shape[1:3]
    bh, bw = max(1, round(h * beta / 2)), max(1, round(w * beta / 2))
    ch, cw = h // 2, w // 2
    # clamped to the spectrum: a negative start would wrap around and select (almost) nothing
    window = (slice(None), slice(max(0, ch - bh), min(h, ch + bh + 1)), slice(max(0, cw - bw), min(w, cw + bw + 1)))
    out = np.empty_like(x)
    for start in range(0, len(x), 256):
        spec = np.fft.fftshift(np.fft.fft2(x[start:start + 256].astype(np.float64), axes=(1, 2)), axes=(1, 2))
        amp, phase = np.abs(spec), np.angle(spec)
        amp[window] = (1.0 - lam) * amp[window] + lam * target_amplitude[None][window]
        back = np.fft.ifft2(np.fft.ifftshift(amp * np.exp(1j * phase), axes=(1, 2)), axes=(1, 2)).real
        out[start:start + 256] = np.clip(np.rint(back), 0, 255).astype(x.dtype)
    return out


def moment_blend(source: np.ndarray, target: np.ndarray, lam: float) -> np.ndarray:
    """Source features given per-feature moments ``lam`` of the way from the source's to the target's."""
    s, t = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if s.ndim != 2 or t.ndim != 2 or s.shape[1] != t.shape[1] or len(s) < 2 or len(t) < 2:
        raise InvalidInput(f"source and target features must be (rows >= 2, dims) alike, got {s.shape}, {t.shape}")
    mu_s, sd_s = s.mean(axis=0), s.std(axis=0) + 1e-6
    mu_t, sd_t = t.mean(axis=0), t.std(axis=0) + 1e-6
    return (s - mu_s) / sd_s * ((1.0 - lam) * sd_s + lam * sd_t) + (1.0 - lam) * mu_s + lam * mu_t


def standardize_domains(x: np.ndarray, domains: Sequence[str | None], *,
                        min_items: int = 20) -> tuple[np.ndarray, dict[str, int]]:
    """Rows of ``x`` with each domain's features given the whole set's per-feature moments (per-domain
    standardization): a classifier fitted on one domain's labels then reads another domain's items on the same
    scale (ELPV's mono -> poly cells: 0.34 -> 0.66 test accuracy, ``benchmarks/domain_adaptation.py``'s
    ``aligned`` row). Domains of fewer than ``min_items`` rows (their moments would be noise) and rows of no
    domain are left as they are. Returns the rows and the size of each domain standardized; with fewer than
    two domains, ``x`` itself and ``{}``."""
    x = np.asarray(x)
    if x.ndim != 2 or len(domains) != len(x):
        raise InvalidInput(f"one domain per row: {len(domains)} domains for features of shape {x.shape}")
    names = sorted({d for d in domains if d is not None})
    if len(names) < 2:
        return x, {}
    groups = np.array(["\0" if d is None else d for d in domains], dtype=object)
    xf = x.astype(np.float64)
    out = xf.copy()
    done: dict[str, int] = {}
    for name in names:
        rows = np.flatnonzero(groups == name)
        if len(rows) < max(2, min_items):
            continue
        out[rows] = moment_blend(xf[rows], xf, 1.0)
        done[name] = len(rows)
    return out.astype(x.dtype, copy=False), done
