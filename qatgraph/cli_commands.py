"""What each ``qatgraph`` subcommand does (the parser and exit codes are in :mod:`qatgraph.cli`).

Each ``cmd_*`` takes the parsed arguments and returns an exit code; bad input raises a
:class:`~qatgraph.errors.QatgraphError` subclass whose message says what to change.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np
import torch

from .errors import UsageError, plural, warn

EXIT_OK, EXIT_CHECK_FAILED = 0, 1


def load_samples(spec: str, input_shape: Sequence[int], count: int, source: str = "") -> torch.Tensor:
    """Samples (N, ...) from a .pt/.npy file, or ``random`` Gaussian inputs, checked against the
    model's input shape (dims after the batch)."""
    from .checkpoint import read_torch_file

    if spec == "random":
        generator = torch.Generator().manual_seed(0)
        return torch.randn(count, *input_shape[1:], generator=generator)
    if not os.path.exists(spec):
        raise UsageError(f"data file {spec!r} does not exist (give a .pt/.npy file of inputs, or 'random')")
    if spec.endswith(".npy"):
        try:
            data = torch.from_numpy(np.load(spec, allow_pickle=False))
        except ValueError as exc:
            raise UsageError(f"data file {spec!r} is not a plain NumPy array ({exc})") from None
    else:
        data = read_torch_file(spec, "data file")
        if isinstance(data, dict):
            data = data.get("inputs", data.get("x"))
    if not isinstance(data, torch.Tensor) or data.dim() < 1:
        raise UsageError(f"data file {spec!r} must hold one tensor of inputs (N, ...) or a dict with 'inputs'")
    expected = tuple(input_shape[1:])
    if tuple(data.shape[1:]) != expected:
        raise UsageError(f"data file {spec!r} holds samples of shape {tuple(data.shape[1:])}, but the model{source} "
                         f"takes {expected} (the --input-shape it was compiled with, after the batch dimension). "
                         "Give inputs of that shape.")
    return data[:count].float()


def batches_of(samples: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]


def _positive(value: int, option: str) -> None:
    if value <= 0:
        raise UsageError(f"{option} {value}: use a positive number")


def cmd_compile(args: argparse.Namespace) -> int:
    from qatgraph.policy import Policy

    from .atomic_files import check_output_path
    from .checkpoint import ModelSource, save_checkpoint
    from .pipeline import compile as compile_model
    from .summary import summary

    check_output_path(args.output, "checkpoint")  # before compiling: a directory fails now, not at the end
    source = ModelSource(args.model, args.weights, args.input_shape)
    policy = Policy.from_any(args.policy)
    qmodel = compile_model(source.build(), policy, example_inputs=(source.example_input(),))
    summary(qmodel)
    save_checkpoint(args.output, qmodel, source, policy)
    print(f"wrote {args.output} (self-contained: the weights are in it)")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from qatgraph.quant.calibrate import calibrate
    from qatgraph.quant.quantizer import iter_quantizers

    from .atomic_files import check_output_path
    from .checkpoint import load_checkpoint, save_checkpoint

    _positive(args.num_batches, "--num-batches")
    _positive(args.batch_size, "--batch-size")
    output = args.output or args.checkpoint
    check_output_path(output, "checkpoint")
    qmodel, source, policy = load_checkpoint(args.checkpoint)
    if not any(q.is_enabled for _, q in iter_quantizers(qmodel)):
        raise UsageError(f"the model in {args.checkpoint!r} has no enabled quantizer, so there is nothing to "
                         f"calibrate (`qatgraph summary {args.checkpoint}` shows why each layer stays in floating "
                         "point); compile it with a policy that quantizes something. Nothing was written.")
    samples = load_samples(args.data, source.input_shape, args.num_batches * args.batch_size, f" in {args.checkpoint}")
    batches = batches_of(samples, args.batch_size)
    calibrate(qmodel, batches, num_batches=args.num_batches)
    save_checkpoint(output, qmodel, source, policy)
    print(f"calibrated on {plural(len(samples), 'sample')} in {plural(len(batches), 'batch')}; wrote {output}")
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .summary import summary

    summary(load_checkpoint(args.checkpoint)[0])
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from qatgraph.backends.onnx import export_onnx
    from qatgraph.backends.onnx_lint import format_findings

    from .atomic_files import check_output_path
    from .checkpoint import load_checkpoint

    check_output_path(args.output, "ONNX model")
    qmodel, source, _ = load_checkpoint(args.checkpoint)
    result = export_onnx(qmodel, args.output, (source.example_input(),), opset=args.opset,
                         dynamic_batch=not args.static_batch,
                         allow_data_dependent_branches=args.allow_data_dependent_branches)
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
        raise UsageError("give the ONNX file to lint (or --rules to list the rules)")
    findings = lint(args.onnx, target=args.target)
    errors = [f for f in findings if f.severity == "error"]
    print(format_findings(findings) if findings else f"{args.onnx}: clean for {args.target}")
    print(f"{plural(len(errors), 'error')}, {plural(len(findings) - len(errors), 'warning')}")
    return EXIT_CHECK_FAILED if errors else EXIT_OK


def cmd_parity(args: argparse.Namespace) -> int:
    from qatgraph.backends.parity import check_parity

    from .checkpoint import load_checkpoint

    _positive(args.num_samples, "--num-samples")
    qmodel, source, _ = load_checkpoint(args.checkpoint)
    samples = load_samples(args.data, source.input_shape, args.num_samples, f" in {args.checkpoint}")
    report = check_parity(qmodel, args.onnx, samples)
    print(report)
    # Default: the export computes what was trained and ORT what the export says, either directly or
    # shown teacher-forced (see ParityReport). --strict: the free-running output must match.
    ok = report.strict_passed if args.strict else report.passed
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def cmd_build_engine(args: argparse.Namespace) -> int:
    from qatgraph.backends.tensorrt import build_engine

    from .atomic_files import check_output_path

    check_output_path(args.output, "engine")
    info = build_engine(args.onnx, args.output, workspace_gib=args.workspace_gib, min_batch=args.min_batch,
                        opt_batch=args.opt_batch, max_batch=args.max_batch, timing_cache=args.timing_cache)
    print(f"built {info.engine_path} with TensorRT {info.trt_version} ({info.builder}) in {info.build_seconds:.1f} s")
    return EXIT_OK


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from qatgraph.sensitivity_analysis.scores import sensitivity

    from .checkpoint import load_checkpoint

    _positive(args.num_samples, "--num-samples")
    _positive(args.batch_size, "--batch-size")
    if os.path.isfile(args.out):
        raise UsageError(f"--out {args.out!r} is a file; give a directory for sensitivity.json/.md/.html")
    qmodel, source, _ = load_checkpoint(args.checkpoint)
    samples = load_samples(args.data, source.input_shape, args.num_samples, f" in {args.checkpoint}")
    if len(samples) < args.num_samples:
        warn(f"--num-samples {args.num_samples}, but {args.data!r} holds only {plural(len(samples), 'sample')}; the "
             "scores rest on those")
    report = sensitivity(qmodel, batches_of(samples, args.batch_size), mode="fast", num_samples=args.num_samples,
                         cache_dir=args.cache_dir)
    paths = report.save(args.out)
    for rank, layer in enumerate(report.ranking[:10], 1):
        print(f"{rank:3d}. {layer:40s} {report.scores[layer]:.4g}")
    print("wrote " + ", ".join(str(p) for p in (paths.values() if isinstance(paths, dict) else paths)))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if os.path.isfile(args.out):
        raise UsageError(f"--out {args.out!r} is a file; give a directory for the demo's artifacts")
    run_demo(out_dir=args.out, data=args.data, data_dir=args.data_dir, quick=args.quick)
    return EXIT_OK


__all__ = [
    "batches_of",
    "cmd_build_engine",
    "cmd_calibrate",
    "cmd_compile",
    "cmd_demo",
    "cmd_export",
    "cmd_lint",
    "cmd_parity",
    "cmd_sensitivity",
    "cmd_summary",
    "load_samples",
]
