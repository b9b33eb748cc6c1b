"""``python -m trainer {prepare,train,evaluate,ablation,baseline,pca,sanity,unseen,loso}`` (run from the repository root)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train and evaluate HyS-net.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build the preprocessed/degraded volume cache only")
    p.add_argument("--config", required=True)

    p = sub.add_parser("train", help="train a model (builds the cache first if needed)")
    p.add_argument(
        "--config",
        required=True,
        nargs="+",
        help="one config, or stages run in turn (a later stage's train.init_from names an earlier one's result)",
    )
    p.add_argument("--epochs", type=int, help="override train.epochs (one config only)")
    p.add_argument("--out-dir", help="override train.out_dir (one config only)")

    p = sub.add_parser("evaluate", help="test-set metrics with bootstrap CIs as Markdown (+ JSON)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--data-config", help="evaluate on this config's data split instead (e.g. a cross-dataset one)")
    p.add_argument("--n-boot", type=int, default=1000)

    p = sub.add_parser("ablation", help="Table 1: {2D,3D} x {plain,hyper} x {R18,R34,R50}")
    p.add_argument("--config", default="trainer/configs/default.toml")
    p.add_argument("--out", default="runs/ablation/table1", help="output prefix (.md and .csv)")
    p.add_argument("--epochs", type=int, help="reduced budget: epochs per run")
    p.add_argument("--volumes-per-epoch", type=int, help="reduced budget: training volumes per epoch")
    p.add_argument("--width", type=int, help="reduced budget: backbone width")
    p.add_argument("--rows", help="only these rows, comma-separated (e.g. r18-3d-hyper,r18-3d-plain)")
    p.add_argument("--n-boot", type=int, default=1000)

    p = sub.add_parser("baseline", help="Table 2: HyS-net vs MRIQC-style IQMs + random forest")
    p.add_argument("checkpoint")
    p.add_argument("--out", default="runs/table2", help="output prefix (.md and .csv)")
    p.add_argument("--max-train", type=int, default=400)

    p = sub.add_parser("pca", help="Fig. 3: PCA of generated predictor weights (PNG)")
    p.add_argument("checkpoint")
    p.add_argument("--out", default="runs/fig3-pca.png")

    p = sub.add_parser("sanity", help="exported model on held-out subjects x artifact x severity (MD + PNG)")
    p.add_argument("model", help="the exported .onnx")
    p.add_argument("--checkpoint", required=True, help="the checkpoint it came from (for the held-out split)")
    p.add_argument("--out", default="runs/sanity", help="output prefix (.md, .json, .png)")
    p.add_argument("--per-dataset", type=int, default=2)
    p.add_argument("--at", choices=("native", "model"), default="native", help="where the artifacts are applied")

    p = sub.add_parser("unseen", help="the exported model on the shared human DICOM of two unseen sites (MD + JSON)")
    p.add_argument("model", help="the exported .onnx")
    p.add_argument("--out", default="runs/unseen", help="output prefix (.md, .json)")
    p.add_argument("--dicom-root", default="../shared/data/dicom")
    p.add_argument("--model-only", action="store_true", help="the model's score alone (no ghost and spike checks)")

    p = sub.add_parser("loso", help="leave-one-site-out: train without each site, report on it (MD + JSON)")
    p.add_argument("--config", default="trainer/configs/default.toml")
    p.add_argument("--out", default="runs/loso")
    p.add_argument("--epochs", type=int, default=8, help="reduced budget: epochs per run")
    p.add_argument("--volumes-per-epoch", type=int, default=150, help="reduced budget: training volumes per epoch")
    p.add_argument("--sites", default="", help="only these held-out sites, comma-separated (default: every one)")

    args = parser.parse_args(argv)
    from trainer.config import ConfigError, load_config, replace

    try:
        if args.command == "prepare":
            from trainer.data import build_cache

            items = build_cache(load_config(args.config).data, progress=True)
            print(f"{len(items)} volumes cached")
        elif args.command == "train":
            from trainer.train import train

            changes = {}
            if args.epochs:
                changes["epochs"] = args.epochs
            if args.out_dir:
                changes["out_dir"] = args.out_dir
            if changes and len(args.config) > 1:
                raise ConfigError("--epochs and --out-dir apply to a single --config, not to stages")
            for path in args.config:  # stages: load each only when its turn comes (its init_from must exist)
                config = load_config(path)
                if changes:
                    config = replace(config, train=changes)
                print(train(config, config_path=path), flush=True)
        elif args.command == "evaluate":
            from trainer.evaluate import evaluate_checkpoint

            evaluate_checkpoint(args.checkpoint, args.out, data_config=args.data_config, n_boot=args.n_boot)
            print(Path(args.out).read_text())
        elif args.command == "ablation":
            from trainer.ablation import ABLATION_GRID, ablation_row_name, run_ablation

            grid = ABLATION_GRID
            if args.rows:
                wanted = [name.strip() for name in args.rows.split(",") if name.strip()]
                known = {ablation_row_name(*row): row for row in ABLATION_GRID}
                unknown = [name for name in wanted if name not in known]
                if unknown:
                    raise ConfigError(f"--rows: unknown row {unknown[0]!r} (known: {', '.join(known)})")
                grid = [known[name] for name in wanted]
            run_ablation(
                load_config(args.config),
                args.out,
                epochs=args.epochs,
                volumes_per_epoch=args.volumes_per_epoch,
                width=args.width,
                grid=grid,
                n_boot=args.n_boot,
            )
            print(Path(args.out + ".md").read_text())
        elif args.command == "baseline":
            from trainer.baseline import classical_baseline

            classical_baseline(args.checkpoint, args.out, max_train=args.max_train)
            print(Path(args.out + ".md").read_text())
        elif args.command == "pca":
            from trainer.pca import pca_figure

            print(pca_figure(args.checkpoint, args.out))
        elif args.command == "sanity":
            from qc_daemon.scorer import ModelError
            from trainer.sanity import sanity_check

            try:
                sanity_check(args.model, args.checkpoint, args.out, per_dataset=args.per_dataset, at=args.at)
            except ModelError as exc:  # the daemon would refuse this model too
                print(f"model refused: {exc}", file=sys.stderr)
                return 1
            print(Path(args.out + ".md").read_text())
        elif args.command == "unseen":
            from trainer.generalisation import unseen_sites

            print(unseen_sites(args.model, args.out, args.dicom_root, checks=not args.model_only).read_text())
        elif args.command == "loso":
            from trainer.generalisation import leave_one_site_out

            config = load_config(args.config)
            sites = [s.strip() for s in args.sites.split(",") if s.strip()]
            print(leave_one_site_out(config, args.out, args.epochs, args.volumes_per_epoch, sites=sites).read_text())
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
