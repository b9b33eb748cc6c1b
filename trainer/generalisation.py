"""Does the score work on a site the model never saw? What a technologist needs: alerts and false alarms.

Metrics (:func:`site_report`) over scored observations (one scan of one subject at one artifact kind and
severity, severity 0 = clean), each with a subject-level bootstrap CI:

* **false-alarm rate**: clean scans scored below the alert threshold (want <= 5 %);
* **detection rate**, per artifact kind: scans at the repeat severity (``artifacts.REPEAT_SEVERITY``) and at the
  severe level (one above) scored below the threshold (want >= 80 % of the severe level);
* **AUC** clean vs each severity (want >= 0.95 severe, >= 0.9 moderate);
* **Spearman(score, severity)** pooled across heads (want >= 0.8) and the mean within one head and kind (>= 0.9).

Two sources of observations:

* :func:`observe_volumes`: clean volumes of unseen sites (e.g. the shared human DICOM series, built by the
  daemon's own code) degraded with ``trainer.artifacts`` on their own grid and scored by the daemon's
  :class:`~qc_daemon.scorer.Scorer` (``python -m trainer unseen``);
* :func:`observe_items`: a leave-one-site-out run's held-out cache items, scored like the daemon does
  (``python -m trainer loso``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from trainer import artifacts
from trainer.metrics import Estimate, bootstrap_ci

SEVERE = artifacts.REPEAT_SEVERITY + 1


@dataclasses.dataclass(frozen=True)
class Observation:
    site: str
    subject: str
    kind: str  # "clean" or an artifact kind
    severity: int  # 0 = clean
    score: float


def _rate_below(threshold: float, severity: int) -> Callable[[np.ndarray, np.ndarray], float]:
    def metric(scores: np.ndarray, severities: np.ndarray) -> float:
        chosen = scores[severities == severity]
        return float(np.mean(chosen < threshold)) if chosen.size else float("nan")

    return metric


def _auc(severity: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """P(a clean scan scores higher than one at ``severity``); ties count half."""

    def metric(scores: np.ndarray, severities: np.ndarray) -> float:
        clean, bad = scores[severities == 0], scores[severities == severity]
        if not clean.size or not bad.size:
            return float("nan")
        diff = clean[:, None] - bad[None, :]
        return float(np.mean((diff > 0) + 0.5 * (diff == 0)))

    return metric


def _spearman(scores: np.ndarray, severities: np.ndarray) -> float:
    if np.unique(severities).size < 2 or np.unique(scores).size < 2:
        return float("nan")
    return float(-stats.spearmanr(scores, severities).statistic)  # higher severity, lower score: positive


def site_report(observations: Sequence[Observation], threshold: float, n_boot: int = 1000) -> dict[str, Any]:
    """Every metric of the module docstring, pooled over ``observations`` and per artifact kind."""
    obs = list(observations)
    groups = [f"{o.site}/{o.subject}" for o in obs]
    scores = np.array([o.score for o in obs], dtype=np.float64)
    sev = np.array([o.severity for o in obs])
    kinds = sorted({o.kind for o in obs} - {"clean"})

    def est(metric, mask=None) -> Estimate:
        m = np.ones(len(obs), bool) if mask is None else mask
        return bootstrap_ci(metric, scores[m], sev[m], n_boot=n_boot, groups=np.asarray(groups)[m])

    clean = np.array([o.kind == "clean" for o in obs])
    report: dict[str, Any] = {
        "n": len(obs),
        "subjects": len(set(groups)),
        "threshold": threshold,
        "false_alarm": est(_rate_below(threshold, 0)),
        "clean_min": float(scores[clean].min()) if clean.any() else float("nan"),
        "pooled": {
            "spearman": est(_spearman),
            "within_head": _within_head(obs),
            **{f"auc_sev{s}": est(_auc(s)) for s in range(1, artifacts.MAX_SEVERITY + 1)},
            **{f"detect_sev{s}": est(_rate_below(threshold, s)) for s in (artifacts.REPEAT_SEVERITY, SEVERE)},
        },
        "kinds": {},
    }
    for kind in kinds:
        mask = clean | np.array([o.kind == kind for o in obs])
        report["kinds"][kind] = {
            "spearman": est(_spearman, mask),
            "auc_moderate": est(_auc(artifacts.REPEAT_SEVERITY - 1), mask),
            "auc_severe": est(_auc(SEVERE), mask),
            "detect_repeat": est(_rate_below(threshold, artifacts.REPEAT_SEVERITY), mask),
            "detect_severe": est(_rate_below(threshold, SEVERE), mask),
            "mean_by_severity": [
                _mean([o.score for o in obs if (o.kind == kind and o.severity == s) or (s == 0 and o.kind == "clean")])
                for s in range(artifacts.MAX_SEVERITY + 1)
            ],
        }
    return report


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _within_head(obs: Sequence[Observation]) -> float:
    """Mean Spearman(score, severity) within one subject and one kind (clean scans included as severity 0)."""
    values = []
    for subject in {(o.site, o.subject) for o in obs}:
        mine = [o for o in obs if (o.site, o.subject) == subject]
        for kind in {o.kind for o in mine} - {"clean"}:
            chosen = [o for o in mine if o.kind in (kind, "clean")]
            v = _spearman(np.array([o.score for o in chosen]), np.array([o.severity for o in chosen]))
            if np.isfinite(v):
                values.append(v)
    return _mean(values)


def report_markdown(title: str, report: dict[str, Any]) -> str:
    """One site report as Markdown tables."""
    p = report["pooled"]
    lines = [
        f"### {title}",
        "",
        f"{report['n']} scans of {report['subjects']} heads; alert threshold {report['threshold']}; 95 % CIs from a "
        "subject-level bootstrap.",
        "",
        "| false alarms (clean < threshold) | lowest clean score | Spearman pooled | Spearman within a head |"
        f" detection at severity {artifacts.REPEAT_SEVERITY} | detection at severity {SEVERE} |",
        "|---|---|---|---|---|---|",
        f"| {report['false_alarm']} | {report['clean_min']:.3f} | {p['spearman']} | {p['within_head']:.3f} | "
        f"{p[f'detect_sev{artifacts.REPEAT_SEVERITY}']} | {p[f'detect_sev{SEVERE}']} |",
        "",
        "| AUC clean vs | " + " | ".join(f"sev {s}" for s in range(1, artifacts.MAX_SEVERITY + 1)) + " |",
        "|---|" + "---|" * artifacts.MAX_SEVERITY,
        "| all kinds | " + " | ".join(str(p[f"auc_sev{s}"]) for s in range(1, artifacts.MAX_SEVERITY + 1)) + " |",
        "",
        "| kind | Spearman | AUC moderate | AUC severe | detection (repeat) | detection (severe) | mean score by "
        "severity 0..5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, k in report["kinds"].items():
        means = " / ".join(f"{v:.2f}" if np.isfinite(v) else "-" for v in k["mean_by_severity"])
        lines.append(
            f"| {kind} | {k['spearman']} | {k['auc_moderate']} | {k['auc_severe']} | {k['detect_repeat']} | "
            f"{k['detect_severe']} | {means} |"
        )
    return "\n".join(lines) + "\n"


def to_json(report: dict[str, Any]) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, Estimate):
            return dataclasses.asdict(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return json.dumps(plain(report), indent=1)


# ------------------------------------------------------------------------------------------ observations


def clean_variants(volume) -> list[tuple[str, Any]]:
    """The same clean scan as other sites could deliver it, each of which must not alert: as acquired, with
    voxels 1.3x coarser (a faster protocol), with a Rician background floor of 1 % of the 99th percentile (a
    noisier coil), and with a field of view cropped to the head's bounding box (a tight FOV)."""
    from scipy import ndimage

    from qc_daemon.volume import Volume
    from trainer.acquisition import Acquisition, acquire, head_box

    data = np.asarray(volume.data, dtype=np.float32)
    coarse = ndimage.zoom(data, 1 / 1.3, order=1)
    scale = np.asarray(data.shape, dtype=np.float64) / np.asarray(coarse.shape)
    affine = np.array(volume.affine, dtype=np.float64)
    affine[:3, :3] = affine[:3, :3] * scale  # column j = voxel axis j
    spacing = tuple(float(s * f) for s, f in zip(volume.spacing_mm, scale, strict=True))
    floor, _ = acquire(data, volume.spacing_mm, Acquisition(floor_fraction=0.01, floor_seed=5))
    tight = np.ascontiguousarray(data[head_box(data, margin=2)])
    return [
        ("as acquired", volume),
        ("1.3x coarser voxels", Volume(coarse.astype(np.float32), spacing, affine)),
        ("background floor 1 %", Volume(floor, volume.spacing_mm, volume.affine)),
        ("tight field of view", Volume(tight, volume.spacing_mm, volume.affine)),
    ]


def observe_volumes(
    scorer,
    volumes: dict[str, Any],
    kinds: Sequence[str] = ("noise", "motion", "ghosting", "blur", "spike"),
    seeds: Sequence[int] = (1, 2),
    site_of: Callable[[str], str] = lambda name: name,
) -> list[Observation]:
    """Score each clean volume (a ``qc_daemon.volume.Volume``), its :func:`clean_variants`, and its degraded
    versions at every severity.

    The artifacts are applied on the volume's own grid, along an in-plane phase-encode axis.
    """
    from qc_daemon.volume import Volume

    out = []
    for name, volume in volumes.items():
        spacing = tuple(float(s) for s in volume.spacing_mm)
        finest = min(spacing)
        pe_axis = max(i for i, s in enumerate(spacing) if s < 1.5 * finest)

        def score(data: np.ndarray) -> float:
            return scorer.score_volume(Volume(data.astype(np.float32), volume.spacing_mm, volume.affine)).score

        for _, variant in clean_variants(volume):
            clean = scorer.score_volume(variant).score
            out.append(Observation(site_of(name), name, "clean", 0, clean))
        for kind in kinds:
            for severity in range(1, artifacts.MAX_SEVERITY + 1):
                for seed in seeds:
                    degraded, _ = artifacts.degrade(volume.data, spacing, kind, severity, seed, pe_axis)
                    out.append(Observation(site_of(name), name, kind, severity, score(degraded)))
    return out


GHOST_AMPLITUDES = (0.12, 0.3)  # the repeat level of ghosting, and severe


def ghost_directions(scorer, volumes: dict[str, Any], amplitudes: Sequence[float] = GHOST_AMPLITUDES) -> list[dict]:
    """N/2 ghosts along each voxel axis in turn (phase error and amplitude error, ``trainer.artifacts``), scored:
    how much the alert depends on where the ghost falls. One row per (volume, axis, error) with the scores at
    each of ``amplitudes``."""
    from qc_daemon.volume import Volume

    rows = []
    for name, volume in volumes.items():
        spacing = tuple(float(s) for s in volume.spacing_mm)
        for axis in range(3):
            for phase_error in (True, False):
                scores = []
                for amplitude in amplitudes:
                    params = {"axis": axis, "period": 2, "amplitude": amplitude, "phase_error": phase_error}
                    degraded = artifacts.apply_params(volume.data, spacing, "ghosting", params)
                    scores.append(scorer.score_volume(Volume(degraded, volume.spacing_mm, volume.affine)).score)
                rows.append({"volume": name, "axis": axis, "phase_error": phase_error, "scores": scores})
    return rows


def ghost_directions_markdown(rows: Sequence[dict], amplitudes: Sequence[float] = GHOST_AMPLITUDES) -> str:
    levels = " / ".join(f"{a:.0%}" for a in amplitudes)
    lines = [
        "#### N/2 ghosts along each voxel axis",
        "",
        f"| volume | voxel axis | error | score at {levels} |",
        "|---|---|---|---|",
    ]
    for r in rows:
        error = "phase" if r["phase_error"] else "amplitude"
        lines.append(f"| {r['volume']} | {r['axis']} | {error} | {' / '.join(f'{v:.2f}' for v in r['scores'])} |")
    return "\n".join(lines) + "\n"


def observe_items(items, scores: Sequence[float]) -> list[Observation]:
    """Observations from scored cache items (single-artifact and clean versions; mixtures left out)."""
    return [
        Observation(item.dataset, item.subject, item.kind, item.severity, float(s))
        for item, s in zip(items, scores, strict=True)
        if item.kind != "mixture"
    ]


def write_report(out_prefix: str | Path, sections: dict[str, dict[str, Any]]) -> Path:
    """``{out_prefix}.md`` with one section per report, and ``.json``."""
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(report_markdown(t, r) for t, r in sections.items()))
    out.with_suffix(".json").write_text("{" + ",".join(f"{json.dumps(t)}: {to_json(r)}" for t, r in sections.items()) + "}")
    return out.with_suffix(".md")


# ------------------------------------------------------------------------------------------ the commands

UNSEEN_DICOM = ("philips_elitionx_t1_mprage_3d", "siemens_prisma_t1_2d_sag")


def unseen_sites(
    model: str | Path, out_prefix: str | Path, dicom_root: str | Path, threshold: float = 0.5, checks: bool = True
) -> Path:
    """``python -m trainer unseen``: the exported model, through the daemon's scorer, on the shared human DICOM
    series of two sites no training config uses (Philips Ingenia Elition X 3D T1, Siemens Prisma 2D T1).
    ``checks``: the daemon's score (the model floored by the ghost and spike checks); False, the model's alone."""
    from qc_daemon.scorer import Scorer
    from qc_daemon.series import classify, read_series
    from qc_daemon.settings import ScoringSettings
    from qc_daemon.volume import build_volume

    scorer = Scorer(ScoringSettings(model_path=str(model), device="cpu", ghost_check=checks, spike_check=checks))
    volumes = {}
    for name in UNSEEN_DICOM:
        folder = Path(dicom_root) / name
        paths = tuple(sorted(p for p in folder.iterdir() if p.is_file()))
        volumes[name] = build_volume(classify(read_series(name, paths), min_slices=5))
    observations = observe_volumes(scorer, volumes, seeds=(1, 2, 3))
    Path(out_prefix).with_suffix(".observations.json").write_text(
        json.dumps([dataclasses.asdict(o) for o in observations])
    )
    plot_alerts(observations, threshold, Path(out_prefix).with_suffix(".png"), f"Unseen sites, {Path(model).name}")
    report = site_report(observations, threshold)
    what = "the daemon's score" if checks else "the model alone"
    path = write_report(out_prefix, {f"Unseen sites: {', '.join(UNSEEN_DICOM)} ({Path(model).name}, {what})": report})
    with path.open("a") as fh:
        fh.write("\n" + ghost_directions_markdown(ghost_directions(scorer, volumes)))
    return path


def leave_one_site_out(
    config,
    out_dir: str | Path,
    epochs: int,
    volumes_per_epoch: int,
    threshold: float = 0.5,
    sites: Sequence[str] = (),
):
    """``python -m trainer loso``: for every dataset (site) of ``config.data.roots`` (or only ``sites``), train on
    the others at the given (reduced) budget and report on that site's cached versions, scored like the daemon
    does."""
    import torch

    from trainer.checkpoint import load_checkpoint
    from trainer.config import replace
    from trainer.data import build_cache, split_items
    from trainer.model import build_model
    from trainer.train import predict_items, select_device, train

    out_dir = Path(out_dir)
    roots = list(config.data.roots)
    sections: dict[str, dict[str, Any]] = {}
    pooled: list[Observation] = []
    for held_out in roots:
        site = Path(held_out).name
        if sites and site not in sites:
            continue
        others = [r for r in roots if r != held_out]
        run = replace(
            config,
            data={"split": "cross", "train_roots": others, "test_roots": [held_out]},
            train={"epochs": epochs, "volumes_per_epoch": volumes_per_epoch, "out_dir": str(out_dir / site)},
        )
        best = train(run)
        ckpt = load_checkpoint(best)
        model = build_model(ckpt.model_config)
        model.load_state_dict(ckpt.state_dict)
        device = select_device(run.train.device)
        model.to(device)
        test = split_items(build_cache(run.data), run.data, seed=run.train.seed)["test"]
        with torch.no_grad():
            scores = predict_items(model, test, run, device)
        observations = observe_items(test, scores)
        pooled += observations
        sections[f"Left out: {site} (trained on {', '.join(Path(r).name for r in others)})"] = site_report(
            observations, threshold
        )
        write_report(out_dir / "loso", sections)
    sections["All left-out sites pooled"] = site_report(pooled, threshold)
    return write_report(out_dir / "loso", sections)


def plot_alerts(observations: Sequence[Observation], threshold: float, out_png: str | Path, title: str) -> Path:
    """What alerts and what does not: every scan's score by artifact kind and physical severity, per head, with
    the alert threshold; severities labelled in physical units (``artifacts.SEVERITY_TABLE``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in artifacts.KINDS if any(o.kind == k for o in observations)]
    heads = sorted({(o.site, o.subject) for o in observations})
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.1 * len(kinds), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, kind in zip(axes, kinds, strict=True):
        for h, head in enumerate(heads):
            pts = [(0, o.score) for o in observations if (o.site, o.subject) == head and o.kind == "clean"]
            pts += [(o.severity, o.score) for o in observations if (o.site, o.subject) == head and o.kind == kind]
            x, y = zip(*sorted(pts), strict=True)
            ax.plot(np.asarray(x) + 0.06 * (h - len(heads) / 2), y, "o", ms=3.5, alpha=0.75, label=head[1][:18])
        ax.axhline(threshold, color="crimson", lw=1)
        ax.axvspan(artifacts.REPEAT_SEVERITY - 0.5, artifacts.MAX_SEVERITY + 0.5, color="crimson", alpha=0.06)
        table = artifacts.SEVERITY_TABLE[kind]
        ax.set_xticks(range(artifacts.MAX_SEVERITY + 1), [f"{v:g}" for v in table], fontsize=7)
        ax.set_xlabel(f"{kind}: {artifacts.UNITS[kind]}", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("score (alert below the red line)")
    axes[-1].legend(fontsize=6, loc="lower left")
    fig.suptitle(title + "  (shaded: severity a technologist would repeat)", fontsize=9)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
