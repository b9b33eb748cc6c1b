"""Training data: clean volumes + simulated artifacts, or an MRIQC-style table of rated scans; subject splits.

Two sources, one output: a *cache* folder of preprocessed volumes (resampled to the model's spacing and
normalised exactly as the daemon does, stored as float16 ``.npy``) plus ``manifest.jsonl``, one JSON line per
volume::

    {"file", "dataset", "subject", "kind", "severity", "label", "degradations": [...], "source"}

* ``source = "clean"`` (:func:`build_clean_cache`): every NIfTI under each root is a clean subject. Each
  version of a subject (:func:`degraded_versions`) is made by :func:`make_version`: re-acquired
  (``trainer.acquisition``, with ``data.acquisition``), degraded on that native grid (``trainer.artifacts``),
  labelled there against the re-acquired clean scan (:func:`trainer.labels.quality_label`, a 1.5 mm window), then
  resampled and normalised by the daemon's own code. Seeds derive from (dataset, subject, version) so the cache
  is reproducible; every degradation's parameters and the acquisition are recorded.
* ``source = "table"`` (:func:`build_table_cache`): an MRIQC-style TSV/CSV with a path column (or a BIDS
  name column resolved under ``bids_root``) and IQM columns; the label is the ``target`` column
  (``snr_total`` by default).

Splits are by subject (``dataset/subject``), never by patch or version: :func:`split_items`. The label maps
to the network's score (1 = best) with a :class:`~qc_daemon.model_contract.ScoreCalibration` fitted on the
*training* labels only (:func:`fit_calibration`) and stored in the checkpoint's ``model_meta``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qc_daemon.model_contract import Normalisation, ScoreCalibration
from qc_daemon.preprocess import normalise, resample_to_spacing
from trainer import artifacts
from trainer.acquisition import IDENTITY, Acquisition, acquire, draw_acquisition, head_box
from trainer.config import DataSection
from trainer.labels import LABEL_NAME, head_mask, quality_label

MANIFEST = "manifest.jsonl"
NORMALISATION = Normalisation()
_SUBJECT_RE = re.compile(r"sub-([A-Za-z0-9]+)")


@dataclasses.dataclass(frozen=True)
class VolumeItem:
    """One cached, preprocessed volume and its label."""

    file: str  # path of the .npy, relative to the cache folder
    dataset: str
    subject: str
    kind: str  # "clean", an artifact kind, "mixture", or "rated" (table source)
    severity: int
    label: float
    degradations: tuple[dict[str, Any], ...] = ()
    source: str = "clean"
    acquisition: dict[str, Any] = dataclasses.field(default_factory=dict)  # trainer.acquisition.Acquisition

    @property
    def group(self) -> str:
        """The split unit: one subject of one dataset."""
        return f"{self.dataset}/{self.subject}"

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["degradations"] = list(self.degradations)
        return json.dumps(data)

    @classmethod
    def from_json(cls, line: str) -> VolumeItem:
        data = json.loads(line)
        data["degradations"] = tuple(data.get("degradations", ()))
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class SourceVolume:
    path: Path
    dataset: str
    subject: str


# ----------------------------------------------------------------------------------------------- loading


def load_ras(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume reoriented to RAS (as the daemon does) as float32, with its voxel size in mm."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data, zooms  # type: ignore[return-value]


def subject_of(name: str) -> str:
    """BIDS subject label from a file or BIDS name (``sub-01_T1w.nii.gz`` -> ``01``), else the stem."""
    match = _SUBJECT_RE.search(name)
    return match.group(1) if match else Path(name).name.split(".")[0]


def find_clean_subjects(roots: Iterable[str | Path]) -> list[SourceVolume]:
    """Every ``*.nii``/``*.nii.gz`` under each root (recursively), one per subject; dataset = root's name."""
    out: list[SourceVolume] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.name.endswith((".nii", ".nii.gz")))
        seen: set[str] = set()
        for path in files:
            subject = subject_of(path.name)
            if subject in seen:
                continue
            seen.add(subject)
            out.append(SourceVolume(path, root.name, subject))
    return out


def to_model_grid(volume: np.ndarray, spacing_mm: Sequence[float], target_mm: Sequence[float]) -> np.ndarray:
    """Resample to the model's spacing, the daemon's first preprocessing step (not yet normalised)."""
    return resample_to_spacing(volume, tuple(spacing_mm), tuple(target_mm))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- caches


def _fingerprint(data: DataSection) -> str:
    keys = {
        "source": data.source,
        "spacing_mm": list(data.spacing_mm),
        "kinds": list(data.kinds),
        # only weights other than 1 (none = every existing cache stays valid)
        **({"kind_weights": weights} if (weights := {k: w for k, w in data.kind_weights.items() if w != 1}) else {}),
        "max_severity": data.max_severity,
        "mixtures": data.mixtures_per_subject,
        "versions_per_subject": data.versions_per_subject,
        "clean_versions_per_subject": data.clean_versions_per_subject,
        "min_versions_per_dataset": data.min_versions_per_dataset,
        "acquisition": data.acquisition,
        "acquisition_design": (
            draw_acquisition(0, (1.0, 1.0, 1.0), max_margin=data.fov_margin).to_dict() if data.acquisition else None
        ),
        **({"fov_margin": data.fov_margin} if data.fov_margin else {}),
        "severity_table": artifacts.SEVERITY_TABLE,
        # the random half's design: a changed draw_params invalidates the cache
        "artifact_params": {
            k: [artifacts.draw_params(k, s, 0) for s in range(1, artifacts.MAX_SEVERITY + 1)] for k in artifacts.KINDS
        },
        "label": LABEL_NAME,
        "normalisation": NORMALISATION.to_json(),
        "table": data.table,
        "target": data.target,
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(cache_dir: str | Path) -> list[VolumeItem]:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return []
    return [VolumeItem.from_json(line) for line in path.read_text().splitlines() if line.strip()]


def _open_cache(cache_dir: Path, data: DataSection) -> list[VolumeItem]:
    """Existing items if the cache was built with the same data settings; otherwise start it afresh."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp = cache_dir / "fingerprint.txt"
    fingerprint = _fingerprint(data)
    if stamp.exists() and stamp.read_text().strip() == fingerprint:
        return read_manifest(cache_dir)
    (cache_dir / MANIFEST).unlink(missing_ok=True)
    stamp.write_text(fingerprint + "\n")
    return []


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


Version = tuple[str, int, list[tuple[str, int, int]]]


def degraded_versions(data: DataSection, dataset: str, subject: str, n_versions: int = 0) -> list[Version]:
    """The versions made for one subject: (kind, severity, [(kind, severity, seed), ...]) with fixed seeds.

    ``n_versions`` (else ``data.versions_per_subject``) = 0: one clean version, every kind at every severity,
    then the mixtures. > 0: ``clean_versions_per_subject`` clean versions (each re-acquired differently), the kinds
    in a seeded order at random severities (each kind ``data.kind_weights`` turns per round, 1 when absent), and the
    last ``mixtures_per_subject`` versions mixtures.
    """
    n_versions = n_versions or data.versions_per_subject
    versions: list[Version] = []
    if not n_versions:
        versions.append(("clean", 0, []))
        for kind in data.kinds:
            for severity in range(1, data.max_severity + 1):
                versions.append((kind, severity, [(kind, severity, _seed(dataset, subject, kind, severity))]))
        n_mixtures = data.mixtures_per_subject
    else:
        rng = np.random.default_rng(_seed(dataset, subject, "versions"))
        n_clean = min(data.clean_versions_per_subject, n_versions)
        n_mixtures = min(data.mixtures_per_subject, max(0, n_versions - n_clean - 1))
        versions += [("clean", 0, [])] * n_clean
        turns = [kind for kind in data.kinds for _ in range(data.kind_weights.get(kind, 1))]
        order = list(rng.permutation(len(turns)))
        for i in range(n_versions - n_clean - n_mixtures):
            kind = turns[int(order[i % len(order)])]
            severity = int(rng.integers(1, data.max_severity + 1))
            versions.append((kind, severity, [(kind, severity, _seed(dataset, subject, kind, severity, i))]))
    for m in range(n_mixtures):
        parts = artifacts.draw_mixture(
            _seed(dataset, subject, "mixture", m), data.kinds, max_severity=data.max_severity
        )
        versions.append(("mixture", max(s for _, s, _ in parts), parts))
    return versions


def make_version(
    raw: np.ndarray,
    spacing_mm: Sequence[float],
    data: DataSection,
    seed: int,
    parts: Sequence[tuple[str, int, int]],
) -> tuple[np.ndarray, float, list[artifacts.Degradation], Acquisition]:
    """One training volume from a clean native scan: re-acquire, degrade on that grid, label, preprocess.

    Returns the model input (the daemon's resampling and normalisation of the degraded scan), the label (SSIM
    against the re-acquired clean scan on its own grid, 1.0 for a clean version), the degradation records and
    the acquisition.
    """
    rng = np.random.default_rng(seed)
    acquisition = (
        draw_acquisition(int(rng.integers(0, 2**31 - 1)), spacing_mm, max_margin=data.fov_margin)
        if data.acquisition
        else IDENTITY
    )
    clean, spacing = acquire(raw, spacing_mm, acquisition)
    in_plane = [a for a in range(3) if a != acquisition.thick_axis]
    pe_axis = int(in_plane[int(rng.integers(0, len(in_plane)))])
    if parts:
        degraded, records = artifacts.degrade_mixture(clean, spacing, parts, pe_axis)
        reference = normalise(clean, NORMALISATION)
        label = quality_label(
            reference,
            normalise(degraded, NORMALISATION),
            mask=head_mask(reference),
            already_normalised=True,
            spacing_mm=spacing,
        )
    else:
        degraded, records, label = clean, [], 1.0
    volume = normalise(to_model_grid(degraded, spacing, data.spacing_mm), NORMALISATION)
    return volume, label, records, acquisition


def _cache_subject(args: tuple[SourceVolume, DataSection, str, int]) -> list[VolumeItem]:
    """Every version of one subject, written to the cache folder (a worker process's unit of work)."""
    source, data, cache, n_versions = args
    raw, spacing = load_ras(source.path)
    raw = np.ascontiguousarray(raw[head_box(raw)])  # less to compute, same head
    out: list[VolumeItem] = []
    for index, (kind, severity, parts) in enumerate(degraded_versions(data, source.dataset, source.subject, n_versions)):
        seed = _seed(source.dataset, source.subject, "version", index)
        volume, label, records, acquisition = make_version(raw, spacing, data, seed, parts)
        name = f"{source.dataset}_sub-{source.subject}_{index:03d}.npy"
        np.save(Path(cache) / name, volume.astype(np.float16))
        out.append(
            VolumeItem(
                name,
                source.dataset,
                source.subject,
                kind,
                severity,
                round(float(label), 6),
                tuple(r.to_dict() for r in records),
                "clean",
                acquisition.to_dict(),
            )
        )
    return out


def select_subjects(subjects: Sequence[SourceVolume], data: DataSection) -> list[SourceVolume]:
    """At most ``max_subjects_per_dataset`` subjects of each dataset (the first ones in name order)."""
    if not data.max_subjects_per_dataset:
        return list(subjects)
    counts: dict[str, int] = {}
    out = []
    for s in subjects:
        counts[s.dataset] = counts.get(s.dataset, 0) + 1
        if counts[s.dataset] <= data.max_subjects_per_dataset:
            out.append(s)
    return out


def versions_for(subjects: Sequence[SourceVolume], data: DataSection) -> dict[str, int]:
    """Versions per subject of each dataset: versions_per_subject, raised so that a dataset with few subjects
    still gets min_versions_per_dataset in all."""
    per_dataset: dict[str, int] = {}
    for s in subjects:
        per_dataset[s.dataset] = per_dataset.get(s.dataset, 0) + 1
    if not data.versions_per_subject:
        return {d: 0 for d in per_dataset}
    return {
        d: max(data.versions_per_subject, -(-data.min_versions_per_dataset // n)) for d, n in per_dataset.items()
    }


def build_clean_cache(
    data: DataSection,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    subjects: Sequence[SourceVolume] | None = None,
) -> list[VolumeItem]:
    """Make (or complete) the clean-source cache; subjects already cached are skipped. Returns every item.

    Subjects are processed by ``data.workers`` processes; the manifest is appended one subject at a time, so an
    interrupted build resumes.
    """
    cache = Path(cache_dir or data.cache_dir)
    items = _open_cache(cache, data)
    done = {item.group for item in items}
    chosen = select_subjects(subjects if subjects is not None else find_clean_subjects(data.roots), data)
    n_versions = versions_for(chosen, data)
    todo = [(s, data, str(cache), n_versions[s.dataset]) for s in chosen if f"{s.dataset}/{s.subject}" not in done]
    if data.workers > 1 and len(todo) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(data.workers) as pool:
            results = pool.imap_unordered(_cache_subject, todo)
            for new in _progress(results, progress, "caching subjects", total=len(todo)):
                _append(cache, new)
                items.extend(new)
    else:
        for job in _progress(todo, progress, "caching subjects"):
            new = _cache_subject(job)
            _append(cache, new)
            items.extend(new)
    return items


def _append(cache: Path, new: Sequence[VolumeItem]) -> None:
    with open(cache / MANIFEST, "a") as fh:
        fh.writelines(item.to_json() + "\n" for item in new)


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a TSV (``.tsv``) or CSV file as dicts."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def resolve_table_path(row: dict[str, str], data: DataSection, table_dir: Path) -> Path:
    """The NIfTI a table row describes: its path column, else its BIDS name searched under ``bids_root``."""
    value = (row.get(data.path_column) or "").strip()
    if value:
        path = Path(value)
        if not path.is_absolute():
            base = Path(data.bids_root) if data.bids_root else table_dir
            path = base / path
        return path
    name = (row.get(data.name_column) or "").strip()
    if not name:
        raise ValueError(f"table row has neither {data.path_column!r} nor {data.name_column!r}: {row}")
    root = Path(data.bids_root) if data.bids_root else table_dir
    for suffix in (".nii.gz", ".nii"):
        hits = sorted(root.rglob(f"{name}{suffix}"))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"no {name}.nii[.gz] under {root}")


def build_table_cache(
    data: DataSection, cache_dir: str | Path | None = None, progress: bool = False
) -> list[VolumeItem]:
    """Make (or complete) the cache for an MRIQC-style table; the label is the ``data.target`` column."""
    cache = Path(cache_dir or data.cache_dir)
    items = _open_cache(cache, data)
    done = {item.file for item in items}
    table = Path(data.table)
    rows = read_table(table)
    if rows and data.target not in rows[0]:
        raise KeyError(f"data.target: column {data.target!r} not in {table} (columns: {', '.join(rows[0])})")
    if data.max_volumes:
        rows = rows[: data.max_volumes]
    dataset = table.stem
    for index, row in enumerate(_progress(rows, progress, "caching table")):
        name = f"{dataset}_{index:05d}.npy"
        if name in done:
            continue
        try:
            label = float(row[data.target])
        except ValueError as exc:
            raise ValueError(f"data.target: row {index} has non-numeric {data.target}={row[data.target]!r}") from exc
        path = resolve_table_path(row, data, table.parent)
        subject = (row.get(data.subject_column) or "").strip() or subject_of(
            (row.get(data.name_column) or "").strip() or path.name
        )
        raw, spacing = load_ras(path)
        volume = normalise(to_model_grid(raw, spacing, data.spacing_mm), NORMALISATION)
        np.save(cache / name, volume.astype(np.float16))
        item = VolumeItem(name, dataset, subject, "rated", 0, label, (), "table")
        with open(cache / MANIFEST, "a") as fh:
            fh.write(item.to_json() + "\n")
        items.append(item)
    return items


def build_cache(data: DataSection, progress: bool = False) -> list[VolumeItem]:
    """The cache for ``data.source``."""
    if data.source == "table":
        return build_table_cache(data, progress=progress)
    roots = list(data.roots) if data.split == "holdout" else list(dict.fromkeys([*data.train_roots, *data.test_roots]))
    return build_clean_cache(data, progress=progress, subjects=find_clean_subjects(roots))


def load_volume(cache_dir: str | Path, item: VolumeItem) -> np.ndarray:
    """The cached, normalised volume as float32."""
    return np.load(Path(cache_dir) / item.file).astype(np.float32)


# ----------------------------------------------------------------------------------------------- splits


def split_items(items: Sequence[VolumeItem], data: DataSection, seed: int = 0) -> dict[str, list[VolumeItem]]:
    """{"train", "val", "test"} by subject; no subject appears in two parts.

    ``holdout``: within each dataset, subjects are shuffled (seeded) and the first round(n*test_fraction)
    go to test, the next round(n*val_fraction) to val (at least one each when the fraction is > 0 and the
    dataset has >= 3 subjects). ``cross``: test = every subject of the ``test_roots`` datasets, train/val =
    those of ``train_roots``, val drawn from them by ``val_fraction``.
    """
    by_dataset: dict[str, list[str]] = {}
    for item in items:
        by_dataset.setdefault(item.dataset, [])
        if item.subject not in by_dataset[item.dataset]:
            by_dataset[item.dataset].append(item.subject)
    part_of: dict[str, str] = {}
    if data.split == "cross":
        train_sets = {Path(r).name for r in data.train_roots}
        test_sets = {Path(r).name for r in data.test_roots}
        overlap = train_sets & test_sets
        if overlap:
            raise ValueError(f"data.test_roots: {sorted(overlap)} also in train_roots")
    for dataset, subjects in sorted(by_dataset.items()):
        rng = np.random.default_rng(_seed("split", seed, dataset))
        order = [subjects[i] for i in rng.permutation(len(subjects))]
        if data.split == "cross":
            if dataset in test_sets:
                part_of.update({f"{dataset}/{s}": "test" for s in order})
                continue
            if dataset not in train_sets:
                continue
            n_test = 0
        else:
            n_test = _count(len(order), data.test_fraction)
        n_val = _count(len(order) - n_test, data.val_fraction) if len(order) - n_test >= 2 else 0
        for i, subject in enumerate(order):
            part_of[f"{dataset}/{subject}"] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    out: dict[str, list[VolumeItem]] = {"train": [], "val": [], "test": []}
    for item in items:
        part = part_of.get(item.group)
        if part:
            out[part].append(item)
    return out


def _count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 3:
        return 0
    return max(1, round(n * fraction))


def fit_calibration(items: Sequence[VolumeItem], data: DataSection) -> ScoreCalibration:
    """Label -> score mapping from the training labels.

    Clean source (SSIM label), per artifact kind, anchored to physical severities rather than to a percentile of
    the labels: score 1 at SSIM 1; the median label of that kind at severity ``REPEAT_SEVERITY - 1`` (degraded
    but diagnostic) -> ``calib_moderate_score``; at ``REPEAT_SEVERITY`` (a scan to repeat) ->
    ``calib_repeat_score``; the same slope on down to 0. SSIM weighs the kinds very differently (12 % ghosts
    leave SSIM ~0.97, noise at WM SNR 9 ~0.8), so one curve for all would alert on mild noise or never on ghosts.
    Kinds in ``calib_physical_kinds`` are anchored on their physical magnitude instead (``_physical_knots``).
    With no training volume at those severities (a smoke-test config), the linear mapping: 0 at the
    ``calib_low_percentile``-th percentile of the labels. Bias field gets the median of the other kinds' curves: a smooth shading barely changes SSIM and is no reason
    to repeat a scan. The linear ``label_at_0`` is the pooled curve's zero, for a reader of the metadata.

    Table source: score 1 at the (100 - p)-th and 0 at the p-th percentile when higher is better, the reverse
    otherwise (p = ``calib_low_percentile``).
    """
    labels = np.asarray([item.label for item in items], dtype=np.float64)
    if labels.size == 0:
        raise ValueError("no training labels to calibrate on")
    if data.source == "clean":
        anchors = {}
        for kind in data.kinds:
            moderate = [i.label for i in items if i.kind == kind and i.severity == artifacts.REPEAT_SEVERITY - 1]
            repeat = [i.label for i in items if i.kind == kind and i.severity == artifacts.REPEAT_SEVERITY]
            if kind in data.calib_physical_kinds:
                continue
            if kind != "bias" and moderate and repeat:
                anchors[kind] = _anchor_knots(float(np.median(moderate)), float(np.median(repeat)), data)
        if not anchors:  # too few severities (a smoke test): the linear mapping, 0 at the low label percentile
            low = min(float(np.percentile(labels, data.calib_low_percentile)), 0.999)
            return ScoreCalibration(LABEL_NAME, round(low, 4), 1.0)
        pooled = _anchor_knots(
            float(np.median([k[2][0] for k in anchors.values()])),
            float(np.median([k[1][0] for k in anchors.values()])),
            data,
        )
        if "bias" in data.kinds and "bias" not in data.calib_physical_kinds:
            anchors["bias"] = pooled
        for kind in data.calib_physical_kinds:
            anchors[kind] = _physical_knots(kind, data)
        ordered = tuple((kind, anchors[kind]) for kind in data.kinds if kind in anchors)
        physical = tuple(k for k in data.kinds if k in data.calib_physical_kinds)
        return ScoreCalibration(LABEL_NAME, pooled[0][0], 1.0, ordered, physical)
    p = data.calib_low_percentile
    lo, hi = (float(v) for v in np.percentile(labels, [p, 100 - p]))
    if hi == lo:
        hi = lo + 1e-6
    if data.higher_is_better:
        return ScoreCalibration(data.target, lo, hi)
    return ScoreCalibration(data.target, hi, lo)


def _anchor_knots(moderate: float, repeat: float, data: DataSection) -> tuple[tuple[float, float], ...]:
    """Knots (label, score): zero, repeat, moderate, 1 -- strictly increasing labels."""
    moderate = min(moderate, 0.999)
    repeat = min(repeat, moderate - 1e-3)
    slope = (data.calib_moderate_score - data.calib_repeat_score) / (moderate - repeat)
    zero = repeat - data.calib_repeat_score / slope
    knots = ((zero, 0.0), (repeat, data.calib_repeat_score), (moderate, data.calib_moderate_score), (1.0, 1.0))
    return tuple((round(a, 5), round(b, 5)) for a, b in knots)


def _physical_knots(kind: str, data: DataSection) -> tuple[tuple[float, float], ...]:
    """Knots (magnitude, score) through the physical magnitudes of severities REPEAT-1 and REPEAT."""
    table = artifacts.SEVERITY_TABLE[kind]
    moderate, repeat = table[artifacts.REPEAT_SEVERITY - 1], table[artifacts.REPEAT_SEVERITY]
    slope = (data.calib_moderate_score - data.calib_repeat_score) / (repeat - moderate)
    zero = repeat + data.calib_repeat_score / slope
    knots = ((0.0, 1.0), (moderate, data.calib_moderate_score), (repeat, data.calib_repeat_score), (zero, 0.0))
    return tuple((round(a, 5), round(b, 5)) for a, b in knots)


def target_score(item: VolumeItem, calibration: ScoreCalibration) -> float:
    """The score the network is trained to give ``item``: its label through its kind's calibration curve.

    A mixture is scored by the most lenient curve among its parts' label-anchored kinds (its SSIM holds every
    part's damage), and no higher than any part whose kind is anchored on its physical magnitude.
    """
    if item.kind == "clean":
        return 1.0
    parts = list(item.degradations) or [{"kind": item.kind, "params": None}]
    physical = [
        calibration.score_from_label(artifacts.physical_magnitude(p["kind"], p["params"]), p["kind"])
        for p in parts
        if p["kind"] in calibration.physical_kinds and p.get("params") is not None
    ]
    by_label = [
        calibration.score_from_label(item.label, p["kind"]) for p in parts if p["kind"] not in calibration.physical_kinds
    ]
    candidates = ([max(by_label)] if by_label else []) + physical
    return min(candidates) if candidates else 1.0


def _progress(seq: Iterable[Any], enabled: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    if not enabled:
        return seq
    from tqdm import tqdm

    return tqdm(seq, desc=desc, unit="vol", total=total)
