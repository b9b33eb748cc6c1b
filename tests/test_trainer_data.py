"""trainer.data: caches from clean folders and MRIQC-style tables, subject splits, calibration round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")
pytest.importorskip("torchio")
nib = pytest.importorskip("nibabel")

from qc_daemon.model_contract import ScoreCalibration
from trainer.config import DataSection
from trainer.data import (
    VolumeItem,
    build_cache,
    fit_calibration,
    load_volume,
    read_manifest,
    split_items,
)


def write_phantoms(root, n_subjects, shape=(36, 36, 36), spacing=2.0, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(axis=0))
    paths = []
    for i in range(n_subjects):
        v = np.where(r < 0.8, 500 + 100 * rng.normal(size=shape).clip(-2, 2), 0).astype(np.float32)
        v[r < 0.4] += 300
        path = root / f"sub-{i + 1:02d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(v, np.diag([spacing, spacing, spacing, 1.0])), str(path))
        paths.append(path)
    return paths


def items_for(groups, versions=3):
    return [
        VolumeItem(f"{d}_{s}_{k}.npy", d, s, "clean" if k == 0 else "noise", k, 1.0 - 0.1 * k)
        for d, s in groups
        for k in range(versions)
    ]


def test_calibration_round_trip():
    data = DataSection()
    items = items_for([("a", str(i)) for i in range(10)], versions=5)
    calibration = fit_calibration(items, data)
    assert calibration.label_at_1 == 1.0 and calibration.label_at_0 < 1.0
    assert calibration.score_from_label(1.0) == 1.0
    for label in (0.7, 0.8, 0.95):
        score = calibration.score_from_label(label)
        assert 0.0 <= score <= 1.0
        assert calibration.label_from_score(score) == pytest.approx(label)
    restored = ScoreCalibration.from_json(calibration.to_json())
    assert restored == calibration
    # table target where lower is better: higher label -> lower score
    table = DataSection(source="table", table="x.tsv", target="cjv", higher_is_better=False)
    rated = [VolumeItem(f"{i}.npy", "t", str(i), "rated", 0, float(i)) for i in range(20)]
    cal = fit_calibration(rated, table)
    assert cal.score_from_label(2.0) > cal.score_from_label(15.0)
    assert cal.label_from_score(cal.score_from_label(10.0)) == pytest.approx(10.0)


def test_holdout_split_is_by_subject():
    groups = [("dsA", f"{i:02d}") for i in range(10)] + [("dsB", f"{i:02d}") for i in range(8)]
    items = items_for(groups)
    parts = split_items(items, DataSection(test_fraction=0.25, val_fraction=0.15), seed=0)
    sets = {name: {i.group for i in part} for name, part in parts.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    assert sum(len(p) for p in parts.values()) == len(items)
    assert {g.split("/")[0] for g in sets["test"]} == {"dsA", "dsB"}  # every dataset is represented
    for part in parts.values():  # all versions of a subject stay together
        for group in {i.group for i in part}:
            assert sum(i.group == group for i in part) == 3
    assert parts == split_items(items, DataSection(test_fraction=0.25, val_fraction=0.15), seed=0)


def test_cross_dataset_split():
    items = items_for([("dsA", f"{i}") for i in range(6)] + [("dsB", f"{i}") for i in range(5)])
    data = DataSection(split="cross", train_roots=("x/dsA",), test_roots=("y/dsB",), val_fraction=0.2)
    parts = split_items(items, data)
    assert {i.dataset for i in parts["test"]} == {"dsB"} and len(parts["test"]) == 15
    assert {i.dataset for i in parts["train"] + parts["val"]} == {"dsA"} and parts["val"]
    with pytest.raises(ValueError, match="test_roots"):
        split_items(items, DataSection(split="cross", train_roots=("dsA",), test_roots=("a/dsA",)))


def test_clean_cache_builds_labels_and_resumes(tmp_path):
    write_phantoms(tmp_path / "dsX", 2)
    data = DataSection(
        roots=(str(tmp_path / "dsX"),),
        cache_dir=str(tmp_path / "cache"),
        spacing_mm=(3.0, 3.0, 3.0),
        kinds=("noise", "blur"),
        max_severity=2,
        mixtures_per_subject=1,
    )
    items = build_cache(data)
    assert len(items) == 2 * (1 + 2 * 2 + 1)
    clean = [i for i in items if i.kind == "clean"]
    assert len(clean) == 2 and all(i.label == 1.0 for i in clean)
    for subject in ("01", "02"):
        for kind in ("noise", "blur"):
            labels = [i.label for i in items if i.subject == subject and i.kind == kind]
            assert labels[1] < labels[0] < 1.0
    mixture = next(i for i in items if i.kind == "mixture")
    assert len(mixture.degradations) >= 2 and "params" in mixture.degradations[0]
    volume = load_volume(data.cache_dir, items[0])
    assert volume.shape == (24, 24, 24) and 0 < volume.min() and volume.max() <= 1.0
    assert read_manifest(data.cache_dir) == items
    assert build_cache(data) == items  # cached: nothing is rebuilt


def test_table_cache(tmp_path):
    paths = write_phantoms(tmp_path / "bids" / "sub-xx" / "anat", 3)
    table = tmp_path / "group_T1w.tsv"
    lines = ["bids_name\tsnr_total\tcjv"]
    for i, path in enumerate(paths):
        lines.append(f"{path.name.replace('.nii.gz', '')}\t{10 + i}\t0.5")
    table.write_text("\n".join(lines) + "\n")
    data = DataSection(
        source="table",
        table=str(table),
        bids_root=str(tmp_path / "bids"),
        cache_dir=str(tmp_path / "cache"),
        spacing_mm=(2.0, 2.0, 2.0),
    )
    items = build_cache(data)
    assert [i.label for i in items] == [10.0, 11.0, 12.0]
    assert [i.subject for i in items] == ["01", "02", "03"]
    bad = DataSection(source="table", table=str(table), target="snr_wm", cache_dir=str(tmp_path / "c2"))
    with pytest.raises(KeyError, match="snr_wm"):
        build_cache(bad)
    json.loads(items[0].to_json())


def test_contrast_variation_is_recorded_and_labelled_against_its_own_clean(tmp_path):
    from trainer.data import draw_gamma, with_contrast

    write_phantoms(tmp_path / "dsX", 2)
    base = {"roots": (str(tmp_path / "dsX"),), "spacing_mm": (3.0, 3.0, 3.0), "kinds": ("noise",), "max_severity": 1}
    data = DataSection(cache_dir=str(tmp_path / "cache"), contrast_gamma=(0.67, 1.5), mixtures_per_subject=0, **base)
    items = build_cache(data)
    gammas = [i.gamma for i in items]
    assert all(0.67 <= g <= 1.5 for g in gammas) and len(set(gammas)) == len(gammas)
    assert all(i.label == 1.0 for i in items if i.kind == "clean")  # the clean scan at its own contrast
    assert all(i.label < 1.0 for i in items if i.kind == "noise")
    plain = build_cache(DataSection(cache_dir=str(tmp_path / "plain"), mixtures_per_subject=0, **base))
    assert {i.gamma for i in plain} == {1.0}
    # a different contrast range is a different cache: the fingerprint wipes and rebuilds it
    other = build_cache(DataSection(cache_dir=str(tmp_path / "cache"), contrast_gamma=(1.0, 1.0), **base))
    assert {i.gamma for i in other} == {1.0}

    v = np.array([0.0, 25.0, 50.0, 100.0], dtype=np.float32)
    assert np.array_equal(with_contrast(v, 1.0), v)
    brighter, darker = with_contrast(v, 0.5), with_contrast(v, 2.0)
    assert brighter[0] == 0.0 and brighter[1] > v[1] > darker[1] and brighter[3] == pytest.approx(v[3], rel=0.02)
    assert draw_gamma((1.0, 1.0), 3) == 1.0 and draw_gamma((0.5, 2.0), 3) == draw_gamma((0.5, 2.0), 3)
