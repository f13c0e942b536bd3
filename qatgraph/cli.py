"""The ``qatgraph`` command line: compile, calibrate, summary, export, lint, parity, build-engine,
sensitivity and demo.

Models are given as ``package.module:factory`` (a callable returning an ``nn.Module``), imported
like ``python -m`` does: from installed packages, PYTHONPATH and the current directory. Optional
FP weights (``--weights``) load with ``weights_only=True``. ``compile`` writes a self-contained
QAT checkpoint that the other commands read (see qatgraph/checkpoint.py). Data files are tensors
saved with ``torch.save`` (``.pt``) or NumPy arrays (``.npy``), samples along dim 0; ``random``
draws Gaussian inputs of the model's input shape (for smoke tests only).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence

from . import cli_commands as commands
from .errors import BackendUnavailableError, QatgraphError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_CODES = f"""exit codes:
  {EXIT_OK}  success
  {EXIT_CHECK_FAILED}  a check failed: lint errors (export, lint), parity out of tolerance (parity)
  {EXIT_USAGE}  usage error: bad arguments or input (a file, model, shape or policy); the message says what to change
  {EXIT_UNAVAILABLE}  a backend is not available here (TensorRT, a GPU, Triton); the message says what to install
  {EXIT_INTERNAL}  internal error: an unexpected failure; run again with --verbose for the traceback and report it
  130 interrupted"""

load_samples, batches_of = commands.load_samples, commands.batches_of  # importable from here, as before


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape {text!r} must be integers like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape {text!r} must be positive integers like 1,3,224,224")
    return shape


def _version() -> str:
    import torch

    from . import __version__

    return f"qatgraph {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"


def _subcommand(sub, name: str, summary: str, details: str, func) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {details}",
                            epilog=EXIT_CODES, formatter_class=_Formatter)
    parser.set_defaults(func=func)
    return parser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (not the empty ones); the exit-code table kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qatgraph", description="qatgraph: quantization-aware training for PyTorch "
                                     "that ships INT8 models to TensorRT. `qatgraph COMMAND --help` describes each "
                                     "command.", epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_commands(sub)
    _add_deploy_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    p = _subcommand(sub, "compile", "compile a model into a QAT checkpoint",
                    "Builds the model with its factory, loads --weights, inserts fake-quantizers as the policy says, "
                    "prints the decision table and writes a self-contained checkpoint (the weights are in it).",
                    commands.cmd_compile)
    p.add_argument("model", help="package.module:factory returning an nn.Module (the current directory is searched)")
    p.add_argument("--weights", help="FP32 state dict (.pt) to load into the model before compiling")
    p.add_argument("--policy", default="tensorrt", help="preset name (tensorrt, onnxruntime) or a YAML policy file")
    p.add_argument("--input-shape", type=_shape, required=True, help="example input shape, e.g. 1,3,224,224")
    p.add_argument("-o", "--output", default="qat.pt", help="checkpoint to write")

    p = _subcommand(sub, "calibrate", "calibrate the activation scales of a QAT checkpoint",
                    "Runs the data through the model (post-training calibration, the starting point of QAT) and "
                    "writes the checkpoint with its scales.", commands.cmd_calibrate)
    p.add_argument("checkpoint", help="QAT checkpoint from `qatgraph compile`")
    p.add_argument("--data", required=True, help=".pt/.npy file of inputs (N, ...), or 'random'")
    p.add_argument("--num-batches", type=int, default=16, help="batches to calibrate on (warns if the data has fewer)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("-o", "--output", help="checkpoint to write (default: update the input in place, atomically)")

    p = _subcommand(sub, "summary", "print the quantization decision table of a checkpoint",
                    "One row per weighted layer: INT8/INT4 or float, the rule that decided it, its quantizers.",
                    commands.cmd_summary)
    p.add_argument("checkpoint", help="QAT checkpoint from `qatgraph compile`")

    p = _subcommand(sub, "sensitivity", "rank layers by quantization sensitivity and write reports",
                    "Fast mode: how far each layer's quantization moves the output; writes sensitivity.json, .md "
                    "and .html.", commands.cmd_sensitivity)
    p.add_argument("checkpoint", help="calibrated QAT checkpoint")
    p.add_argument("--data", required=True, help=".pt/.npy file of inputs, or 'random'")
    p.add_argument("--num-samples", type=int, default=256, help="samples to score on (warns if the data has fewer)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--out", default="sensitivity", help="directory for sensitivity.{json,md,html}")
    p.add_argument("--cache-dir", help="directory to cache and resume per-layer results")


def _add_deploy_commands(sub) -> None:
    p = _subcommand(sub, "export", "export a calibrated checkpoint to ONNX Q/DQ and lint it",
                    "Folds BatchNorm, writes QuantizeLinear/DequantizeLinear with INT8 weights and checks the file "
                    "against TensorRT's rules (exit 1 on lint errors).", commands.cmd_export)
    p.add_argument("checkpoint", help="calibrated QAT checkpoint")
    p.add_argument("-o", "--output", default="model.onnx", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (13-23; >= 18 uses the dynamo exporter)")
    p.add_argument("--static-batch", action="store_true", help="fixed batch size instead of a dynamic one")
    p.add_argument("--allow-data-dependent-branches", action="store_true",
                   help="export a forward that branches on tensor values, keeping the branch the example takes")

    p = _subcommand(sub, "lint", "check an ONNX file against TensorRT's explicit-quantization rules",
                    "Names each node that breaks a rule and how to fix it (exit 1 on errors).", commands.cmd_lint)
    p.add_argument("onnx", nargs="?", help="ONNX file to check")
    p.add_argument("--target", default="tensorrt", choices=["tensorrt", "onnxruntime"], help="whose rules")
    p.add_argument("--rules", action="store_true", help="list the rules and exit")

    p = _subcommand(sub, "parity", "compare the trained QAT model with its ONNX export in ONNX Runtime",
                    "Checks that the export copy computes what was trained (in PyTorch) and that ONNX Runtime "
                    "computes what the file says, activation by activation (exit 1 when it fails).",
                    commands.cmd_parity)
    p.add_argument("checkpoint", help="the calibrated or trained QAT checkpoint")
    p.add_argument("onnx", help="the ONNX file exported from it")
    p.add_argument("--data", default="random", help=".pt/.npy file of inputs, or 'random'")
    p.add_argument("--num-samples", type=int, default=64, help="samples to compare on")
    p.add_argument("--strict", action="store_true",
                   help="fail unless the free-running output is within one quantization step (1e-4 relative "
                        "if not quantized); by default the teacher-forced comparison may explain the difference")

    p = _subcommand(sub, "build-engine", "build a TensorRT engine from a Q/DQ ONNX file",
                    "Uses the TensorRT Python API, else trtexec; strongly typed (precision from the Q/DQ).",
                    commands.cmd_build_engine)
    p.add_argument("onnx", help="ONNX file from `qatgraph export`")
    p.add_argument("-o", "--output", default="model.engine", help="engine file to write")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace")
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch of the optimization profile")
    p.add_argument("--opt-batch", type=int, default=8, help="batch the engine is tuned for")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of the optimization profile")
    p.add_argument("--timing-cache", help="timing cache file to read and update")

    p = _subcommand(sub, "demo", "end-to-end QAT on a real data set",
                    "FP32, PTQ, QAT and EfQAT at INT8 and low bits on MNIST-1D (generated locally; or scikit-learn's "
                    "digits, or CIFAR-10), sensitivity report, ONNX "
                    "export, lint, ONNX Runtime accuracy, parity and latency.", commands.cmd_demo)
    p.add_argument("--out", default="qatgraph-demo", help="directory for every artifact")
    p.add_argument("--data", default="mnist1d", choices=["mnist1d", "digits", "cifar10"], help="data set")
    p.add_argument("--data-dir", help="CIFAR-10 python-pickle directory (for --data cifar10)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for CI)")


@contextlib.contextmanager
def _current_directory_importable() -> Iterator[None]:
    """``package.module:factory`` resolves from the current directory, as with ``python -m``."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


@contextlib.contextmanager
def _plain_warnings(command: str) -> Iterator[None]:
    """Warnings as ``qatgraph COMMAND: warning: ...`` lines, without a source location inside qatgraph."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"qatgraph {command}: warning: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 (EXIT_USAGE) on bad arguments, 0 for --help/--version
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    with _current_directory_importable(), _plain_warnings(args.command):
        try:
            return args.func(args)
        except BackendUnavailableError as exc:
            return _fail(args, "error", exc, EXIT_UNAVAILABLE)
        except QatgraphError as exc:
            return _fail(args, "error", exc, EXIT_USAGE)
        except KeyboardInterrupt:
            print(f"qatgraph {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - the last resort: one paragraph, the traceback only on request
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            message = (f"{type(exc).__name__}: {first}. This is a bug in qatgraph or a case it does not handle yet; "
                       "run again with --verbose for the traceback and report it with the command line.")
            return _fail(args, "internal error", message, EXIT_INTERNAL)


def _fail(args: argparse.Namespace, kind: str, message: object, code: int) -> int:
    if args.verbose:
        traceback.print_exc()
    print(f"qatgraph {args.command}: {kind}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
