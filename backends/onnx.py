"""Export a calibrated QAT model to ONNX in Q/DQ format (explicit quantization) and lint it.

Expects a model from ``qatgraph.compile`` whose enabled quantizers are calibrated. Guarantees of
:func:`export_onnx`: the input model is untouched (a deep copy is exported, in eval mode, with
BatchNorm folded exactly, see ``onnx_qdq``); every enabled quantizer is one
``QuantizeLinear -> DequantizeLinear`` pair, every quantized weight an INT8 initializer feeding a
``DequantizeLinear`` (per channel on the output-channel axis), with no QLinear*/Integer op and no
float copy of a quantized weight (3.8x smaller than FP32 for resnet18_like/vgg_like; 2.2-2.6x for
mobilenetv2_like/vit_like, whose float stem, head and embeddings weigh more); dim 0 of every input and
output is the symbolic ``batch`` when ``dynamic_batch``; the file passes
``onnx.checker.check_model(full_check=True)`` and is linted against the policy's target. The file
is written atomically: the model goes to a temporary file in the destination directory, is
checked and linted there, and only then ``os.replace``-d onto ``path`` (``qatgraph.atomic_files``:
ordinary permissions, an overwritten file keeps its mode), so a failed export leaves no partial
file and never clobbers an existing one. Under ``torch.distributed`` only rank 0 exports, and the
other ranks return when the file is complete.

Exporter choice (measured with torch 2.13, onnxscript 0.7, onnx 1.23, onnxruntime 1.32). Each
quantizer is swapped for a module calling a ``torch.library`` custom op with one ONNX
translation per exporter (``onnx_qdq``). The dynamo exporter (``torch.export`` + onnxscript) is
used for opset >= 18, its native opset. It cannot produce opset 13-17: it emits opset 18 and
down-converts, and the converter fails on ordinary models (ReduceMean's axes input, measured on
resnet18_like: the C-API fallback either refuses or leaves opset-18 attributes the checker
rejects). So opsets 13-17 (17 is the default, the newest that older TensorRT parsers read) use
the deprecated TorchScript exporter, which emits them natively; it is also ~5x faster (0.6 s vs 3 s
per zoo model). ``torch.fake_quantize_*`` symbolics are not used: they accept only the ranges
(0, 127), (0, 255) and (-128, 127), and narrow-range weights [-127, 127] would be rejected.
Both exporters then go through the same ONNX clean-up (:mod:`.onnx_postprocess`, which also tags
each activation QuantizeLinear with its quantizer for the parity check) and checks. Neither can
put a Python ``if`` on tensor values into a graph: such a forward is refused, naming the line
(:mod:`.onnx_trace_checks`), unless ``allow_data_dependent_branches=True``. Plain modules (never
compiled) are refused; a compiled model with nothing quantized exports with a warning.
"""
from __future__ import annotations

import inspect
import io
import itertools
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from qatgraph.atomic_files import atomic_path, check_output_path
from qatgraph.backends import onnx_qdq
from qatgraph.backends.onnx_lint import TARGETS, Finding, format_findings
from qatgraph.backends.onnx_lint import lint as lint_model
from qatgraph.backends.onnx_postprocess import BATCH_DIM, postprocess
from qatgraph.backends.onnx_trace_checks import (
    Branch,
    ValueConditions,
    baked_branches_error,
    exporter_failure,
    recording_branches,
)
from qatgraph.distributed import run_on_main, unwrap
from qatgraph.errors import ExportError, QatgraphError, did_you_mean, warn
from qatgraph.graph.frontends import quiet_dynamo
from qatgraph.quant.calibrate import check_compiled

log = logging.getLogger(__name__)

BAKED_BRANCHES = "qatgraph.baked_branches"  # model metadata: data-dependent branches the export kept one side of
MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear's per-channel ``axis`` appeared in opset 13
DYNAMO_MIN_OPSET = 18
MAX_OPSET = 23
TORCHSCRIPT_MAX_OPSET = 20
EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote. ``num_qdq`` counts quantized tensors: one DequantizeLinear
    per activation Q/DQ pair and one per INT8 weight."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    num_nodes: int = 0
    num_qdq: int = 0
    size_bytes: int = 0
    opset: int = 0
    exporter: str = ""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity != "error"]

    def __str__(self) -> str:
        return (f"{self.path}: {self.num_nodes} nodes, {self.num_qdq} quantized tensors, "
                f"{self.size_bytes / 1024:.1f} KiB, opset {self.opset} ({self.exporter}); lint: "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")


def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_inputs: Any, opset: int = 17,
                dynamic_batch: bool = True, *, lint: bool = True, target: str | None = None,
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                check: bool = True, strict: bool = False, exporter: str = "auto",
                allow_data_dependent_branches: bool = False) -> ExportResult:
    """Export ``qmodel`` to ``path`` as a Q/DQ ONNX model and lint it (see the module docstring).

    ``example_inputs``: a tensor or a tuple of forward's tensor arguments. ``target``: lint rules
    (``tensorrt``/``onnxruntime``; default: the policy's target, ``onnxruntime`` rules for a
    ``generic`` policy). ``strict``: raise :class:`ExportError` (writing nothing) when lint
    reports errors. ``exporter``: ``auto`` (dynamo for opset >= 18, TorchScript below),
    ``dynamo`` or ``torchscript``. A ``forward`` that branches on tensor values (``if x.sum() > 0:``)
    is refused, naming the line and module: ONNX would keep only the branch the example took.
    ``allow_data_dependent_branches=True`` exports it anyway, with a warning, recording the
    branches in the file's metadata (``qatgraph.baked_branches``, which check_parity reports).

    Under ``torch.distributed`` (:mod:`qatgraph.distributed`) rank 0 exports while the other
    ranks wait; every rank returns the same :class:`ExportResult` (or raises the same error) once
    the file is complete. Call it on every rank, or inside ``qatgraph.distributed.this_rank_only()``.
    """
    return run_on_main(lambda: _export(qmodel, path, example_inputs, opset, dynamic_batch, lint, target, input_names,
                                       output_names, check, strict, exporter, allow_data_dependent_branches),
                       f"exporting {os.fspath(path)!r}")


def _export(qmodel: nn.Module, path: str | os.PathLike, example_inputs: Any, opset: int, dynamic_batch: bool,
            lint: bool, target: str | None, input_names: list[str] | None, output_names: list[str] | None,
            check: bool, strict: bool, exporter: str, allow_branches: bool) -> ExportResult:
    exporter = _choose_exporter(exporter, opset)
    check_output_path(path, "ONNX model")  # before the slow part: a directory or bad parent fails now
    qmodel = unwrap(qmodel)  # DDP/DataParallel only scatter batches, and torch.onnx.export rejects them
    check_compiled(qmodel, "export_onnx")
    args = _as_args(example_inputs)
    target = target or _policy_target(qmodel)
    if target not in TARGETS:
        raise ExportError(f"unknown lint target {target!r}{did_you_mean(target, TARGETS)}; use one of {', '.join(TARGETS)}")
    tensor = next(itertools.chain(qmodel.parameters(), qmodel.buffers()), None)
    args = tuple(a.to(tensor.device) for a in args) if tensor is not None else args
    module, folded = onnx_qdq.prepare_for_export(qmodel, opset, args)
    if folded:
        log.info("qatgraph export: folded %d BatchNorm layer(s) into their conv/linear", len(folded))
    input_names = input_names or _default_input_names(qmodel, len(args))
    model, branches = _run_exporter(exporter, module, args, opset, dynamic_batch, input_names, output_names)
    _check_branches(model, branches, allow_branches)
    postprocess(model, dynamic_batch)
    if not any(node.op_type == "QuantizeLinear" for node in model.graph.node):
        warn(f"export_onnx: {os.fspath(path)!r} has no activation QuantizeLinear: no layer of the model is quantized "
             "(see qatgraph.summary for why), so the file is a floating-point model.")
    findings = _write_atomically(model, os.fspath(path), check, target if lint else None, strict)
    num_qdq = sum(node.op_type == "DequantizeLinear" for node in model.graph.node)
    result = ExportResult(os.fspath(path), findings, len(model.graph.node), num_qdq, os.path.getsize(path), opset,
                          exporter)
    log.info("qatgraph export: %s", result)
    return result


# ---------------------------------------------------------------------------- arguments
def _choose_exporter(exporter: str, opset: int) -> str:
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset {opset!r} is too old: per-channel weight quantization needs the axis attribute of "
                          f"QuantizeLinear/DequantizeLinear, added in opset {MIN_OPSET}. Use opset >= {MIN_OPSET} "
                          "(17 is the default).")
    if opset > MAX_OPSET:
        raise ExportError(f"opset {opset} is newer than this exporter supports ({MAX_OPSET}); use opset <= {MAX_OPSET}")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}{did_you_mean(exporter, EXPORTERS)}; "
                          f"use one of {', '.join(EXPORTERS)}")
    if exporter == "auto":
        return "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"the dynamo exporter emits opset {DYNAMO_MIN_OPSET}+ and cannot down-convert reliably to "
                          f"opset {opset}; use exporter='torchscript' (or 'auto') for opset {opset}")
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise ExportError(f"the TorchScript exporter stops at opset {TORCHSCRIPT_MAX_OPSET}; use exporter='dynamo' "
                          f"(or 'auto') for opset {opset}")
    return exporter


def _as_args(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and \
            all(isinstance(a, torch.Tensor) for a in example_inputs):
        return tuple(example_inputs)
    raise ExportError("example_inputs must be a tensor or a non-empty tuple of tensors (forward's positional "
                      f"arguments), not {type(example_inputs).__name__}")


def _policy_target(qmodel: nn.Module) -> str:
    info = getattr(qmodel, "qatgraph_info", None)
    target = getattr(getattr(info, "policy", None), "target", "tensorrt")
    return target if target in ("tensorrt", "onnxruntime") else "onnxruntime"


def _default_input_names(qmodel: nn.Module, count: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(qmodel.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= count:
        return [p.name for p in params[:count]]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


# ---------------------------------------------------------------------------- exporters
def _run_exporter(exporter: str, module: nn.Module, args: tuple, opset: int, dynamic_batch: bool,
                  input_names: list[str], output_names: list[str] | None) -> tuple[onnx.ModelProto, list[Branch]]:
    """(ONNX model, data-dependent branches the tracer kept only one side of)."""
    try:
        with torch.no_grad(), ValueConditions() as conditions:  # also proves the module runs before an exporter
            outputs = tree_leaves(module(*args))
    except QatgraphError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failing on the user's example inputs
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise ExportError(f"running the model on example_inputs of shape {shapes} failed before export: "
                          f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. "
                          "Pass example inputs of the shape the model was compiled and calibrated with.") from None
    output_names = output_names or (["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    try:
        if exporter == "dynamo":
            with quiet_dynamo():
                return _export_dynamo(module, args, opset, dynamic_batch, input_names, output_names), []
        with recording_branches(module, conditions.lines) as branches:
            model = _export_torchscript(module, args, opset, dynamic_batch, input_names, output_names)
        return model, branches
    except Exception as exc:  # noqa: BLE001 - the exporters raise anything; each is summarized in one paragraph
        raise exporter_failure(exc, exporter, opset, module) from None


def _check_branches(model: onnx.ModelProto, branches: list[Branch], allowed: bool) -> None:
    if not branches:
        return
    if not allowed:
        raise baked_branches_error(branches)
    warn("export_onnx: the ONNX graph keeps only the branch the example inputs took at "
         + "; ".join(str(b) for b in branches) + ". Inputs that take another branch compute something else in "
         "ONNX Runtime and TensorRT: check parity on inputs from every branch.")
    entry = model.metadata_props.add()
    entry.key, entry.value = BAKED_BRANCHES, json.dumps([str(b) for b in branches])


def _export_dynamo(module: nn.Module, args: tuple, opset: int, dynamic_batch: bool, input_names: list[str],
                   output_names: list[str]) -> onnx.ModelProto:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim(BATCH_DIM)
        # torch.export specializes dimensions of size 1; trace with two samples instead.
        args = tuple(torch.cat([a, a]) if a.dim() and a.shape[0] == 1 else a for a in args)
        dynamic_shapes = tuple({0: batch} if a.dim() else None for a in args)
    with warnings.catch_warnings():  # torch 2.13's own pytree deprecation, raised inside torch.export
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=True,
                                    custom_translation_table=onnx_qdq.dynamo_translations(opset), verbose=False)
    return program.model_proto


def _export_torchscript(module: nn.Module, args: tuple, opset: int, dynamic_batch: bool, input_names: list[str],
                        output_names: list[str]) -> onnx.ModelProto:
    onnx_qdq.register_torchscript_symbolics()
    dynamic_axes = {name: {0: BATCH_DIM} for name in input_names + output_names} if dynamic_batch else None
    buffer = io.BytesIO()
    # the exporter's DeprecationWarning (chosen on purpose below opset 18, see the module doc) is dropped by
    # onnx_trace_checks.recording_branches, which wraps this call
    torch.onnx.export(module, args, buffer, dynamo=False, opset_version=opset, input_names=input_names,
                      output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


# ---------------------------------------------------------------------------- writing
def _write_atomically(model: onnx.ModelProto, path: str, check: bool, target: str | None,
                      strict: bool) -> list[Finding]:
    with atomic_path(path, "ONNX model") as temporary:
        onnx.save(model, temporary)
        if check:
            try:
                onnx.checker.check_model(temporary, full_check=True)
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"the exported model fails onnx.checker (nothing written to {path!r}): {exc}") from exc
        findings = lint_model(model, target) if target is not None else []
        _report_findings(findings, path, target, strict)
    return findings


def _report_findings(findings: list[Finding], path: str, target: str | None, strict: bool) -> None:
    errors = [f for f in findings if f.severity == "error"]
    if findings:
        log.warning("qatgraph export: lint(%s) of %s: %d error(s), %d warning(s)\n%s", target, path, len(errors),
                    len(findings) - len(errors), format_findings(findings))
    if strict and errors:
        raise ExportError(f"strict export of {path!r}: lint({target}) found {len(errors)} error(s), nothing was "
                          f"written:\n{format_findings(errors)}")
