"""The ``qatgraph`` command line: compile, calibrate, summary, export, lint, parity, build-engine,
sensitivity and demo.

Models are given as ``package.module:factory`` (a callable returning an ``nn.Module``) plus
optional FP weights (``--weights``, loaded with ``weights_only=True``). ``compile`` writes a QAT
checkpoint that the other commands read (see qatgraph/checkpoint.py). Data files are tensors
saved with ``torch.save`` (``.pt``) or NumPy arrays (``.npy``), samples along dim 0; ``random``
draws Gaussian inputs of the model's input shape (for smoke tests only). Exit codes: 0 success,
1 a check failed (lint errors, parity out of tolerance), 2 bad input or a failure explained on stderr.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch

from .errors import QatgraphError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_ERROR = 0, 1, 2


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape {text!r} must be integers like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape {text!r} must be positive integers like 1,3,224,224")
    return shape


def load_samples(spec: str, input_shape: Sequence[int], count: int) -> torch.Tensor:
    """Samples (N, ...) from a .pt/.npy file, or ``random`` Gaussian inputs."""
    if spec == "random":
        generator = torch.Generator().manual_seed(0)
        return torch.randn(count, *input_shape[1:], generator=generator)
    if not os.path.exists(spec):
        raise QatgraphError(f"data file {spec!r} does not exist (give a .pt/.npy file of inputs, or 'random')")
    if spec.endswith(".npy"):
        data = torch.from_numpy(np.load(spec))
    else:
        data = torch.load(spec, map_location="cpu", weights_only=True)
        if isinstance(data, dict):
            data = data.get("inputs", data.get("x"))
    if not isinstance(data, torch.Tensor) or data.dim() < 1:
        raise QatgraphError(f"data file {spec!r} must hold one tensor of inputs (N, ...) or a dict with 'inputs'")
    return data[:count].float()


def batches_of(samples: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]


def cmd_compile(args: argparse.Namespace) -> int:
    from qatgraph.policy import Policy

    from .checkpoint import ModelSource, save_checkpoint
    from .pipeline import compile as compile_model
    from .summary import summary

    source = ModelSource(args.model, args.weights, args.input_shape)
    policy = Policy.from_any(args.policy)
    qmodel = compile_model(source.build(), policy, example_inputs=(source.example_input(),))
    summary(qmodel)
    save_checkpoint(args.output, qmodel, source, policy)
    print(f"wrote {args.output}")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from qatgraph.quant.calibrate import calibrate

    from .checkpoint import load_checkpoint, save_checkpoint

    qmodel, source, policy = load_checkpoint(args.checkpoint)
    samples = load_samples(args.data, source.input_shape, args.num_batches * args.batch_size)
    calibrate(qmodel, batches_of(samples, args.batch_size), num_batches=args.num_batches)
    save_checkpoint(args.output or args.checkpoint, qmodel, source, policy)
    print(f"calibrated {len(samples)} samples; wrote {args.output or args.checkpoint}")
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .summary import summary

    summary(load_checkpoint(args.checkpoint)[0])
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from qatgraph.backends.onnx import export_onnx
    from qatgraph.backends.onnx_lint import format_findings

    from .checkpoint import load_checkpoint

    qmodel, source, policy = load_checkpoint(args.checkpoint)
    result = export_onnx(qmodel, args.output, (source.example_input(),), opset=args.opset,
                         dynamic_batch=not args.static_batch)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.num_qdq} Q/DQ nodes, opset {result.opset})")
    if result.findings:
        print(format_findings(result.findings))
    return EXIT_CHECK_FAILED if any(f.severity == "error" for f in result.findings) else EXIT_OK


def cmd_lint(args: argparse.Namespace) -> int:
    from qatgraph.backends.onnx_lint import RULES, format_findings, lint

    if args.rules:
        for rule, description in RULES.items():
            print(f"{rule:28s} {description}")
        return EXIT_OK
    if not args.onnx:
        raise QatgraphError("give the ONNX file to lint (or --rules to list the rules)")
    findings = lint(args.onnx, target=args.target)
    errors = [f for f in findings if f.severity == "error"]
    print(format_findings(findings) if findings else f"{args.onnx}: clean for {args.target}")
    print(f"{len(errors)} error(s), {len(findings) - len(errors)} warning(s)")
    return EXIT_CHECK_FAILED if errors else EXIT_OK


def cmd_parity(args: argparse.Namespace) -> int:
    from qatgraph.backends.parity import check_parity

    from .checkpoint import load_checkpoint

    qmodel, source, _ = load_checkpoint(args.checkpoint)
    samples = load_samples(args.data, source.input_shape, args.num_samples)
    report = check_parity(qmodel, args.onnx, samples)
    print(report)
    # Default: top-1 agrees, and the output matches either free-running or with ORT's integers fed
    # in (teacher-forced; deep float-output models differ free-running by near-tie roundings that
    # the model amplifies, see ParityReport). --strict: free-running only.
    ok = report.strict_passed if args.strict else report.passed
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def cmd_build_engine(args: argparse.Namespace) -> int:
    from qatgraph.backends.tensorrt import build_engine

    info = build_engine(args.onnx, args.output, workspace_gib=args.workspace_gib, min_batch=args.min_batch,
                        opt_batch=args.opt_batch, max_batch=args.max_batch, timing_cache=args.timing_cache)
    print(f"built {info.engine_path} with TensorRT {info.trt_version} ({info.builder}) in {info.build_seconds:.1f} s")
    return EXIT_OK


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from qatgraph.sensitivity_analysis.scores import sensitivity

    from .checkpoint import load_checkpoint

    qmodel, source, _ = load_checkpoint(args.checkpoint)
    samples = load_samples(args.data, source.input_shape, args.num_samples)
    report = sensitivity(qmodel, batches_of(samples, args.batch_size), mode="fast", num_samples=args.num_samples,
                         cache_dir=args.cache_dir)
    paths = report.save(args.out)
    for rank, layer in enumerate(report.ranking[:10], 1):
        print(f"{rank:3d}. {layer:40s} {report.scores[layer]:.4g}")
    print("wrote " + ", ".join(str(p) for p in (paths.values() if isinstance(paths, dict) else paths)))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, data=args.data, data_dir=args.data_dir, quick=args.quick)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qatgraph", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile a model into a QAT checkpoint")
    p.add_argument("model", help="package.module:factory returning an nn.Module")
    p.add_argument("--weights", help="FP32 state dict to load into the model first (.pt)")
    p.add_argument("--policy", default="tensorrt", help="preset name (tensorrt, onnxruntime) or YAML file")
    p.add_argument("--input-shape", type=_shape, required=True, help="example input shape, e.g. 1,3,224,224")
    p.add_argument("-o", "--output", default="qat.pt", help="checkpoint to write (default qat.pt)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("calibrate", help="calibrate activation scales of a QAT checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help=".pt/.npy file of inputs (N, ...), or 'random'")
    p.add_argument("--num-batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("-o", "--output", help="checkpoint to write (default: update in place, atomically)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("summary", help="print the quantization decision table of a checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("export", help="export a calibrated checkpoint to ONNX Q/DQ (and lint it)")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", default="model.onnx")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--static-batch", action="store_true", help="fixed batch size instead of a dynamic one")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("lint", help="check an ONNX file against TensorRT's explicit-quantization rules")
    p.add_argument("onnx", nargs="?")
    p.add_argument("--target", default="tensorrt", choices=["tensorrt", "onnxruntime"])
    p.add_argument("--rules", action="store_true", help="list the rules and exit")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("parity", help="compare the PyTorch QAT model with its ONNX export in ONNX Runtime")
    p.add_argument("checkpoint")
    p.add_argument("onnx")
    p.add_argument("--data", default="random", help=".pt/.npy file of inputs, or 'random'")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--strict", action="store_true",
                   help="fail unless the free-running output is within one quantization step (1e-4 relative "
                        "if not quantized); by default the teacher-forced comparison may explain the difference")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("build-engine", help="build a TensorRT engine from a Q/DQ ONNX file")
    p.add_argument("onnx")
    p.add_argument("-o", "--output", default="model.engine")
    p.add_argument("--workspace-gib", type=float, default=4.0)
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--timing-cache", help="timing cache file to read and update")
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser("sensitivity", help="rank layers by quantization sensitivity and write reports")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help=".pt/.npy file of inputs, or 'random'")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="sensitivity", help="directory for sensitivity.{json,md,html}")
    p.add_argument("--cache-dir", help="resume/cache directory")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("demo", help="end-to-end QAT on a real data set: FP32, PTQ, QAT, EfQAT, ONNX, ORT")
    p.add_argument("--out", default="qatgraph-demo", help="directory for every artifact")
    p.add_argument("--data", default="digits", choices=["digits", "cifar10"])
    p.add_argument("--data-dir", help="CIFAR-10 python-pickle directory (for --data cifar10)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for CI)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except QatgraphError as exc:
        print(f"qatgraph {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"qatgraph {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
