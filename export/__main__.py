"""Command line: ``python -m export {model,parity,graph,bundle} ...``.

Exit status 0 on success, 1 when an export, graph check or parity check fails (the message goes to stderr and
no model file is written), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from export.bundle import DEFAULT_SEED, DEFAULT_WIDTH, build_bundle
from export.graph_check import GraphCheckError, inspect_graph
from export.onnx_export import DEFAULT_OPSET, ExportError, ExportResult, export_checkpoint, parity_for_checkpoint
from export.parity import MAX_ATOL, MAX_RTOL, ParityConfig, ParityError
from trainer.checkpoint import CheckpointError


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def _add_parity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 3), help="comma-separated (default 1,3)")
    parser.add_argument("--trials", type=int, default=3, help="random batches per batch size (default 3)")
    parser.add_argument("--rtol", type=float, default=MAX_RTOL, help=f"at most {MAX_RTOL} (default)")
    parser.add_argument("--atol", type=float, default=MAX_ATOL, help=f"at most {MAX_ATOL} (default)")
    parser.add_argument("--seed", type=int, default=0)


def _parity_config(args: argparse.Namespace) -> ParityConfig:
    return ParityConfig(
        batch_sizes=args.batch_sizes, trials=args.trials, rtol=args.rtol, atol=args.atol, seed=args.seed
    )


def _summary(result: ExportResult) -> str:
    p = result.parity
    return (
        f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.info.architecture} width "
        f"{result.info.width}, patch {result.info.patch_size}); parity passed: max abs err {p.max_abs_err:.2e} "
        f"(rtol {p.rtol}, atol {p.atol}, batches {list(p.batch_sizes)}); sha256 {result.info.sha256[:16]}...; "
        f"report {result.parity_path}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_model = sub.add_parser("model", help="export a checkpoint to one .onnx file (+ .parity.json)")
    p_model.add_argument("checkpoint", type=Path)
    p_model.add_argument("--out", type=Path, required=True)
    p_model.add_argument("--patch-size", type=int, default=None, help="default: the checkpoint's (96 in the paper)")
    p_model.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    _add_parity_args(p_model)

    p_parity = sub.add_parser("parity", help="rerun ONNX Runtime vs torch parity of an exported file")
    p_parity.add_argument("onnx", type=Path)
    p_parity.add_argument("checkpoint", type=Path)
    _add_parity_args(p_parity)

    p_graph = sub.add_parser("graph", help="show the target layers' computed-weight MatMuls (raw and ORT-optimised)")
    p_graph.add_argument("onnx", type=Path)

    p_bundle = sub.add_parser("bundle", help="export a seeded, untrained placeholder model (scores mean nothing)")
    p_bundle.add_argument("--out", type=Path, required=True)
    p_bundle.add_argument("--force", action="store_true", help="allow --out to be the shipped trained model")
    p_bundle.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    p_bundle.add_argument("--seed", type=int, default=DEFAULT_SEED)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "model":
            result = export_checkpoint(
                args.checkpoint, args.out, patch_size=args.patch_size, opset=args.opset, parity=_parity_config(args)
            )
            print(_summary(result))
        elif args.command == "parity":
            report = parity_for_checkpoint(args.onnx, args.checkpoint, _parity_config(args))
            print(report.to_json())
        elif args.command == "graph":
            check = inspect_graph(args.onnx)
            print(json.dumps({"raw": check.raw, "optimised": check.optimised, "layers": check.layers}, indent=2))
            if len(check.layers) != 3:
                print(f"{args.onnx}: not all of fc1..fc3 are computed-weight MatMuls", file=sys.stderr)
                return 1
        elif args.command == "bundle":
            print(_summary(build_bundle(args.out, width=args.width, seed=args.seed, force=args.force)))
    except ParityError as exc:
        if exc.report is not None:
            print(exc.report.to_json(), file=sys.stderr)
        print(f"parity FAILED: {exc}", file=sys.stderr)
        return 1
    except (ExportError, GraphCheckError, CheckpointError, ValueError) as exc:
        print(f"{args.command} FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
