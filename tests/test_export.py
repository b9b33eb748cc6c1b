"""ONNX export tests: parity, graph check, metadata, sha256, failure handling (tiny widths, a few seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from export import (  # noqa: E402
    ExportError,
    ParityConfig,
    ParityError,
    dynamic_matmuls,
    export_model,
    onnx_weights_sha256,
    parity_json_path,
    read_model_info,
)
from export.__main__ import main  # noqa: E402
from export.bundle import PLACEHOLDER_LABEL, SHIPPED_MODEL, build_bundle  # noqa: E402
from export.graph_check import computed_weight_matmuls  # noqa: E402
from export.parity import check_parity  # noqa: E402
from qc_daemon.model_contract import (  # noqa: E402
    INPUT_NAME,
    OUTPUT_NAME,
    ModelInfo,
    Normalisation,
    ScoreCalibration,
    weights_sha256,
)
from trainer.checkpoint import make_model_meta, save_checkpoint  # noqa: E402
from trainer.model import Head, HySNet, ModelConfig, Spatial, build_model  # noqa: E402

pytestmark = pytest.mark.torch

PATCH = 32
WIDTH = 2


def _meta(patch: int = PATCH, step: int = 16) -> dict:
    return make_model_meta(
        spacing_mm=(1.5, 1.5, 2.0),
        patch_size=patch,
        patch_step=step,
        normalisation=Normalisation(clip_percentiles=(1.0, 99.0)),
        calibration=ScoreCalibration("ssim", 0.4, 1.0),
        label="SSIM of the patch to its artefact-free original",
        training_data="synthetic test volumes, no licence needed",
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A width-2 R18 3D hyper checkpoint exported through the CLI at patch 32."""
    tmp = tmp_path_factory.mktemp("export")
    config = ModelConfig(width=WIDTH)
    model = build_model(config, seed=5).eval()
    ckpt = save_checkpoint(tmp / "model.pt", model, config, {"lr": 1e-4}, _meta())
    out = tmp / "out" / "model.onnx"
    assert main(["model", str(ckpt), "--out", str(out)]) == 0
    return {"model": model, "ckpt": ckpt, "out": out, "dir": tmp}


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_export_writes_one_self_contained_file_and_report(exported) -> None:
    out: Path = exported["out"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.parity.json"]
    proto = onnx.load(str(out), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    report = json.loads(parity_json_path(out).read_text())
    assert report["parity"]["passed"] is True
    assert report["parity"]["batch_sizes"] == [1, 3]
    assert report["parity"]["rtol"] <= 1e-4 and report["parity"]["atol"] <= 1e-5
    assert report["parity"]["max_abs_err"] <= report["parity"]["atol"]
    assert report["parity"]["input_shape"] == [1, PATCH, PATCH, PATCH]
    assert report["sha256"] == read_model_info(out).sha256


def test_onnx_runtime_matches_torch_at_batch_1_and_3(exported) -> None:
    session = ort.InferenceSession(str(exported["out"]), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (outp,) = session.get_outputs()
    assert inp.name == INPUT_NAME and outp.name == OUTPUT_NAME
    assert inp.shape[1:] == [1, PATCH, PATCH, PATCH] and isinstance(inp.shape[0], str)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = (1.0 - rng.random((batch, 1, PATCH, PATCH, PATCH))).astype(np.float32)
        x[-1] **= 3.0  # a darker sample, so the batch is not homogeneous
        (got,) = session.run(None, {INPUT_NAME: x})
        with torch.no_grad():
            want = exported["model"](torch.from_numpy(x)).numpy()
        assert got.shape == (batch,)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the parity function agrees, with its own recorded numbers
    report = check_parity(exported["out"], exported["model"], ParityConfig(batch_sizes=(1, 3), trials=2, seed=4))
    assert report.passed and report.max_abs_err <= 1e-5 and report.batch_sizes == (1, 3)


def test_metadata_round_trips_through_model_info(exported) -> None:
    info = ModelInfo.from_metadata(_props(exported["out"]))
    assert info.architecture == "hysnet-r18-3d-hyper"
    assert info.input_kind == "patch3d"
    assert info.width == WIDTH
    assert (info.patch_size, info.patch_step) == (PATCH, 16)
    assert info.spacing_mm == (1.5, 1.5, 2.0)
    assert info.normalisation == Normalisation(clip_percentiles=(1.0, 99.0))
    assert info.calibration == ScoreCalibration("ssim", 0.4, 1.0)
    assert info.label.startswith("SSIM")
    assert info.training_data.startswith("synthetic")
    assert info.parity.passed and info.parity.batch_sizes == (1, 3)
    assert info.parity.rtol == 1e-4 and info.parity.atol == 1e-5
    assert ModelInfo.from_metadata(info.to_metadata()) == info


def test_sha256_is_over_the_initializers(exported) -> None:
    proto = onnx.load(str(exported["out"]))
    pairs = [(t.name, numpy_helper.to_array(t).tobytes()) for t in proto.graph.initializer]
    assert len(pairs) > 10
    assert weights_sha256(pairs) == read_model_info(exported["out"]).sha256 == onnx_weights_sha256(proto)
    # changing any weight changes the hash
    first = numpy_helper.to_array(proto.graph.initializer[0]).copy()
    first.flat[0] += 1.0
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(first, proto.graph.initializer[0].name))
    assert onnx_weights_sha256(proto) != read_model_info(exported["out"]).sha256


def test_target_layers_are_computed_weight_matmuls_after_ort_optimisation(exported) -> None:
    assert dynamic_matmuls(exported["out"]) == ["fc1", "fc2", "fc3"]
    # and the hyper-network's own FC layers are ordinary initializer-weight Gemms, not counted
    graph = onnx.load(str(exported["out"])).graph
    names = [n.name for n in computed_weight_matmuls(graph)]
    assert sorted(names) == ["/head/fc1/MatMul", "/head/fc2/MatMul", "/head/fc3/MatMul"]
    assert main(["graph", str(exported["out"])]) == 0


def test_plain_model_exports_without_dynamic_matmuls(tmp_path) -> None:
    model = build_model(ModelConfig(head=Head.PLAIN, width=WIDTH), seed=0)
    result = export_model(model, _meta(), tmp_path / "plain.onnx", parity=ParityConfig(trials=1))
    assert result.graph_check is None
    assert result.info.architecture == "hysnet-r18-3d-plain"
    assert dynamic_matmuls(result.path) == []
    assert main(["graph", str(result.path)]) == 1


def test_parity_cli_reruns_and_rejects_other_weights(exported, tmp_path, capsys) -> None:
    assert main(["parity", str(exported["out"]), str(exported["ckpt"]), "--batch-sizes", "1,2", "--trials", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_sizes"] == [1, 2]
    config = ModelConfig(width=WIDTH)
    other = save_checkpoint(tmp_path / "other.pt", build_model(config, seed=99), config, {}, _meta())
    assert main(["parity", str(exported["out"]), str(other), "--trials", "1"]) == 1
    assert "parity FAILED" in capsys.readouterr().err
    wider = ModelConfig(width=WIDTH * 2)
    mismatch = save_checkpoint(tmp_path / "wider.pt", build_model(wider, seed=1), wider, {}, _meta())
    assert main(["parity", str(exported["out"]), str(mismatch), "--trials", "1"]) == 1
    assert f"width {WIDTH * 2}" in capsys.readouterr().err


def test_broken_parity_raises_and_leaves_no_model_file(tmp_path, monkeypatch) -> None:
    model = build_model(ModelConfig(width=WIDTH), seed=1)
    original = HySNet.forward

    def drifting_forward(self, x):  # torch disagrees with the exported graph by 1e-3
        out = original(self, x)
        return out if torch.onnx.is_in_onnx_export() else out + 1e-3

    monkeypatch.setattr(HySNet, "forward", drifting_forward)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ParityError) as info:
        export_model(model, _meta(), out, parity=ParityConfig(trials=1))
    assert info.value.report is not None and not info.value.report.passed
    assert info.value.report.max_abs_err == pytest.approx(1e-3, rel=1e-2)
    assert list(tmp_path.iterdir()) == []  # neither the model, nor its report, nor a temp dir

    config = ModelConfig(width=WIDTH)
    ckpt = save_checkpoint(tmp_path / "m.pt", model, config, {}, _meta())
    assert main(["model", str(ckpt), "--out", str(out), "--trials", "1"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_parity_tolerances_cannot_be_loosened() -> None:
    with pytest.raises(ValueError, match="rtol"):
        ParityConfig(rtol=1e-3)
    with pytest.raises(ValueError, match="atol"):
        ParityConfig(atol=1e-4)
    with pytest.raises(ValueError, match="batch"):
        ParityConfig(batch_sizes=(0,))


def test_2d_models_are_refused(tmp_path) -> None:
    model = build_model(ModelConfig(spatial=Spatial.D2, width=WIDTH))
    with pytest.raises(ExportError, match="only 3D"):
        export_model(model, _meta(), tmp_path / "slice.onnx")
    assert list(tmp_path.iterdir()) == []


def test_patch_step_larger_than_patch_is_refused(tmp_path) -> None:
    model = build_model(ModelConfig(width=WIDTH))
    with pytest.raises(ExportError, match="step 48 exceeds patch size 32"):
        export_model(model, _meta(patch=96, step=48), tmp_path / "m.onnx", patch_size=32)


def test_bundle_at_patch_96(tmp_path) -> None:
    result = build_bundle(tmp_path / "default.onnx", width=WIDTH, parity=ParityConfig(trials=1))
    info = read_model_info(result.path)
    assert info.architecture == "hysnet-r18-3d-hyper" and info.width == WIDTH
    assert (info.patch_size, info.patch_step, info.spacing_mm) == (96, 48, (2.0, 2.0, 2.0))
    assert info.calibration == ScoreCalibration("untrained", 0.0, 1.0)
    assert info.normalisation == Normalisation()
    assert info.label == PLACEHOLDER_LABEL
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, 96, 96, 96]
    assert dynamic_matmuls(result.path) == ["fc1", "fc2", "fc3"]
    # seeded: rebuilding gives the same weights
    again = build_bundle(tmp_path / "again.onnx", width=WIDTH, parity=ParityConfig(trials=1))
    assert again.info.sha256 == info.sha256


def test_bundle_refuses_to_overwrite_the_shipped_model(tmp_path) -> None:
    before = SHIPPED_MODEL.read_bytes()
    roundabout = SHIPPED_MODEL.parent / ".." / "models" / SHIPPED_MODEL.name
    with pytest.raises(ExportError, match="shipped trained model"):
        build_bundle(roundabout, width=WIDTH)
    assert main(["bundle", "--out", str(SHIPPED_MODEL), "--width", str(WIDTH)]) == 1
    with pytest.raises(SystemExit) as no_out:  # --out is required: no default path to overwrite by accident
        main(["bundle"])
    assert no_out.value.code == 2
    assert SHIPPED_MODEL.read_bytes() == before


def test_shipped_default_model_is_valid() -> None:
    assert SHIPPED_MODEL.exists(), f"{SHIPPED_MODEL} is missing: the package ships a trained model"
    proto = onnx.load(str(SHIPPED_MODEL))
    info = ModelInfo.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert info.architecture == "hysnet-r18-3d-hyper" and info.patch_size == 96 and info.input_kind == "patch3d"
    assert info.parity.passed
    assert onnx_weights_sha256(proto) == info.sha256
    assert SHIPPED_MODEL.stat().st_size < 10_000_000
    assert json.loads(parity_json_path(SHIPPED_MODEL).read_text())["sha256"] == info.sha256
