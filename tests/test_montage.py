"""Quality map (patch scores -> model grid, NIfTI with the grid's affine), montage (PNG, caption without patient
identity), retention of both, and the findings of a scored series end to end through a running daemon."""

from __future__ import annotations

import datetime as dt
import json
import os
import struct
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, classic_series, phantom, tissue_phantom

from conftest import send_datasets
from qc_daemon.cli import main
from qc_daemon.findings import MONTAGE_FILE, QUALITY_MAP_FILE, remove_results_older_than
from qc_daemon.iqms import IQM_NAMES
from qc_daemon.montage import DPI, FIGURE_SIZE_IN, MontageCaption, caption_lines, render_montage, verdict
from qc_daemon.preprocess import model_grid_affine, pad_to_min_size, patch_grid, resample_to_spacing, resampled_shape
from qc_daemon.quality_map import QualityMapError, quality_map, save_quality_map, worst_region

IDENTITY = (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "Doe", "Jane")


def test_the_map_is_the_mean_of_the_patches_covering_each_voxel():
    origins = patch_grid((12, 12, 12), 4, 2)
    scores = [0.8] * len(origins)
    assert np.allclose(quality_map((12, 12, 12), origins, 4, scores), 0.8)
    scores = [1.0 if o != (0, 0, 0) else 0.0 for o in origins]
    qmap = quality_map((12, 12, 12), origins, 4, scores)
    assert qmap[0, 0, 0] == 0.0  # covered by that patch alone
    assert qmap[2, 2, 2] == pytest.approx(7 / 8)  # 8 patches overlap there, one of them scored 0
    assert qmap[11, 11, 11] == 1.0


def test_the_worst_region_is_found_where_the_low_patches_are():
    shape = (24, 20, 16)
    origins = patch_grid(shape, 8, 4)
    low = {(12, 8, 4), (16, 8, 4)}  # two neighbouring bad patches
    scores = [0.1 if o in low else 0.9 for o in origins]
    x, y, z = worst_region(quality_map(shape, origins, 8, scores))
    assert 12 <= x < 24 and 8 <= y < 16 and 4 <= z < 12
    mask = np.zeros(shape, bool)
    mask[:8, :8, :8] = True  # the head lies elsewhere: the worst region inside it is found instead
    assert worst_region(quality_map(shape, origins, 8, scores), mask)[0] < 8


def test_patches_outside_the_map_are_refused():
    with pytest.raises(QualityMapError, match="leaves the map"):
        quality_map((8, 8, 8), [(6, 0, 0)], 4, [0.5])
    with pytest.raises(QualityMapError, match="2 patch origins but 1 scores"):
        quality_map((8, 8, 8), [(0, 0, 0), (4, 0, 0)], 4, [0.5])


@pytest.mark.parametrize(
    ("shape", "spacing", "patch"), [((60, 50, 40), (1.0, 1.2, 1.5), 8), ((40, 40, 20), (1, 1, 1), 16)]
)
def test_the_model_grid_affine_places_model_voxels_where_resampling_took_them(shape, spacing, patch):
    affine = np.diag([*spacing, 1.0]) @ np.array([[1, 0, 0, -30], [0, 1, 0, 12], [0, 0, 1, 7], [0, 0, 0, 1.0]])
    world_x = (affine @ np.vstack([np.indices(shape).reshape(3, -1), np.ones(np.prod(shape))]))[0].reshape(shape)
    target = (2.0, 2.0, 2.0)
    resampled = resample_to_spacing(world_x.astype(np.float32), spacing, target)
    assert resampled.shape == resampled_shape(shape, spacing, target)
    model = pad_to_min_size(resampled, patch, fill=np.nan)
    model_affine = model_grid_affine(affine, shape, spacing, target, patch)
    inner = np.argwhere(np.isfinite(model))
    inner = inner[(inner > 1).all(axis=1) & (inner < np.array(model.shape) - 2).all(axis=1)]
    predicted = (model_affine @ np.c_[inner, np.ones(len(inner))].T)[0]
    assert np.allclose(model[tuple(inner.T)], predicted, atol=1e-3)


def test_the_map_file_has_the_model_grid_shape_and_affine(tmp_path):
    qmap = np.random.default_rng(0).random((20, 24, 16)).astype(np.float32)
    affine = np.array([[2.0, 0, 0, -20], [0, 2, 0, -24], [0, 0, 2, -16], [0, 0, 0, 1]])
    path = save_quality_map(qmap, affine, tmp_path / "r1" / QUALITY_MAP_FILE)
    image = nib.load(path)
    assert image.shape == qmap.shape and np.allclose(image.affine, affine)
    assert np.allclose(image.get_fdata(), qmap, atol=1e-6)
    assert path.stat().st_size < qmap.nbytes  # gzipped


def _caption(score=0.42, threshold=0.5) -> MontageCaption:
    return MontageCaption(
        series_instance_uid="1.2.826.0.1.3680043.8.498.111", study_instance_uid="1.2.826.0.1.3680043.8.498.222",
        revision=2, series_description="T1 MPRAGE SAG", station_name="MR_TEST_1",
        completed_at=dt.datetime(2026, 12, 3, 14, 5), score=score, threshold=threshold, model_sha256="ab" * 32,
    )


def test_the_caption_names_series_station_date_uids_and_model():
    text = "\n".join(caption_lines(_caption()))
    for expected in ("T1 MPRAGE SAG", "MR_TEST_1", "2026-12-03 14:05 UTC", "1.2.826.0.1.3680043.8.498.111",
                     "revision 2", "1.2.826.0.1.3680043.8.498.222", "ab" * 32):
        assert expected in text
    assert verdict(_caption()).startswith("ALERT") and "0.420 < threshold 0.50" in verdict(_caption())
    assert verdict(_caption(score=0.81)).startswith("PASS")
    assert not {"patient", "name", "birth"} & set(MontageCaption.__dataclass_fields__)


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_the_montage_is_a_png_of_the_expected_size(tmp_path):
    image = phantom((48, 48, 40)).astype(np.float32) / 1000
    qmap = np.full(image.shape, 0.9, np.float32)
    qmap[30:, 10:30, 5:20] = 0.2
    path = render_montage(image, qmap, image > 0.1, (2.0, 2.0, 2.0), worst_region(qmap), _caption(), tmp_path / "m.png")
    assert _png_size(path) == (int(FIGURE_SIZE_IN[0] * DPI), int(FIGURE_SIZE_IN[1] * DPI))
    assert not list(tmp_path.glob(".part-*"))


def test_retention_removes_old_result_folders_only(tmp_path):
    old, new = tmp_path / "1.2.3" / "r1", tmp_path / "1.2.3" / "r2"
    gone = tmp_path / "1.2.4" / "r1"
    for folder in (old, new, gone):
        folder.mkdir(parents=True)
        (folder / MONTAGE_FILE).write_bytes(b"png")
    two_days_ago = time.time() - 2 * 86400
    for path in (old / MONTAGE_FILE, gone / MONTAGE_FILE):
        os.utime(path, (two_days_ago, two_days_ago))
    assert remove_results_older_than(tmp_path, 86400) == 2
    assert not old.exists() and new.exists() and not (tmp_path / "1.2.4").exists()
    assert remove_results_older_than(tmp_path / "missing", 86400) == 0


def _config(daemon, tmp_path) -> str:
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nstate_dir = "{daemon.settings.storage.state_dir}"\n')
    return str(config)


def test_a_scored_series_gets_iqms_map_and_montage_after_its_score_and_alert(
    daemon_factory, tmp_path, capsys, log_stream
):
    daemon = daemon_factory(alerts={"threshold": 1.0}, storage={"retention_days": 1.0})  # every series alerts
    series = classic_series(tissue_phantom((48, 48, 32)))
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(120)
    config = _config(daemon, tmp_path)

    assert main(["--config", config, "show", uid, "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["status"] == "scored" and item["alert"] is True
    assert list(item["iqms"]) == list(IQM_NAMES)
    assert item["iqm_errors"] == {}  # all computed
    assert item["iqms"]["noise_sigma"] == pytest.approx(20.0, rel=0.1)
    for key, name in (("montage_path", MONTAGE_FILE), ("quality_map_path", QUALITY_MAP_FILE)):
        path = Path(item[key])
        assert path.is_absolute() and path.is_file() and path.name == name
        assert path.parent == daemon.settings.storage.results_path / uid / "r1"
    assert nib.load(item["quality_map_path"]).shape == tuple(item["volume_shape"])
    png = Path(item["montage_path"]).read_bytes()
    assert not [word for word in IDENTITY if word.encode() in png]

    assert main(["--config", config, "history", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["iqms"] == item["iqms"] and listed["montage_path"] == item["montage_path"]
    assert main(["--config", config, "show", uid]) == 0
    text = capsys.readouterr().out
    assert "snr_total" in text and item["montage_path"] in text

    events = [json.loads(line)["event"] for line in log_stream.getvalue().splitlines() if line.startswith("{")]
    assert events.index("series_scored") < events.index("alert_raised") < events.index("series_findings")

    old = time.time() - 2 * 86400
    for path in Path(item["montage_path"]).parent.iterdir():
        os.utime(path, (old, old))
    daemon.apply_retention()
    assert not Path(item["montage_path"]).exists()
    assert main(["--config", config, "show", uid]) == 0
    assert "(removed by retention)" in capsys.readouterr().out


def test_a_volume_without_a_head_is_scored_with_null_iqms_and_reasons(daemon_factory, tmp_path, capsys):
    daemon = daemon_factory()
    series = classic_series(np.full((40, 40, 16), 300, np.uint16))
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(120)
    assert main(["--config", _config(daemon, tmp_path), "show", uid, "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["status"] == "scored" and item["score"] is not None
    assert item["iqms"]["snr_total"] is None and "constant" in item["iqm_errors"]["snr_total"]
    assert Path(item["montage_path"]).is_file()
