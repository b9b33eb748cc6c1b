"""The spike check: a k-space spike's stripes, measured directly, floor the quality score (the model misses them).

One corrupted k-space sample adds a plane wave to the image: stripes (a "herringbone") across the whole head. The
network does not see them on scanners it was not trained on (MODEL_CARD.md: spikes score higher than the clean
scan), because resampling to the model's 2 mm grid averages stripes finer than 4 mm away. This check looks where a
spike is a single point: the magnitude spectrum of the volume as acquired. Every second voxel along each axis is
kept first (a plane wave stays a plane wave, at a folded frequency; the anatomy's spectrum stays smooth), so the
FFT costs an eighth. A spike is a spectral peak far above its surroundings: each coefficient over the mean of
the shell around it (the 9x9x9 cube minus the 3x3x3 core) is its prominence; the low frequencies (a box of
:data:`LOW_FREQUENCY` around the centre: the head's own spectrum is steep there) and the planes through the centre
(the field of view's edges draw lines along them) are left out. The most prominent coefficient above
:data:`MIN_PROMINENCE` (1.6 times the largest of 72 clean scans of six sites) is a spike; its stripe
amplitude, as a fraction of the head's 99th percentile, is twice the modulus of that frequency's Fourier
coefficient over the head's voxels alone (in the air a magnitude image may carry the stripes or not, depending on
how the scanner made it).

The amplitude is mapped onto the trainer's spike severities (`trainer/artifacts.py`: 1, 2, 4, 7, 12 % of the
p99; 4 % is the level to repeat, trained to 0.3, 2 % to 0.65) through what this measurement reads for them (the
median over 10 heads of 6 sites: 0.009, 0.018, 0.035; a 1 % spike changes nothing). The series' score is the
lowest of the model's and the checks'. bench/bench_spike_check.py makes the measurements behind the constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from qc_daemon.iqms import IqmError, head_mask

MIN_AXIS_VOXELS = 32  # below this (after decimation) the spectrum is too coarse for a shell around a peak
LOW_FREQUENCY = 0.04  # cycles per (decimated) voxel, on every axis: there the head's own spectrum dominates
MIN_PROMINENCE = 12.0
# (stripe amplitude, fraction of the head's p99; score): piecewise linear, flat outside
AMPLITUDE_TO_SCORE: tuple[tuple[float, float], ...] = ((0.009, 1.0), (0.018, 0.65), (0.035, 0.3), (0.07, 0.0))


@dataclass(frozen=True)
class SpikeMeasure:
    prominence: float | None  # the most prominent spectral peak's ratio to its shell; None when not measurable
    amplitude: float | None  # its stripe amplitude (fraction of the head's p99) when it is a spike, else None
    reason: str | None = None  # why there is no measure

    @property
    def score(self) -> float:
        """1 without a spike; lower as its stripes grow (:data:`AMPLITUDE_TO_SCORE`)."""
        if self.amplitude is None:
            return 1.0
        amplitudes, scores = zip(*AMPLITUDE_TO_SCORE, strict=True)
        return float(np.interp(self.amplitude, amplitudes, scores))


def measure_spike(volume: np.ndarray) -> SpikeMeasure:
    """The most prominent point of the magnitude spectrum of a 3D volume on its acquired grid, and whether it is
    a spike (see the module's docstring)."""
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim != 3:
        return SpikeMeasure(None, None, f"expected a 3D volume, got shape {v.shape}")
    step = tuple(2 if n >= 2 * MIN_AXIS_VOXELS else 1 for n in v.shape)
    v = np.ascontiguousarray(v[:: step[0], :: step[1], :: step[2]])
    if min(v.shape) < MIN_AXIS_VOXELS or not np.all(np.isfinite(v)):
        return SpikeMeasure(None, None, f"volume of shape {volume.shape} is too small or not finite")
    if float(v.max()) <= float(v.min()):
        return SpikeMeasure(None, None, "constant intensities")
    spectrum = np.abs(fft.fftn(v, workers=-1)).astype(np.float32)
    core = ndimage.uniform_filter(spectrum, 3, mode="wrap") * np.float32(27)
    cube = ndimage.uniform_filter(spectrum, 9, mode="wrap") * np.float32(729)
    shell = (cube - core) / np.float32(729 - 27)
    prominence = spectrum / np.maximum(shell, np.float32(1e-30))
    low = [np.abs(fft.fftfreq(n)) < LOW_FREQUENCY for n in v.shape]  # a box around the centre (with its wrap)
    prominence[np.ix_(*low)] = 0
    prominence[0, :, :] = prominence[:, 0, :] = prominence[:, :, 0] = 0
    peak = np.unravel_index(int(np.argmax(prominence)), prominence.shape)
    best = float(prominence[peak])
    if best < MIN_PROMINENCE:
        return SpikeMeasure(round(best, 2), None)
    try:
        inside = np.nonzero(head_mask(v))
    except IqmError as exc:
        return SpikeMeasure(round(best, 2), None, f"no head mask to read the stripes over: {exc}")
    values = v[inside]
    reference = float(np.percentile(values, 99))
    if reference <= 0:
        return SpikeMeasure(round(best, 2), None, "the head's 99th percentile is not positive")
    # The stripes' Fourier coefficient over the head alone (air may be modulated too, or not: leave it out).
    frequency = [float(fft.fftfreq(n)[i]) for n, i in zip(v.shape, peak, strict=True)]  # cycles per voxel
    phase = sum(np.float32(f) * index.astype(np.float32) for f, index in zip(frequency, inside, strict=True))
    coefficient = np.abs(np.mean(values * np.exp(np.complex64(-2j * np.pi) * phase)))
    return SpikeMeasure(round(best, 2), round(2 * float(coefficient) / reference, 4))
