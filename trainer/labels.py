"""The full-reference quality label of a degraded volume, given its clean original.

Choice: **mean structural similarity (SSIM) inside a head mask, on normalised volumes**.

* Both volumes are first normalised exactly as the daemon does (``qc_daemon.preprocess.normalise``, intensities
  in (0, 1]), so the label describes what the network actually sees and the SSIM constants (data range 1)
  are meaningful whatever the scanner's intensity scale.
* SSIM is computed with a Gaussian window (sigma 1.5 voxels, the Wang et al. 2004 choice) and averaged over
  the head mask of the *clean* volume (Otsu-like threshold on the clean volume, closed and hole-filled), so
  the empty background, which differs between full-head and skull-stripped data, does not dominate.
* Why SSIM and not e.g. exp(-NRMSE/tau): it is exactly 1 for an unchanged scan; it falls monotonically as
  any of our artifacts grows (noise and ghosts lower the contrast/structure terms, blur and motion the
  structure term, bias field and spikes the luminance and structure terms); and it is bounded and unit-free,
  so a value means the same thing for noise as for motion, with no per-artifact temperature ``tau`` to
  tune. NRMSE over-weights global intensity changes (a smooth bias field that a radiologist barely notices
  gives a large NRMSE), SSIM's local windows do not.

The label is in [-1, 1] in principle, in practice in (0, 1]; :class:`~qc_daemon.model_contract.ScoreCalibration`
maps it to the daemon's score (1 = clean).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from qc_daemon.model_contract import Normalisation
from qc_daemon.preprocess import normalise

LABEL_NAME = "ssim_head_native"
SSIM_SIGMA = 1.5  # voxels, or mm when quality_label is given the voxel size
_C1 = (0.01 * 1.0) ** 2
_C2 = (0.03 * 1.0) ** 2


def head_mask(volume: np.ndarray) -> np.ndarray:
    """Boolean head mask: voxels above a fraction of the robust maximum, closed, hole-filled, largest blob."""
    v = np.asarray(volume, dtype=np.float32)
    high = float(np.percentile(v, 99.0))
    if high <= 0:
        return np.ones(v.shape, dtype=bool)
    mask = v > 0.1 * high
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    if not mask.any():
        return np.ones(v.shape, dtype=bool)
    return mask


def ssim_map(a: np.ndarray, b: np.ndarray, sigma: float | tuple[float, ...] = SSIM_SIGMA) -> np.ndarray:
    """Voxel-wise SSIM of two volumes with intensities in [0, 1] (Gaussian window of std ``sigma`` voxels,
    one value or one per axis)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)

    def f(x: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(x, sigma, truncate=3.5)

    mu_a, mu_b = f(a), f(b)
    var_a = f(a * a) - mu_a**2
    var_b = f(b * b) - mu_b**2
    cov = f(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + _C1) * (2 * cov + _C2)) / ((mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2))


def quality_label(
    clean: np.ndarray,
    degraded: np.ndarray,
    normalisation: Normalisation | None = None,
    mask: np.ndarray | None = None,
    already_normalised: bool = False,
    spacing_mm: tuple[float, float, float] | None = None,
) -> float:
    """Mean SSIM within the clean volume's head mask after the daemon's normalisation; 1.0 for ``degraded == clean``.

    With ``spacing_mm`` the SSIM window is ``SSIM_SIGMA`` millimetres on every axis (the same physical window on a
    0.7 mm, a 1 mm and a 5 mm-slice scan); without it, ``SSIM_SIGMA`` voxels.
    """
    if clean.shape != degraded.shape:
        raise ValueError(f"shapes differ: {clean.shape} vs {degraded.shape}")
    if already_normalised:
        a, b = clean, degraded
    else:
        normalisation = normalisation or Normalisation()
        a, b = normalise(clean, normalisation), normalise(degraded, normalisation)
    if mask is None:
        mask = head_mask(a)
    if np.array_equal(a, b):
        return 1.0
    sigma = tuple(SSIM_SIGMA / float(s) for s in spacing_mm) if spacing_mm else SSIM_SIGMA
    return float(np.clip(ssim_map(a, b, sigma)[mask].mean(), -1.0, 1.0))
