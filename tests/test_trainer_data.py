"""trainer.data: caches from clean folders and MRIQC-style tables, subject splits, calibration round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
from trainer.acquisition import IDENTITY


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


def test_calibration_is_anchored_per_kind_to_the_repeat_severity():
    from trainer.artifacts import REPEAT_SEVERITY
    from trainer.data import target_score

    data = DataSection(kinds=("noise", "ghosting", "bias"))
    # noise lowers SSIM much more than ghosting at the same physical severity
    items = [
        VolumeItem(f"{kind}{i}_{s}.npy", "a", str(i), kind, s, 1.0 - drop * s)
        for i in range(6)
        for kind, drop in (("noise", 0.06), ("ghosting", 0.01), ("bias", 0.001))
        for s in range(1, 6)
    ]
    calibration = fit_calibration(items, data)
    repeat = {k: 1.0 - d * REPEAT_SEVERITY for k, d in (("noise", 0.06), ("ghosting", 0.01))}
    for kind, label in repeat.items():  # a scan to repeat scores the same whatever the kind
        assert calibration.score_from_label(label, kind) == pytest.approx(data.calib_repeat_score)
        assert calibration.score_from_label(1.0, kind) == 1.0
        assert calibration.label_from_score(calibration.score_from_label(0.985, kind), kind) == pytest.approx(0.985)
    # bias is not anchored to its own (tiny) SSIM drop: a shading is no reason to repeat a scan
    assert calibration.score_from_label(1.0 - 0.001 * REPEAT_SEVERITY, "bias") > 0.95
    # a mixture takes the most lenient of its parts' curves; a clean version is 1
    mixture = VolumeItem("m.npy", "a", "0", "mixture", 3, 0.93, ({"kind": "noise"}, {"kind": "ghosting"}))
    assert target_score(mixture, calibration) == calibration.score_from_label(0.93, "noise")
    assert target_score(items_for([("a", "0")], 1)[0], calibration) == 1.0
    restored = ScoreCalibration.from_json(calibration.to_json())
    assert restored == calibration
    assert ScoreCalibration.from_json(ScoreCalibration("old", 0.4, 1.0).to_json()).anchors == ()
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


def test_versions_are_reacquired_and_labelled_against_their_own_clean(tmp_path):
    write_phantoms(tmp_path / "dsX", 2, shape=(40, 40, 40), spacing=1.0)
    base = dict(
        roots=(str(tmp_path / "dsX"),), spacing_mm=(2.0, 2.0, 2.0), kinds=("noise", "blur"), max_severity=5
    )
    data = DataSection(
        cache_dir=str(tmp_path / "cache"), acquisition=True, versions_per_subject=6, mixtures_per_subject=1, **base
    )
    items = build_cache(data)
    assert len(items) == 2 * 6
    assert [i.kind for i in items[:6]][:2] == ["clean", "clean"] and items[5].kind == "mixture"
    assert all(i.label == 1.0 for i in items if i.kind == "clean")  # the clean scan at its own acquisition
    assert all(i.label < 1.0 for i in items if i.kind != "clean")
    assert len({json.dumps(i.acquisition, sort_keys=True) for i in items}) > 1  # each version re-acquired
    # without re-acquisition, the acquisition is the identity; a different setting is a different cache
    plain = build_cache(DataSection(cache_dir=str(tmp_path / "cache"), versions_per_subject=4, **base))
    assert len(plain) == 2 * 4
    assert {json.dumps(i.acquisition, sort_keys=True) for i in plain} == {json.dumps(IDENTITY.to_dict(), sort_keys=True)}


def test_single_subject_datasets_get_more_versions(tmp_path):
    from trainer.data import find_clean_subjects, versions_for

    write_phantoms(tmp_path / "big", 4)
    write_phantoms(tmp_path / "one", 1)
    subjects = find_clean_subjects([tmp_path / "big", tmp_path / "one"])
    data = DataSection(versions_per_subject=5, min_versions_per_dataset=12)
    assert versions_for(subjects, data) == {"big": 5, "one": 12}


def test_physical_kinds_are_anchored_on_their_magnitude():
    from trainer.artifacts import REPEAT_SEVERITY, SEVERITY_TABLE
    from trainer.data import target_score

    data = DataSection(kinds=("noise", "ghosting"), calib_physical_kinds=("ghosting",))
    items = [
        VolumeItem(f"{k}{i}_{s}.npy", "a", str(i), k, s, 1.0 - 0.05 * s)
        for i in range(3)
        for k in ("noise", "ghosting")
        for s in range(1, 6)
    ]
    calibration = fit_calibration(items, data)
    assert calibration.physical_kinds == ("ghosting",)
    repeat = SEVERITY_TABLE["ghosting"][REPEAT_SEVERITY]
    ghost = VolumeItem(
        "g.npy", "a", "0", "ghosting", 3, 0.999,
        ({"kind": "ghosting", "params": {"axis": 0, "period": 2, "amplitude": repeat}},),
    )
    # the label (0.999) says "fine"; the magnitude says "repeat": the magnitude decides
    assert target_score(ghost, calibration) == pytest.approx(data.calib_repeat_score)
    assert ScoreCalibration.from_json(calibration.to_json()) == calibration


def test_versions_hold_the_configured_clean_count_then_single_kinds_then_mixtures():
    from trainer.config import DataSection
    from trainer.data import degraded_versions

    data = DataSection(versions_per_subject=15, clean_versions_per_subject=3, mixtures_per_subject=2)
    versions = degraded_versions(data, "ds", "01")
    kinds = [kind for kind, _, _ in versions]
    assert len(versions) == 15 and kinds[:3] == ["clean"] * 3 and kinds[-2:] == ["mixture"] * 2
    assert all(k in data.kinds for k in kinds[3:-2]) and len(set(kinds[3:-2])) == len(data.kinds)
    two = degraded_versions(DataSection(versions_per_subject=14, mixtures_per_subject=2), "ds", "01")
    assert [k for k, _, _ in two].count("clean") == 2 and len(two) == 14


def test_kind_weights_give_a_kind_more_turns_and_a_new_cache():
    from trainer.config import ConfigError, DataSection, TrainConfig
    from trainer.data import _fingerprint, degraded_versions

    plain = DataSection(versions_per_subject=40, mixtures_per_subject=0)
    weighted = DataSection(versions_per_subject=40, mixtures_per_subject=0, kind_weights={"ghosting": 3})
    count = lambda data: sum(  # noqa: E731
        [k for k, _, _ in degraded_versions(data, "ds", str(s))].count("ghosting") for s in range(5)
    )
    # 38 single versions per subject in rounds of 6 turns (plain) or 8 turns with 3 for ghosting (weighted)
    assert count(plain) in range(30, 36) and count(weighted) in range(70, 76)
    assert _fingerprint(plain) != _fingerprint(weighted)
    # weights of 1 are no weights: the same versions, the same cache
    ones = DataSection(versions_per_subject=40, mixtures_per_subject=0, kind_weights={"noise": 1, "blur": 1})
    assert degraded_versions(plain, "ds", "01") == degraded_versions(ones, "ds", "01")
    assert _fingerprint(plain) == _fingerprint(ones)
    # air around the head is another cache; none is the same one
    assert _fingerprint(plain.model_copy(update={"fov_margin": 0.2})) != _fingerprint(plain)
    assert _fingerprint(plain.model_copy(update={"fov_margin": 0.0})) == _fingerprint(plain)
    with pytest.raises(ConfigError, match="kind_weights"):
        TrainConfig.from_dict({"data": {"kinds": ["noise"], "kind_weights": {"blur": 2}}})
