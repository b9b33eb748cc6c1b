"""Acquisition artifacts written with numpy only, independently of ``trainer/artifacts.py``, for the model tests.

Each is applied on the scan's own grid (as a scanner would make it), before the daemon's preprocessing. The
"non-diagnostic" levels (:data:`NON_DIAGNOSTIC`) are the ones a technologist would repeat a scan for; the
"moderate" ones (:data:`MODERATE`) are degraded but still readable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# Rician noise sigma (fraction of the 99th percentile), Gaussian blur sigma (mm), shot-to-shot translation (mm),
# N/2 ghost amplitude (fraction of the image)
NON_DIAGNOSTIC = {"noise": 0.14, "blur": 2.5, "motion": 5.0, "ghosting": 0.3}
MODERATE = {"noise": 0.05, "blur": 1.0, "motion": 1.5, "ghosting": 0.08}


def phase_encode_axis(spacing_mm: Sequence[float]) -> int:
    """An in-plane axis: of the finely sampled axes, the last (a thick-slice axis is never phase-encoded here)."""
    finest = min(spacing_mm)
    return max(i for i, s in enumerate(spacing_mm) if s < 1.5 * finest)


def rician(data: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigma = fraction * float(np.percentile(data, 99))
    return np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2)


def blur(data: np.ndarray, sigma_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    return ndimage.gaussian_filter(data.astype(np.float64), [sigma_mm / s for s in spacing_mm])


def shot_motion(data: np.ndarray, shift_mm: float, spacing_mm: Sequence[float], shots: int = 24, seed: int = 0):
    """Each of ``shots`` interleaved groups of phase-encode lines sees the head translated by up to ``shift_mm``
    (uniform in each direction); the group holding the k-space centre line is unmoved."""
    rng = np.random.default_rng(seed)
    axis = phase_encode_axis(spacing_mm)
    k = np.fft.fftn(data)
    freqs = np.meshgrid(*[np.fft.fftfreq(n, d=s) for n, s in zip(data.shape, spacing_mm, strict=True)], indexing="ij")
    group = np.arange(data.shape[axis]) % shots
    out = k.copy()
    for g in range(1, shots):  # group 0 holds line 0, the centre
        shift = rng.uniform(-shift_mm, shift_mm, size=3)
        moved = k * np.exp(-2j * np.pi * sum(f * d for f, d in zip(freqs, shift, strict=True)))
        index: list = [slice(None)] * data.ndim
        index[axis] = group == g
        out[tuple(index)] = moved[tuple(index)]
    return np.abs(np.fft.ifftn(out))


def nyquist_ghost(data: np.ndarray, amplitude: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """An N/2 ghost from a phase error on every other phase-encode line: ghost/image = tan(phi / 2)."""
    axis = phase_encode_axis(spacing_mm)
    phi = 2 * np.arctan(amplitude)
    k = np.fft.fftn(data)
    shape = [1] * data.ndim
    shape[axis] = data.shape[axis]
    error = np.where(np.arange(data.shape[axis]) % 2 == 1, np.exp(1j * phi), 1.0).reshape(shape)
    return np.abs(np.fft.ifftn(k * error))


def spike(data: np.ndarray, amplitude: float, position: Sequence[float] = (0.13, -0.21, 0.18)) -> np.ndarray:
    """One corrupted k-space sample at ``position`` (fraction of k-space on each axis): stripes of ``amplitude`` x
    the p99 across the image."""
    k = np.fft.fftn(data)
    where = tuple(int(round(p * n)) % n for p, n in zip(position, data.shape, strict=True))
    k[where] += amplitude * float(np.percentile(data, 99)) * data.size
    return np.abs(np.fft.ifftn(k))


def degrade(data: np.ndarray, kind: str, level: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """``data`` with the artifact ``kind`` at ``level`` (units as in :data:`NON_DIAGNOSTIC`)."""
    data = np.asarray(data, dtype=np.float64)
    if kind == "noise":
        out = rician(data, level)
    elif kind == "blur":
        out = blur(data, level, spacing_mm)
    elif kind == "motion":
        out = shot_motion(data, level, spacing_mm)
    elif kind == "ghosting":
        out = nyquist_ghost(data, level, spacing_mm)
    else:
        raise ValueError(f"unknown artifact {kind!r}")
    return out.astype(np.float32)
