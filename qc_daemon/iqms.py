"""Classical image quality metrics (IQMs) of a structural MR volume, in MRIQC's vocabulary.

Numpy/scipy only, shared by the daemon (every scored series) and the trainer (the Table 2 baseline). The masks
are simple on purpose: a head mask by half Otsu's threshold of the smoothed volume plus morphology, the air
around it, and a 3-class split of the head by 1D k-means on its intensities. Tissue names assume T1 contrast (darkest
class = CSF, brightest = WM; the brightest class also holds fat, the darkest skull and partial volume), as in
MRIQC's T1w report. :func:`compute_iqms` returns every metric of :data:`IQM_NAMES`, as a number or as None
with the reason it could not be computed (a volume too small for the masks, no air around the head, a
zero-filled background): a bad volume never raises.

Each metric is a small pure function; the docstring gives its formula, the direction that is better and the
reference (Esteban et al. 2017, MRIQC, PLoS ONE 12(9):e0184661, and MRIQC's ``mriqc/qc/anatomical.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

IQM_NAMES = (
    "snr_csf", "snr_gm", "snr_wm", "snr_total",
    "snrd_csf", "snrd_gm", "snrd_wm", "snrd_total",
    "cnr", "cjv", "efc", "fber", "wm2max", "inu_range", "noise_sigma",
)
TISSUES = ("csf", "gm", "wm")
DIETRICH_FACTOR = math.sqrt((4.0 - math.pi) / 2.0)  # std of a Rayleigh distribution over its sigma, 0.655
MIN_AXIS_VOXELS = 8  # a volume thinner than this along any axis is too small for the masks
HEAD_MASK_STEP = 2  # the head mask of a large volume is found on every second voxel
MIN_CLASS_VOXELS = 27  # a mask or tissue class with fewer voxels gives no statistics
AIR_MARGIN_VOXELS = 3  # the air mask starts this far outside the head mask (partial volume, ringing)
AIR_MAX_FRACTION = 0.2  # air darker than this fraction of the head's median; brighter "air" is tissue
INU_GRID_MM = 4.0  # the bias field is estimated on a grid this coarse
INU_SIGMA_MM = 20.0  # ...smoothing the WM intensities with a Gaussian of this width


class IqmError(ValueError):
    """A metric (or the mask it needs) cannot be computed for this volume; the message says why."""


# ---- masks ------------------------------------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the value that maximises the between-class variance of a 2-class split.

    Otsu N. (1979), IEEE Trans. Syst. Man Cybern. 9(1):62-66.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if not high > low:
        raise IqmError(f"constant intensities ({low:g}): no threshold separates head from air")
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1:][int(np.argmax(between))])


def head_mask(volume: np.ndarray) -> np.ndarray:
    """The head: voxels of the smoothed volume (Gaussian, 2 voxels) above half Otsu's threshold, opened to drop
    noise specks, closed, holes filled in 3D and per axial slice (a head cut at the neck is open at the
    bottom), the largest connected component kept. Volumes of 64 voxels or more along every axis are masked on
    every second voxel (the morphology costs 8 times less; the mask's edge is then 2 voxels coarse).

    Otsu's threshold splits air and dark tissue from bright tissue; half of it lies between the air and the
    darkest tissue and, unlike a threshold set against the air, moves little when noise brightens the air.
    """
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim != 3 or min(v.shape) < MIN_AXIS_VOXELS:
        raise IqmError(f"volume of shape {v.shape} is too small for a head mask (needs >= {MIN_AXIS_VOXELS} per axis)")
    if not np.all(np.isfinite(v)):
        raise IqmError("volume holds NaN or infinite values")
    smooth = ndimage.gaussian_filter(v, 2.0)
    step = HEAD_MASK_STEP if min(v.shape) >= HEAD_MASK_STEP * 32 else 1  # coarse grid for the morphology
    smooth = smooth[::step, ::step, ::step]
    mask = smooth > otsu_threshold(smooth) / 2
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    labels, n = ndimage.label(mask)
    if n == 0:
        raise IqmError("no head found: nothing above the Otsu threshold survives the morphology")
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == 1 + int(np.argmax(sizes))
    if step > 1:
        for axis, extent in enumerate(v.shape):
            mask = np.repeat(mask, step, axis=axis)[(slice(None),) * axis + (slice(0, extent),)]
    if mask.sum() < MIN_CLASS_VOXELS:
        raise IqmError(f"head mask of {int(mask.sum())} voxels is too small")
    return mask


def air_mask(volume: np.ndarray, head: np.ndarray) -> np.ndarray:
    """The air: every voxel farther than :data:`AIR_MARGIN_VOXELS` from the head mask, provided it is dark
    (median below :data:`AIR_MAX_FRACTION` of the head's): otherwise the field of view lies inside the head and
    what the head mask left out is tissue."""
    air = ~ndimage.binary_dilation(head, iterations=AIR_MARGIN_VOXELS)
    if air.sum() < MIN_CLASS_VOXELS:
        raise IqmError(f"only {int(air.sum())} air voxels around the head: the field of view is filled")
    air_median, head_median = float(np.median(volume[air])), float(np.median(volume[head]))
    if air_median > AIR_MAX_FRACTION * head_median:
        raise IqmError(
            f"what lies outside the head mask is not dark (median {air_median:.4g} vs {head_median:.4g} in the "
            "head): the field of view is inside the head"
        )
    return air


def tissue_labels(volume: np.ndarray, head: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Split the head into 3 classes by 1D k-means on its intensities: 0 air, 1 CSF, 2 GM, 3 WM (T1 order).

    k-means runs on a 1024-bin histogram of the head's intensities (weighted by counts), started at the 10th,
    50th and 90th percentiles; the class boundaries are the midpoints between the sorted centres.
    """
    values = np.asarray(volume, dtype=np.float64)[head]
    counts, edges = np.histogram(values, bins=1024)
    centres_of_bins = (edges[:-1] + edges[1:]) / 2
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(iterations):
        assign = np.argmin(np.abs(centres_of_bins[:, None] - centres[None, :]), axis=1)
        weights = np.array([counts[assign == k].sum() for k in range(3)])
        if np.any(weights == 0):
            raise IqmError("the head's intensities do not split into 3 tissue classes")
        updated = np.array([np.average(centres_of_bins[assign == k], weights=counts[assign == k]) for k in range(3)])
        if np.allclose(updated, centres):
            break
        centres = updated
    centres = np.sort(centres)
    bounds = (centres[:-1] + centres[1:]) / 2
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[head] = 1 + np.searchsorted(bounds, values).astype(np.uint8)
    return labels


def tissue_masks(volume: np.ndarray, head: np.ndarray) -> dict[str, np.ndarray]:
    """CSF, GM and WM masks for tissue statistics: :func:`tissue_labels` of the volume smoothed by a Gaussian of
    1 voxel (spatially coherent classes), each eroded by 1 voxel (no partial volume at class borders) unless
    that leaves fewer than :data:`MIN_CLASS_VOXELS` (a class thinner than 3 voxels is kept whole). The
    statistics are taken on the unsmoothed intensities, so they keep the noise."""
    labels = tissue_labels(ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), 1.0), head)
    masks = {}
    for k, tissue in enumerate(TISSUES, start=1):
        whole = labels == k
        eroded = ndimage.binary_erosion(whole)
        masks[tissue] = eroded if eroded.sum() >= MIN_CLASS_VOXELS else whole
    return masks


# ---- metrics (pure functions of numbers and arrays) --------------------------------------------------------


def snr(mu_fg: float, sigma_fg: float, n_fg: int) -> float:
    r"""Signal-to-noise ratio within a tissue: :math:`\mathrm{SNR} = \mu_F / (\sigma_F \sqrt{n/(n-1)})`.

    Higher is better. ``snr_total`` is the mean over CSF, GM and WM. MRIQC ``snr``; Esteban et al. 2017.
    """
    if n_fg < 2:
        raise IqmError(f"tissue of {n_fg} voxel(s) has no SNR")
    if sigma_fg <= 0:
        raise IqmError("noise-free tissue (std 0): SNR unbounded")
    return float(mu_fg / (sigma_fg * math.sqrt(n_fg / (n_fg - 1))))


def noise_sigma(air: np.ndarray) -> float:
    r"""The noise level :math:`\sigma` of the image, from the air: magnitude images have Rayleigh-distributed
    air with standard deviation :math:`\sigma_\mathrm{air} = \sigma\sqrt{(4-\pi)/2}`, so
    :math:`\sigma = \sigma_\mathrm{air} / 0.655`. Lower is better (same intensity units as the image).

    Dietrich et al. 2007, Magn. Reson. Imaging 25(10):1456, eq. A.12 (MRIQC ``snr_dietrich``'s denominator).
    """
    air = np.asarray(air, dtype=np.float64)
    if air.size < MIN_CLASS_VOXELS:
        raise IqmError(f"only {air.size} air voxels")
    if np.mean(air == 0) > 0.5:
        raise IqmError("the air is zero-filled (background suppressed by the scanner): no noise to measure")
    sigma_air = float(air.std(ddof=1))
    if sigma_air <= 0:
        raise IqmError("the air is constant: no noise to measure")
    return sigma_air / DIETRICH_FACTOR


def snr_dietrich(mu_fg: float, sigma_noise: float) -> float:
    r"""SNR against the noise measured in the air (Dietrich): :math:`\mathrm{SNR_d} = \mu_F / \sigma`, with
    :math:`\sigma` from :func:`noise_sigma`. Higher is better. ``snrd_total`` is the mean over CSF, GM, WM.

    Dietrich et al. 2007, eq. A.12; MRIQC ``snr_dietrich``.
    """
    return float(mu_fg / sigma_noise)


def cnr(mu_wm: float, mu_gm: float, sigma_air: float, sigma_wm: float, sigma_gm: float) -> float:
    r"""Contrast-to-noise ratio of GM and WM:
    :math:`\mathrm{CNR} = |\mu_\mathrm{GM} - \mu_\mathrm{WM}| /
    \sqrt{\sigma_\mathrm{air}^2 + \sigma_\mathrm{GM}^2 + \sigma_\mathrm{WM}^2}`,
    :math:`\sigma_\mathrm{air}` the standard deviation of the air's intensities. Higher is better.

    Magnotta & Friedman 2006, J. Digit. Imaging 19(2):140; MRIQC ``cnr``.
    """
    return float(abs(mu_gm - mu_wm) / math.sqrt(sigma_air**2 + sigma_wm**2 + sigma_gm**2))


def cjv(mu_wm: float, mu_gm: float, sigma_wm: float, sigma_gm: float) -> float:
    r"""Coefficient of joint variation of GM and WM:
    :math:`\mathrm{CJV} = (\sigma_\mathrm{WM} + \sigma_\mathrm{GM}) / |\mu_\mathrm{WM} - \mu_\mathrm{GM}|`.
    Lower is better (noise, bias field and blur raise it).

    Ganzetti et al. 2016, Front. Neuroinform. 10:10; MRIQC ``cjv``.
    """
    if mu_wm == mu_gm:
        raise IqmError("GM and WM have the same mean: no contrast")
    return float((sigma_wm + sigma_gm) / abs(mu_wm - mu_gm))


def efc(volume: np.ndarray) -> float:
    r"""Entropy focus criterion: the Shannon entropy of voxel intensities relative to the total energy,
    :math:`E = -\sum_j (x_j/x_\mathrm{max}) \ln(x_j/x_\mathrm{max})`, :math:`x_\mathrm{max} = \sqrt{\sum_j x_j^2}`,
    normalised by its maximum :math:`E_\mathrm{max} = -N (1/\sqrt{N}) \ln(1/\sqrt{N})` (all voxels equal), so
    EFC is in [0, 1]. Lower is better (ghosting and blurring spread energy and raise it).

    Atkinson et al. 1997, IEEE Trans. Med. Imaging 16(6):903; MRIQC ``efc``.
    """
    x = np.clip(np.asarray(volume, dtype=np.float64).ravel(), 0, None)
    n = x.size
    b_max = math.sqrt(float(np.dot(x, x)))
    if b_max == 0 or n < 2:
        raise IqmError("the volume is zero everywhere: no energy to measure")
    e_max = n * (1.0 / math.sqrt(n)) * math.log(1.0 / math.sqrt(n))
    ratio = x / b_max
    return float(np.sum(ratio * np.log(ratio + 1e-16)) / e_max)


def fber(volume: np.ndarray, head: np.ndarray) -> float:
    r"""Foreground-background energy ratio: :math:`\mathrm{FBER} = \mathrm{median}(|x_\mathrm{head}|^2) /
    \mathrm{median}(|x_\mathrm{outside}|^2)`. Higher is better.

    Shehzad et al. 2015, The Preprocessed Connectomes Project QAP; MRIQC ``fber``.
    """
    v = np.asarray(volume, dtype=np.float64)
    fg = np.median(v[head] ** 2)
    bg = np.median(v[~head] ** 2)
    if bg <= 0:
        raise IqmError("the background is zero (suppressed by the scanner): the energy ratio is unbounded")
    return float(fg / bg)


def wm2max(volume: np.ndarray, median_wm: float) -> float:
    r"""White-matter-to-maximum intensity ratio: :math:`\mathrm{median}(x_\mathrm{WM}) / P_{99.95}(x)`.
    Neither direction is better: values around 0.6-0.8 are typical; near 1 the intensity range is compressed
    (saturation), near 0 a few very bright voxels (vessels, artifacts) dominate.

    MRIQC ``wm2max``.
    """
    top = float(np.percentile(volume, 99.95))
    if top <= 0:
        raise IqmError("the 99.95th percentile is not positive")
    return float(median_wm / top)


def bias_field(volume: np.ndarray, wm: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """The intensity non-uniformity seen by WM, on a :data:`INU_GRID_MM` grid: WM intensities smoothed by a
    normalised convolution (Gaussian of :data:`INU_SIGMA_MM`), divided by their median. A stand-in for N4's
    field (MRIQC runs N4, which is not available here); 1 = uniform."""
    factors = [max(1, round(INU_GRID_MM / s)) for s in spacing_mm]
    shape = [n // f * f for n, f in zip(volume.shape, factors, strict=True)]
    if min(shape) == 0:
        raise IqmError(f"volume of shape {volume.shape} is smaller than one {INU_GRID_MM:g} mm cell")

    def blocks(a: np.ndarray) -> np.ndarray:
        a = a[: shape[0], : shape[1], : shape[2]]
        return a.reshape(shape[0] // factors[0], factors[0], shape[1] // factors[1], factors[1],
                         shape[2] // factors[2], factors[2]).sum(axis=(1, 3, 5))

    weight = blocks(wm.astype(np.float64))
    signal = blocks(np.where(wm, volume, 0.0).astype(np.float64))
    sigma = [INU_SIGMA_MM / (s * f) for s, f in zip(spacing_mm, factors, strict=True)]
    smooth_signal = ndimage.gaussian_filter(signal, sigma, mode="constant")
    smooth_weight = ndimage.gaussian_filter(weight, sigma, mode="constant")
    inside = weight > 0
    if inside.sum() < MIN_CLASS_VOXELS:
        raise IqmError("too little WM to estimate a bias field")
    field = smooth_signal[inside] / np.maximum(smooth_weight[inside], 1e-12)
    return field / np.median(field)


def inu_range(field: np.ndarray) -> float:
    r"""Spread of the bias field within WM: :math:`P_{95}(b) - P_5(b)`, :math:`b` from :func:`bias_field`.
    Lower is better (0 = uniform).

    MRIQC ``inu_range`` (there over N4's field within the brain).
    """
    p5, p95 = np.percentile(field, [5, 95])
    return float(p95 - p5)


# ---- all of them ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IqmReport:
    """Every metric of :data:`IQM_NAMES`: ``values`` name -> number or None, ``errors`` name -> why None."""

    values: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Tissue:
    mean: float
    median: float
    std: float
    n: int


def compute_iqms(volume: np.ndarray, spacing_mm: tuple[float, float, float]) -> IqmReport:
    """All IQMs of a volume in its own intensities and grid (not normalised, not resampled: both change the
    noise). Never raises: a metric that cannot be computed is None with its reason in ``errors``.

    Order of dependence: efc needs nothing; fber and noise_sigma need the head mask; the rest need the head
    mask and the 3 tissue classes too (snrd and cnr also the air). A failed step nulls what depends on it.
    """
    v = np.asarray(volume, dtype=np.float32)
    values: dict[str, float | None] = {}
    errors: dict[str, str] = {}

    def attempt(names: tuple[str, ...], compute: Callable[[], dict[str, float]]) -> None:
        reason = ""
        try:
            computed = compute()
        except IqmError as exc:
            computed, reason = {}, str(exc)
        except (ValueError, FloatingPointError, MemoryError) as exc:
            computed, reason = {}, f"{type(exc).__name__}: {exc}"
        for name in names:
            value = computed.get(name)
            if value is not None and not math.isfinite(value):
                value, reason = None, f"not finite ({value})"
            values[name] = value
            if value is None:
                errors[name] = reason

    def report() -> IqmReport:
        kept_errors = {name: reason for name, reason in errors.items() if name in IQM_NAMES}
        return IqmReport({name: values[name] for name in IQM_NAMES}, kept_errors)

    def skip(names: tuple[str, ...], because: str) -> None:
        for name in names:
            values[name], errors[name] = None, errors[because]

    masks: dict[str, np.ndarray] = {}
    stats: dict[str, _Tissue] = {}

    attempt(("efc",), lambda: {"efc": efc(v)})
    attempt(("fber",), lambda: {"fber": fber(v, masks.setdefault("head", head_mask(v)))})
    if "head" not in masks:
        skip(tuple(name for name in IQM_NAMES if name not in values), because="fber")
        return report()
    head = masks["head"]

    def tissues() -> dict[str, float]:
        for tissue, mask in tissue_masks(v, head).items():
            inside = v[mask].astype(np.float64)
            if inside.size < MIN_CLASS_VOXELS:
                raise IqmError(f"tissue class {tissue} has only {inside.size} voxels")
            stats[tissue] = _Tissue(float(inside.mean()), float(np.median(inside)), float(inside.std()), inside.size)
            masks[tissue] = mask
        return {}

    def noise() -> dict[str, float]:
        air = v[air_mask(v, head)]
        noise_found["sigma_air"] = float(air.std())
        return {"noise_sigma": noise_sigma(air)}

    def against_air() -> dict[str, float]:
        sigma = values["noise_sigma"]
        out = {f"snrd_{t}": snr_dietrich(s.mean, sigma) for t, s in stats.items()}
        out["snrd_total"] = float(np.mean(list(out.values())))
        out["cnr"] = cnr(stats["wm"].mean, stats["gm"].mean, noise_found["sigma_air"], stats["wm"].std, stats["gm"].std)
        return out

    noise_found: dict[str, float] = {}
    attempt(("tissues",), tissues)
    if len(stats) < 3:
        skip(("snr_csf", "snr_gm", "snr_wm", "snr_total"), because="tissues")
    else:
        for tissue, s in stats.items():
            attempt((f"snr_{tissue}",), lambda s=s, tissue=tissue: {f"snr_{tissue}": snr(s.mean, s.std, s.n)})
        per_tissue = [values[f"snr_{t}"] for t in TISSUES]
        if None in per_tissue:
            values["snr_total"], errors["snr_total"] = None, "SNR missing for a tissue: " + "; ".join(
                errors[f"snr_{t}"] for t in TISSUES if values[f"snr_{t}"] is None)
        else:
            values["snr_total"] = float(np.mean(per_tissue))
    attempt(("noise_sigma",), noise)
    against_air_names = ("snrd_csf", "snrd_gm", "snrd_wm", "snrd_total", "cnr")
    if len(stats) < 3:
        skip(against_air_names, because="tissues")
    elif values["noise_sigma"] is None:
        skip(against_air_names, because="noise_sigma")
    else:
        attempt(against_air_names, against_air)
    if len(stats) < 3:
        skip(("cjv", "wm2max", "inu_range"), because="tissues")
        return report()
    gm, wm = stats["gm"], stats["wm"]
    attempt(("cjv",), lambda: {"cjv": cjv(wm.mean, gm.mean, wm.std, gm.std)})
    attempt(("wm2max",), lambda: {"wm2max": wm2max(v, wm.median)})
    attempt(("inu_range",), lambda: {"inu_range": inu_range(bias_field(v, masks["wm"], spacing_mm))})
    return report()
