"""Simulated MRI artifacts at graded severities, built on TorchIO's deterministic transforms.

Every degradation is split in two, so that any degraded volume can be re-made bit for bit:

* :func:`draw_params` (the *random* half) turns ``(kind, severity, seed)`` into a plain, JSON-able dict of
  parameters. The seed only draws the *shape* of the artifact (directions, times, axes, k-space positions);
  the *magnitude* is the explicit per-severity value in :data:`SEVERITY_TABLE`. Because the same seed gives
  the same shape at every severity, a seed's severities form a nested family that grows monotonically.
* :func:`apply_params` (the *deterministic* half) applies such a dict with TorchIO's deterministic
  transforms (``tio.Motion``, ``tio.Ghosting``, ``tio.Spike``, ``tio.Blur``, ``tio.BiasField``,
  ``tio.Noise``). Nothing random happens here.

Severity 0 is the identity for every kind. :func:`draw_mixture` combines several kinds, each at its own
severity, applied in a fixed physical order (:data:`APPLY_ORDER`: object/coil effects first, then
acquisition effects in k-space, thermal noise last).

Severity magnitudes (``SEVERITY_TABLE[kind][s]``, s = 0..4):

=========  ====================================================================================
noise      Rician noise std as a fraction of the head's 99th-percentile intensity: 0, .02, .04, .07, .11
motion     largest rotation (deg) and translation (mm) of each of 2 movements: 0, 1.5, 3, 5, 8; and the
           half-width of the central k-space band acquired in the unmoved pose (fraction of the lines along
           TorchIO's segment axis, +-20 % jitter): -, .20, .14, .09, .05 (:data:`MOTION_CENTRE_BAND`)
ghosting   ghost intensity (TorchIO ``Ghosting.intensity``; >1 inverts the modulated k-space planes, giving
           strong ghosts), 4..8 ghosts on one axis: 0, .6, 1.2, 1.8, 2.6
spike      spike intensity (fraction of k-space maximum), 1 spike: 0, .15, .35, .7, 1.3
blur       Gaussian std in mm (isotropic): 0, 1.0, 1.5, 2.0, 3.0
bias       bias-field coefficient scale (order 3 polynomial, log domain): 0, .15, .3, .5, .8
=========  ====================================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio

KINDS: tuple[str, ...] = ("noise", "motion", "ghosting", "spike", "blur", "bias")
MAX_SEVERITY = 4
SEVERITY_TABLE: dict[str, tuple[float, ...]] = {
    "noise": (0.0, 0.02, 0.04, 0.07, 0.11),
    "motion": (0.0, 1.5, 3.0, 5.0, 8.0),
    "ghosting": (0.0, 0.6, 1.2, 1.8, 2.6),
    "spike": (0.0, 0.15, 0.35, 0.7, 1.3),
    "blur": (0.0, 1.0, 1.5, 2.0, 3.0),
    "bias": (0.0, 0.15, 0.3, 0.5, 0.8),
}
# Motion: the patient holds still while the central band of k-space is acquired and moves before and after
# it; a worse scan has larger movements *and* a narrower still band. The band keeps the image in its original
# pose: were the k-space centre taken from a moved copy, the image would be displaced and the full-reference
# label would measure the displacement (a 2 mm shift of a perfect scan has SSIM 0.65), which no blind model
# can see. With the band, the label falls with severity with little seed-to-seed spread (see MODEL_CARD.md).
MOTION_CENTRE_BAND: tuple[float, ...] = (0.0, 0.20, 0.14, 0.09, 0.05)
APPLY_ORDER: tuple[str, ...] = ("bias", "blur", "motion", "ghosting", "spike", "noise")


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
    """The explicit magnitude of ``kind`` at ``severity`` (see the module table)."""
    if kind not in SEVERITY_TABLE:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
    if not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be in 0..{MAX_SEVERITY}, got {severity}")
    return SEVERITY_TABLE[kind][severity]


def draw_params(kind: str, severity: int, seed: int) -> dict[str, Any]:
    """The random half: parameters for ``kind`` at ``severity``; the seed fixes the artifact's shape only."""
    mag = magnitude(kind, severity)
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return {"std_fraction": mag, "noise_seed": int(rng.integers(0, 2**31 - 1))}
    if kind == "motion":
        n = 2
        directions = rng.uniform(-1.0, 1.0, size=(n, 3))
        directions /= np.abs(directions).max(axis=1, keepdims=True)  # largest component is +-1
        shifts = rng.uniform(-1.0, 1.0, size=(n, 3))
        shifts /= np.abs(shifts).max(axis=1, keepdims=True)
        # The first movement ends, and the second starts, a jittered half-width from the k-space centre;
        # tio.Motion fills that central band from the unmoved pose. See MOTION_CENTRE_BAND.
        half_width = MOTION_CENTRE_BAND[severity] * rng.uniform(0.8, 1.2, size=n)
        times = np.array([0.5 - half_width[0], 0.5 + half_width[1]])
        return {
            "degrees": (directions * mag).round(4).tolist(),
            "translation": (shifts * mag).round(4).tolist(),
            "times": times.round(4).tolist(),
        }
    if kind == "ghosting":
        return {"num_ghosts": int(rng.integers(4, 9)), "axis": int(rng.integers(0, 3)), "intensity": mag}
    if kind == "spike":
        position = rng.uniform(0.6, 0.85, size=(1, 3))  # off-centre k-space: visible stripes
        return {"positions": position.round(4).tolist(), "intensity": mag}
    if kind == "blur":
        return {"std_mm": [mag, mag, mag]}
    if kind == "bias":
        order = 3
        n_coef = sum(1 for x in range(order + 1) for y in range(order + 1 - x) for _ in range(order + 1 - (x + y)))
        coefficients = rng.uniform(-1.0, 1.0, size=n_coef) * mag
        return {"coefficients": coefficients.round(5).tolist(), "order": order}
    raise AssertionError(kind)


def apply_params(volume: np.ndarray, spacing_mm: Sequence[float], kind: str, params: Mapping[str, Any]) -> np.ndarray:
    """The deterministic half: apply ``params`` (from :func:`draw_params`) to a 3D float volume."""
    volume = np.asarray(volume, dtype=np.float32)
    if _is_identity(kind, params):
        return volume.copy()
    affine = np.diag([*map(float, spacing_mm), 1.0])
    image = tio.ScalarImage(tensor=torch.from_numpy(volume[None].copy()), affine=affine)
    if kind == "noise":
        return _rician(volume, params)
    if kind == "motion":
        transform: tio.Transform = tio.Motion(
            degrees=np.asarray(params["degrees"], dtype=float),
            translation=np.asarray(params["translation"], dtype=float),
            times=np.asarray(params["times"], dtype=float),
            image_interpolation="linear",
        )
    elif kind == "ghosting":
        transform = tio.Ghosting(
            num_ghosts=int(params["num_ghosts"]),
            axis=int(params["axis"]),
            intensity=float(params["intensity"]),
            restore=None,
        )
    elif kind == "spike":
        transform = tio.Spike(
            spikes_positions=np.asarray(params["positions"], dtype=float), intensity=float(params["intensity"])
        )
    elif kind == "blur":
        transform = tio.Blur(std=tuple(float(s) for s in params["std_mm"]))
    elif kind == "bias":
        transform = tio.BiasField(coefficients=list(params["coefficients"]), order=int(params["order"]))
    else:
        raise ValueError(f"unknown artifact kind {kind!r}")
    out = transform(image).data[0].numpy().astype(np.float32)
    return np.abs(out) if kind in ("motion", "ghosting", "spike") else out


def degrade(
    volume: np.ndarray, spacing_mm: Sequence[float], kind: str, severity: int, seed: int
) -> tuple[np.ndarray, Degradation]:
    """Draw and apply one degradation; returns the degraded volume and its record."""
    params = draw_params(kind, severity, seed)
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
    volume: np.ndarray, spacing_mm: Sequence[float], parts: Sequence[tuple[str, int, int]]
) -> tuple[np.ndarray, list[Degradation]]:
    """Apply ``parts`` ((kind, severity, seed) triples) in :data:`APPLY_ORDER`; returns volume and records."""
    records = []
    out = np.asarray(volume, dtype=np.float32)
    for kind, severity, seed in sorted(parts, key=lambda part: APPLY_ORDER.index(part[0])):
        out, record = degrade(out, spacing_mm, kind, severity, seed)
        records.append(record)
    return out, records


class RandomArtifact:
    """Random transform: draws a kind, a severity and a seed from ``rng``, then applies them deterministically.

    The returned :class:`Degradation` records carry everything needed to reproduce the result.
    """

    def __init__(self, kinds: Sequence[str] = KINDS, max_severity: int = MAX_SEVERITY, p_mixture: float = 0.2):
        self.kinds = tuple(kinds)
        self.max_severity = max_severity
        self.p_mixture = p_mixture

    def __call__(
        self, volume: np.ndarray, spacing_mm: Sequence[float], rng: np.random.Generator
    ) -> tuple[np.ndarray, list[Degradation]]:
        seed = int(rng.integers(0, 2**31 - 1))
        if rng.random() < self.p_mixture:
            return degrade_mixture(volume, spacing_mm, draw_mixture(seed, self.kinds, max_severity=self.max_severity))
        kind = self.kinds[int(rng.integers(0, len(self.kinds)))]
        severity = int(rng.integers(1, self.max_severity + 1))
        out, record = degrade(volume, spacing_mm, kind, severity, seed)
        return out, [record]


def _is_identity(kind: str, params: Mapping[str, Any]) -> bool:
    if kind == "noise":
        return float(params["std_fraction"]) == 0.0
    if kind == "motion":
        return not np.any(params["degrees"]) and not np.any(params["translation"])
    if kind in ("ghosting", "spike"):
        return float(params["intensity"]) == 0.0
    if kind == "blur":
        return not np.any(params["std_mm"])
    if kind == "bias":
        return not np.any(params["coefficients"])
    raise ValueError(f"unknown artifact kind {kind!r}")


def _rician(volume: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """Rician noise: magnitude of (volume + n_re) + i n_im, both Gaussian fields drawn with ``tio.Noise``.

    The std is ``std_fraction`` times the 99th percentile of the non-zero voxels, so it does not depend on
    the scanner's intensity scale.
    """
    nonzero = volume[volume > 0]
    reference = float(np.percentile(nonzero, 99)) if nonzero.size else 1.0
    std = float(params["std_fraction"]) * reference
    seed = int(params["noise_seed"])
    zeros = tio.ScalarImage(tensor=torch.zeros((1, *volume.shape)), affine=np.eye(4))
    real = volume + tio.Noise(mean=0.0, std=std, seed=seed)(zeros).data[0].numpy()
    imag = tio.Noise(mean=0.0, std=std, seed=seed + 1)(zeros).data[0].numpy()
    return np.sqrt(real**2 + imag**2).astype(np.float32)
