"""trainer.train on tiny synthetic volumes (width 2, 32^3 patches): runs, writes checkpoints, resumes, evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.config import TrainConfig, replace
from trainer.train import lr_at, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "t1w"


def write_phantoms(root, n_subjects, shape=(36, 36, 36), seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(axis=0))
    for i in range(n_subjects):
        v = np.where(r < 0.8, 500 + 100 * rng.normal(size=shape).clip(-2, 2), 0).astype(np.float32)
        v[r < 0.4] += 300
        nib.save(nib.Nifti1Image(v, np.diag([2.0, 2.0, 2.0, 1.0])), str(root / f"sub-{i + 1:02d}_T1w.nii.gz"))


def tiny_config(tmp_path, **train) -> TrainConfig:
    write_phantoms(tmp_path / "dsA", 4, seed=1)
    write_phantoms(tmp_path / "dsB", 4, seed=2)
    data = {
        "roots": [str(tmp_path / "dsA"), str(tmp_path / "dsB")],
        "cache_dir": str(tmp_path / "cache"),
        "patch_size": 32,
        "patch_step": 16,
        "kinds": ["noise", "blur"],
        "max_severity": 1,
        "mixtures_per_subject": 0,
        "test_fraction": 0.25,
        "val_fraction": 0.34,
    }
    settings = {
        "epochs": 1,
        "volumes_per_epoch": 2,
        "patches_per_volume": 2,
        "out_dir": str(tmp_path / "run"),
        "progress": False,
        "num_threads": 1,
        "device": "cpu",
        **train,
    }
    return TrainConfig.from_dict({"model": {"width": 2}, "data": data, "train": settings})


def test_lr_schedule_is_a_pure_halving():
    assert [lr_at(e, 1e-4, 10) for e in (0, 9, 10, 19, 20, 35)] == [1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 1.25e-5]


def test_one_step_writes_a_checkpoint_that_resumes(tmp_path, capsys):
    config = tiny_config(tmp_path)
    best = train(config)
    out = Path(config.train.out_dir)
    assert best == out / "best.pt" and best.exists() and (out / "last.pt").exists()
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.extra["epoch"] == 0 and "optimizer" in ckpt.extra
    assert ckpt.model_config.width == 2 and ckpt.model_meta["patch_size"] == 32
    assert ckpt.train_config["train"]["epochs"] == 1 and ckpt.train_config["model"]["width"] == 2
    assert ckpt.model_meta["calibration"]["label_at_1"] == 1.0
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"]) and split["val"]
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["train_l1"]) and "val_l1" in record
    before = {k: v.clone() for k, v in ckpt.state_dict.items()}

    resumed = replace(config, train={"epochs": 2})
    train(resumed)
    assert "resuming" in capsys.readouterr().out
    ckpt2 = load_checkpoint(out / "last.pt")
    assert ckpt2.extra["epoch"] == 1 and len(ckpt2.extra["history"]) == 2
    assert any(not torch.equal(before[k], ckpt2.state_dict[k]) for k in before if before[k].is_floating_point())
    model = model_from_checkpoint(ckpt2)
    with torch.no_grad():
        score = model(torch.rand(2, 1, 32, 32, 32))
    assert score.shape == (2,) and bool(((score > 0) & (score < 1)).all())


def test_fine_tuning_starts_from_a_checkpoint(tmp_path, capsys):
    best = train(tiny_config(tmp_path / "a"))
    tuned = tiny_config(tmp_path / "b", init_from=str(best), out_dir=str(tmp_path / "b" / "tuned"))
    train(tuned)
    assert "initialised from" in capsys.readouterr().out
    wrong = replace(tuned, model={"width": 4}, train={"out_dir": str(tmp_path / "c")})
    with pytest.raises(ValueError, match="train.init_from"):
        train(wrong)


def test_batchnorm_recalibration_runs(tmp_path):
    config = tiny_config(tmp_path, bn_recalib_batches=2, grad_clip_norm=1.0, freeze_bn=True, reorient=True)
    ckpt = load_checkpoint(train(config))
    means = [v for k, v in ckpt.state_dict.items() if k.endswith("running_mean")]
    assert means and all(torch.isfinite(m).all() for m in means)
    assert ckpt.train_config["train"]["bn_recalib_batches"] == 2


def test_weight_averaging_averages_the_epochs_it_covers(tmp_path):
    config = tiny_config(tmp_path, epochs=3, average_from_epoch=1, bn_recalib_batches=1)
    result = train(config)
    out = Path(config.train.out_dir)
    assert result == out / "averaged.pt"
    averaged = load_checkpoint(result)
    assert averaged.extra["averaged_epochs"] == 2
    # the average of epochs 1 and 2: re-run the same seeded training to epoch 1, then to epoch 2
    train(replace(config, train={"epochs": 2, "average_from_epoch": 0, "out_dir": str(tmp_path / "e")}))
    e1 = load_checkpoint(tmp_path / "e" / "last.pt").state_dict
    two = load_checkpoint(out / "last.pt").state_dict
    params = [k for k in e1 if e1[k].is_floating_point() and "running" not in k]
    assert params
    for k in params:
        torch.testing.assert_close(averaged.state_dict[k], (e1[k] + two[k]) / 2, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(e1[k], two[k]) for k in params)  # the two epochs differ, so this is an average
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == "average" and "val_l1" in last


def _write_toml(config: TrainConfig, path: Path) -> Path:
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_command_runs_stages_in_turn(tmp_path, capsys):
    """``--config stage1 stage2``: one command; stage 2 starts from stage 1's result, written only by then."""
    from trainer.__main__ import main

    first = tiny_config(tmp_path, epochs=2, average_from_epoch=1, bn_recalib_batches=1)
    second = replace(
        first, train={"init_from": str(tmp_path / "run" / "averaged.pt"), "out_dir": str(tmp_path / "stage2"), "epochs": 1}
    )
    paths = [_write_toml(first, tmp_path / "one.toml"), _write_toml(second, tmp_path / "two.toml")]
    assert main(["train", "--config", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "initialised from" in out and str(tmp_path / "stage2" / "best.pt") in out
    assert load_checkpoint(tmp_path / "stage2" / "best.pt").train_config["config_path"] == str(paths[1])
    assert main(["train", "--config", *map(str, paths), "--epochs", "3"]) == 2  # overrides: one config only


def test_training_is_seeded(tmp_path):
    a = load_checkpoint(train(tiny_config(tmp_path / "a")))
    b = load_checkpoint(train(tiny_config(tmp_path / "b")))
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_evaluate_cli_writes_a_report(tmp_path):
    from trainer.__main__ import main

    config = tiny_config(tmp_path)
    best = train(config)
    report = tmp_path / "report.md"
    assert main(["evaluate", str(best), "--out", str(report), "--n-boot", "20"]) == 0
    text = report.read_text()
    assert "SROCC" in text and "| all |" in text
    assert json.loads(report.with_suffix(".json").read_text())["n_subjects"] == 2


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/t1w is absent")
def test_shared_data_is_found():
    """The default config's four sites are all there, and its subject cap picks 14 + 30 + 1 + 1 of them."""
    from trainer.config import load_config
    from trainer.data import find_clean_subjects, select_subjects

    config = load_config("trainer/configs/default.toml")
    subjects = find_clean_subjects([SHARED / Path(root).name for root in config.data.roots])
    counts = {d: sum(s.dataset == d for s in subjects) for d in ("ds000011", "ds002748", "ds002608", "studyforrest")}
    assert counts == {"ds000011": 14, "ds002748": 52, "ds002608": 1, "studyforrest": 1}
    chosen = select_subjects(subjects, config.data)
    assert len(chosen) == 14 + 30 + 1 + 1


def test_sanity_plot_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    from trainer.sanity import sanity_plot

    scores = np.linspace(1.0, 0.3, 5)[None, None, :].repeat(2, axis=0).repeat(6, axis=1)
    data = {
        "subjects": ["a", "b"],
        "kinds": ["noise", "motion", "ghosting", "spike", "blur", "bias"],
        "scores": scores.tolist(),
        "threshold": 0.5,
        "at": "model",
    }
    path = tmp_path / "sanity.json"
    path.write_text(json.dumps(data))
    png = sanity_plot(path, tmp_path / "sanity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_writes_table1_and_resumes(tmp_path):
    from trainer.__main__ import main
    from trainer.ablation import run_ablation

    config = tiny_config(tmp_path)
    grid = [("2d", "plain", 18), ("3d", "hyper", 18)]
    prefix = tmp_path / "table1" / "t1"
    rows = run_ablation(config, prefix, epochs=1, grid=grid, n_boot=20)
    assert [(r["input"], r["head"], r["backbone"]) for r in rows] == [("2D", "plain", "R18"), ("3D", "hyper", "R18")]
    for row in rows:
        assert row["epochs"] == 1 and row["steps"] == 2 and row["n_test"] > 0 and row["parameters"] > 0
        assert row["SROCC_ci"][0] <= row["SROCC_ci"][1] and "SROCC_last" in row and row["best_epoch"] == 1
    # each row is the base config with only the architecture changed
    a, b = (load_checkpoint(tmp_path / "table1" / name / "best.pt") for name in ("r18-2d-plain", "r18-3d-hyper"))
    assert a.train_config["data"] == b.train_config["data"] == config.to_dict()["data"]
    assert a.model_config.architecture != b.model_config.architecture
    md = prefix.with_suffix(".md").read_text()
    assert "reduced budget" in md and "| 2D | plain | R18 |" in md and "| 3D | hyper | R18 |" in md
    assert len(prefix.with_suffix(".csv").read_text().splitlines()) == 3

    # a second call reads the finished rows back instead of training again
    stamp = (tmp_path / "table1" / "r18-3d-hyper" / "best.pt").stat().st_mtime_ns
    assert run_ablation(config, prefix, epochs=1, grid=grid, n_boot=20) == rows
    assert (tmp_path / "table1" / "r18-3d-hyper" / "best.pt").stat().st_mtime_ns == stamp

    assert main(["ablation", "--rows", "r99-3d-hyper", "--out", str(prefix)]) == 2


def test_sanity_scores_through_the_daemons_scorer_and_its_model_checks(tmp_path):
    pytest.importorskip("matplotlib")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from export.onnx_export import export_checkpoint
    from export.parity import ParityConfig
    from trainer.__main__ import main

    best = train(tiny_config(tmp_path))
    model = tmp_path / "tiny.onnx"
    export_checkpoint(best, model, parity=ParityConfig(trials=1))
    out = tmp_path / "sanity" / "s"

    assert main(["sanity", str(model), "--checkpoint", str(best), "--out", str(out), "--per-dataset", "1"]) == 0
    scores = np.asarray(json.loads(out.with_suffix(".json").read_text())["scores"])
    assert scores.shape[0] == 2 and ((scores >= 0) & (scores <= 1)).all()

    # weights that no longer match qc.sha256: the daemon would refuse the file, and so does the sanity table
    proto = onnx.load(str(model))
    weight = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 1.0, weight.name))
    onnx.save(proto, str(model))
    assert main(["sanity", str(model), "--checkpoint", str(best), "--out", str(out), "--per-dataset", "1"]) == 1


def test_baseline_and_pca_commands_run_on_a_tiny_checkpoint(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    from trainer.__main__ import main

    best = train(tiny_config(tmp_path))
    table2 = tmp_path / "table2"
    assert main(["baseline", str(best), "--out", str(table2), "--max-train", "8"]) == 0
    assert "| IQMs + random forest" in table2.with_suffix(".md").read_text()
    figure = tmp_path / "fig3.png"
    assert main(["pca", str(best), "--out", str(figure)]) == 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
