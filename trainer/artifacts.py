"""Simulated acquisition artifacts on the scan's own (native) grid, in physical units: numpy/scipy only.

Real artifacts happen when the scan is acquired, at its own resolution, before the daemon resamples it to the
model's grid (which averages voxels and smooths ghosts, spikes and motion edges away). So every degradation here
is applied to the clean volume *at its native voxel size*, along an explicit phase-encode axis where k-space is
involved, and only then does the trainer run the daemon's own preprocessing (``trainer.data``).

Each degradation has a random half (:func:`draw_params`: the artifact's shape from a seed, recorded as JSON) and a
deterministic half (:func:`apply_params`). Severity 0 is the identity for every kind; severities grow in physical
terms a physicist recognises (``SEVERITY_TABLE[kind][s]``, s = 0..5):

=========  ==========================================================================================================
noise      Rician noise sigma as % of the head's 99th-percentile intensity: 0, 2.5, 5, 8, 12, 18.
           (White-matter SNR of a typical 1 mm MPRAGE, WM ~0.75 x p99: ~30, 15, 9.4, 6.3, 4.2.)
motion     shot-to-shot rigid motion: the phase-encode lines are acquired in shots (16-48), each shot in its own
           pose; largest displacement of a point of the head in mm: 0, 1, 2, 3.5, 5, 8. The shot holding the
           k-space centre is the reference pose, so the image keeps its position and the label measures ghosting
           and blurring, not displacement.
ghosting   N/k ghosts along the phase-encode axis (k = 2 mostly: the Nyquist ghost; else 3-6): ghost amplitude as %
           of the image: 0, 3, 7, 12, 20, 30. Half of the N/2 ghosts come from a phase error on every other line
           (the ghost in quadrature with the image, as an odd/even line inconsistency makes it), the rest from an
           amplitude error (in phase).
spike      one k-space spike (herringbone stripes over the whole image), stripe amplitude as % of the head's
           99th-percentile intensity: 0, 1, 2, 4, 7, 12.
blur       Gaussian blur, sigma in mm (FWHM = 2.355 sigma): 0, 0.6, 1.0, 1.5, 2.2, 3.0.
bias       smooth multiplicative field, peak-to-peak variation inside the head in %: 0, 10, 20, 35, 50, 70.
=========  ==========================================================================================================

Severity 3 is meant as the level a technologist would repeat the scan at (noise WM SNR ~6, 3.5 mm motion, 12 %
ghosts, blur FWHM 3.5 mm); MODEL_CARD.md says how the label's calibration is anchored to it.
:func:`draw_mixture` combines 2-3 kinds in a fixed physical order (:data:`APPLY_ORDER`: object/coil effects first,
then acquisition effects in k-space, thermal noise last).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

KINDS: tuple[str, ...] = ("noise", "motion", "ghosting", "spike", "blur", "bias")
MAX_SEVERITY = 5
REPEAT_SEVERITY = 3  # the level a technologist would repeat the scan at (see the module docstring)
SEVERITY_TABLE: dict[str, tuple[float, ...]] = {
    "noise": (0.0, 0.025, 0.05, 0.08, 0.12, 0.18),
    "motion": (0.0, 1.0, 2.0, 3.5, 5.0, 8.0),
    "ghosting": (0.0, 0.03, 0.07, 0.12, 0.20, 0.30),
    "spike": (0.0, 0.01, 0.02, 0.04, 0.07, 0.12),
    "blur": (0.0, 0.6, 1.0, 1.5, 2.2, 3.0),
    "bias": (0.0, 0.10, 0.20, 0.35, 0.50, 0.70),
}
UNITS: dict[str, str] = {
    "noise": "sigma, fraction of p99",
    "motion": "mm, largest displacement",
    "ghosting": "ghost amplitude, fraction",
    "spike": "stripe amplitude, fraction of p99",
    "blur": "sigma, mm",
    "bias": "peak-to-peak, fraction",
}
APPLY_ORDER: tuple[str, ...] = ("bias", "blur", "motion", "ghosting", "spike", "noise")
HEAD_RADIUS_MM = 90.0  # rotation angle -> displacement at the edge of a head


@dataclasses.dataclass(frozen=True)
class Degradation:
    """One applied degradation: what, how strong, the seed, and the exact parameters (JSON-able)."""

    kind: str
    severity: int
    seed: int
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def magnitude(kind: str, severity: int) -> float:
    """The physical magnitude of ``kind`` at ``severity`` (see the module table)."""
    if kind not in SEVERITY_TABLE:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
    if not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be in 0..{MAX_SEVERITY}, got {severity}")
    return SEVERITY_TABLE[kind][severity]


def physical_magnitude(kind: str, params: Mapping[str, Any]) -> float:
    """The magnitude (units of :data:`UNITS`) that ``params`` of ``kind`` carry, jitter included."""
    if kind in ("ghosting", "spike"):
        return float(params["amplitude"])
    if kind == "noise":
        return float(params["sigma_fraction"])
    if kind == "blur":
        return float(params["sigma_mm"])
    if kind == "bias":
        return float(params["peak_to_peak"])
    if kind == "motion":
        return float(np.abs(np.asarray(params["translation_mm"])).max() / 0.7)
    raise ValueError(f"unknown artifact kind {kind!r}")


def draw_params(kind: str, severity: int, seed: int, pe_axis: int | None = None) -> dict[str, Any]:
    """The random half: parameters for ``kind`` at ``severity``; the seed fixes the artifact's shape only.

    ``pe_axis``: the phase-encode axis for k-space artifacts (drawn when None).
    """
    mag = magnitude(kind, severity)
    rng = np.random.default_rng(seed)
    axis = int(rng.integers(0, 3)) if pe_axis is None else int(pe_axis)
    # jitter the magnitude by +-10 % so neighbouring severities overlap a little, as real scans do
    jitter = float(rng.uniform(0.9, 1.1))
    if kind == "noise":
        return {"sigma_fraction": round(mag * jitter, 5), "noise_seed": int(rng.integers(0, 2**31 - 1))}
    if kind == "motion":
        shots = int(rng.integers(16, 49))
        poses = rng.normal(size=(shots, 6))
        poses /= max(float(np.abs(poses).max()), 1e-6)  # the largest component of any pose is +-1
        displacement = mag * jitter
        translation = poses[:, :3] * displacement * 0.7  # mm
        rotation = np.degrees(poses[:, 3:] * displacement * 0.7 / HEAD_RADIUS_MM)  # deg, same displacement at edge
        return {
            "axis": axis,
            "shots": shots,
            "translation_mm": translation.round(4).tolist(),
            "rotation_deg": rotation.round(4).tolist(),
            "interleaved": bool(rng.random() < 0.5),
        }
    if kind == "ghosting":
        period = 2 if rng.random() < 0.7 else int(rng.integers(3, 7))
        phase_error = period == 2 and bool(rng.random() < 0.5)
        return {"axis": axis, "period": period, "amplitude": round(mag * jitter, 5), "phase_error": phase_error}
    if kind == "spike":
        position = rng.uniform(0.05, 0.3, size=3) * rng.choice([-1.0, 1.0], size=3)  # fraction of k-space
        return {"position": position.round(4).tolist(), "amplitude": round(mag * jitter, 5)}
    if kind == "blur":
        return {"sigma_mm": round(mag * jitter, 4)}
    if kind == "bias":
        coefficients = rng.normal(size=10)
        return {"coefficients": coefficients.round(5).tolist(), "peak_to_peak": round(mag * jitter, 5)}
    raise AssertionError(kind)


def apply_params(volume: np.ndarray, spacing_mm: Sequence[float], kind: str, params: Mapping[str, Any]) -> np.ndarray:
    """The deterministic half: apply ``params`` (from :func:`draw_params`) to a 3D float volume on its grid."""
    volume = np.asarray(volume, dtype=np.float32)
    spacing = tuple(float(s) for s in spacing_mm)
    if kind == "noise":
        return _rician(volume, float(params["sigma_fraction"]), int(params["noise_seed"]))
    if kind == "motion":
        return _motion(volume, spacing, params)
    if kind == "ghosting":
        if params.get("phase_error"):
            return _phase_ghosting(volume, int(params["axis"]), float(params["amplitude"]))
        return _ghosting(volume, int(params["axis"]), int(params["period"]), float(params["amplitude"]))
    if kind == "spike":
        return _spike(volume, params["position"], float(params["amplitude"]))
    if kind == "blur":
        sigma = float(params["sigma_mm"])
        if sigma == 0.0:
            return volume.copy()
        return ndimage.gaussian_filter(volume, [sigma / s for s in spacing], truncate=3.0).astype(np.float32)
    if kind == "bias":
        return _bias(volume, params["coefficients"], float(params["peak_to_peak"]))
    raise ValueError(f"unknown artifact kind {kind!r}")


def degrade(
    volume: np.ndarray, spacing_mm: Sequence[float], kind: str, severity: int, seed: int, pe_axis: int | None = None
) -> tuple[np.ndarray, Degradation]:
    """Draw and apply one degradation; returns the degraded volume and its record."""
    params = draw_params(kind, severity, seed, pe_axis)
    return apply_params(volume, spacing_mm, kind, params), Degradation(kind, severity, seed, params)


def draw_mixture(
    seed: int, kinds: Sequence[str] = KINDS, n_kinds: tuple[int, int] = (2, 3), max_severity: int = MAX_SEVERITY
) -> list[tuple[str, int, int]]:
    """Random mixture: 2..3 distinct kinds, each with a severity in 1..max_severity and its own seed."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(n_kinds[0], n_kinds[1] + 1))
    chosen = rng.choice(len(kinds), size=min(n, len(kinds)), replace=False)
    parts = [(kinds[int(i)], int(rng.integers(1, max_severity + 1)), int(rng.integers(0, 2**31 - 1))) for i in chosen]
    return sorted(parts, key=lambda part: APPLY_ORDER.index(part[0]))


def degrade_mixture(
    volume: np.ndarray, spacing_mm: Sequence[float], parts: Sequence[tuple[str, int, int]], pe_axis: int | None = None
) -> tuple[np.ndarray, list[Degradation]]:
    """Apply ``parts`` ((kind, severity, seed) triples) in :data:`APPLY_ORDER`; returns volume and records."""
    records = []
    out = np.asarray(volume, dtype=np.float32)
    for kind, severity, seed in sorted(parts, key=lambda part: APPLY_ORDER.index(part[0])):
        out, record = degrade(out, spacing_mm, kind, severity, seed, pe_axis)
        records.append(record)
    return out, records


# ----------------------------------------------------------------------------------------------- the physics


def _reference(volume: np.ndarray) -> float:
    nonzero = volume[volume > 0]
    return float(np.percentile(nonzero, 99)) if nonzero.size else 1.0


def _rician(volume: np.ndarray, sigma_fraction: float, seed: int) -> np.ndarray:
    """Magnitude of (volume + n_re) + i n_im, n ~ N(0, sigma^2) per native voxel, sigma relative to the p99."""
    if sigma_fraction == 0.0:
        return volume.copy()
    sigma = np.float32(sigma_fraction * _reference(volume))
    rng = np.random.default_rng(seed)
    real = volume + sigma * rng.standard_normal(volume.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(volume.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def _line_index(shape: Sequence[int], axis: int) -> np.ndarray:
    """k-space line index along ``axis`` in acquisition order: 0 at the centre line (fftfreq order)."""
    n = shape[axis]
    return np.fft.fftfreq(n) * n  # -n/2 .. n/2-1, centre 0


def _motion(volume: np.ndarray, spacing: tuple[float, float, float], params: Mapping[str, Any]) -> np.ndarray:
    """Shot-to-shot rigid motion: the lines of each shot come from the head in that shot's pose.

    Translations are exact phase ramps; rotations are applied in the image (linear interpolation) for a few
    representative poses. The shot containing the centre line is the reference (unmoved) pose.
    """
    translation = np.asarray(params["translation_mm"], dtype=np.float64)
    rotation = np.asarray(params["rotation_deg"], dtype=np.float64)
    if not translation.any() and not rotation.any():
        return volume.copy()
    axis, shots = int(params["axis"]), int(params["shots"])
    n = volume.shape[axis]
    lines = np.arange(n)
    # which shot acquires each line (in array index order): contiguous segments or interleaved
    shot_of_line = (lines % shots) if params.get("interleaved") else (lines * shots // n)
    centre_shot = shot_of_line[0]  # fft index 0 is the centre line
    translation = translation - translation[centre_shot]
    rotation = rotation - rotation[centre_shot]
    # rotations: group shots into 3 rotation bins by their rotation magnitude pattern (cost), plus the unmoved one
    rot_norm = np.linalg.norm(rotation, axis=1)
    bins = np.zeros(shots, dtype=int)
    if rot_norm.max() > 0.05:
        edges = np.quantile(rot_norm, [1 / 2])
        bins = 1 + np.searchsorted(edges, rot_norm)
        bins[centre_shot] = 0
    out_k = np.zeros(volume.shape, dtype=np.complex64)
    freqs = [np.fft.fftfreq(m, d=s).astype(np.float32) for m, s in zip(volume.shape, spacing, strict=True)]
    for b in np.unique(bins):
        members = np.flatnonzero(bins == b)
        if b == 0:
            image = volume
        else:
            angles = np.radians(rotation[members].mean(axis=0))
            image = _rotate(volume, angles, spacing)
        k = np.fft.fftn(image).astype(np.complex64)
        for shot in members:
            sel = shot_of_line == shot
            if not sel.any():
                continue
            index = [slice(None)] * 3
            index[axis] = sel
            ramp = np.ones((1, 1, 1), dtype=np.complex64)
            for d in range(3):
                f = freqs[d] if d != axis else freqs[d][sel]
                shape = [1, 1, 1]
                shape[d] = f.size
                ramp = ramp * np.exp(-2j * np.pi * f * np.float32(translation[shot, d])).reshape(shape).astype(
                    np.complex64
                )
            out_k[tuple(index)] = k[tuple(index)] * ramp
    return np.abs(np.fft.ifftn(out_k)).astype(np.float32)


def _rotate(volume: np.ndarray, angles_rad: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Rotate about the volume centre by small angles (x, y, z), in mm space; linear interpolation."""
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot_mm = rz @ ry @ rx
    s = np.diag(spacing)
    matrix = np.linalg.inv(s) @ rot_mm.T @ s  # output voxel -> input voxel
    centre = (np.asarray(volume.shape) - 1) / 2.0
    offset = centre - matrix @ centre
    return ndimage.affine_transform(volume, matrix, offset=offset, order=1, mode="constant", cval=0.0)


def _ghosting(volume: np.ndarray, axis: int, period: int, amplitude: float) -> np.ndarray:
    """N/k ghosts: every ``period``-th phase-encode line is scaled so that ghosts of ``amplitude`` appear.

    Scaling lines with index % period == 0 by (1 + g*period) gives the image plus ghosts shifted by multiples of
    N/period, each of relative amplitude g (exact for N divisible by period).
    """
    if amplitude == 0.0:
        return volume.copy()
    k = np.fft.fftn(volume).astype(np.complex64)
    index = [slice(None)] * 3
    index[axis] = slice(0, None, period)
    # lines with index % period != 0 lose, those with == 0 gain: the mean (the image) stays, ghosts appear
    k *= np.float32(1.0 - amplitude)
    k[tuple(index)] *= np.float32((1.0 - amplitude + amplitude * period) / (1.0 - amplitude))
    return np.abs(np.fft.ifftn(k)).astype(np.float32)


def _phase_ghosting(volume: np.ndarray, axis: int, amplitude: float) -> np.ndarray:
    """An N/2 ghost from a phase error phi on every other phase-encode line: the image keeps cos(phi/2) of its
    amplitude, the ghost (shifted by N/2, in quadrature with the image) gets sin(phi/2); ghost/image = ``amplitude``
    = tan(phi/2)."""
    if amplitude == 0.0:
        return volume.copy()
    k = np.fft.fftn(volume).astype(np.complex64)
    index = [slice(None)] * 3
    index[axis] = slice(1, None, 2)
    k[tuple(index)] *= np.complex64(np.exp(2j * np.arctan(amplitude)))
    return np.abs(np.fft.ifftn(k)).astype(np.float32)


def _spike(volume: np.ndarray, position: Sequence[float], amplitude: float) -> np.ndarray:
    """One k-space spike at ``position`` (fraction of each axis' k-space, from the centre): stripes whose
    amplitude is ``amplitude`` times the head's 99th percentile."""
    if amplitude == 0.0:
        return volume.copy()
    k = np.fft.fftn(volume).astype(np.complex64)
    where = tuple(int(round(p * n)) % n for p, n in zip(position, volume.shape, strict=True))
    k[where] += np.float32(amplitude * _reference(volume) * volume.size)  # a stripe of that amplitude
    return np.abs(np.fft.ifftn(k)).astype(np.float32)


def _bias(volume: np.ndarray, coefficients: Sequence[float], peak_to_peak: float) -> np.ndarray:
    """A smooth field exp(p(x, y, z)) (order-2 polynomial in normalised coordinates) scaled to ``peak_to_peak``."""
    if peak_to_peak == 0.0:
        return volume.copy()
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in volume.shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    c = [float(v) for v in coefficients]
    poly = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * x * z + c[5] * y * z
    poly = poly + c[6] * x * x + c[7] * y * y + c[8] * z * z + c[9] * x * y * z
    poly = np.broadcast_to(poly, volume.shape)
    inside = volume > 0.1 * _reference(volume)
    values = poly[inside] if inside.any() else poly.ravel()
    span = float(values.max() - values.min()) or 1.0
    log_range = np.log1p(peak_to_peak)  # max/min of the field inside the head = 1 + peak_to_peak
    field = np.exp((poly - float(values.mean())) * (log_range / span)).astype(np.float32)
    return volume * field
