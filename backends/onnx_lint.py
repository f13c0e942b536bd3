"""Lint an exported ONNX Q/DQ model against TensorRT's explicit-quantization rules.

Expects: an ``onnx.ModelProto`` or a path to an ``.onnx`` file in QDQ format (opset >= 13):
activations ``x -> QuantizeLinear -> DequantizeLinear -> Conv/Gemm/MatMul/ConvTranspose`` and
weights ``INT8 initializer -> DequantizeLinear(axis=output channels) -> op``. Scales and zero
points may be initializers or ``Constant`` nodes. A DequantizeLinear must feed the op
directly (no Identity/Reshape in between).

Guarantees: ``lint`` never modifies the model and never runs ``onnx.checker`` (the exporter
does). It returns one :class:`Finding` per violation, naming the node (``node.name`` or a
stable ``op_type#index``), the concrete values involved and what to change. Rule ids and
one-line descriptions are in :data:`RULES`; the rationale is DESIGN.md's "TensorRT
explicit-quantization rules". Target ``onnxruntime`` applies the same rules except that
activations may use uint8 / non-zero zero points, tiny layers are not reported, and the residual-add
rules (TensorRT's conv+add fusion) do not apply: ONNX Runtime fuses an Add whose inputs are both
quantized into QLinearAdd.

The rule table and :class:`Finding` are in ``qatgraph.backends.onnx_lint_rules`` (with the rules
on graph structure), the rules on scales and zero points in ``qatgraph.backends.onnx_lint_qparams``;
both names are importable from here.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

import onnx

from qatgraph.backends.onnx_graph import GraphIndex, load_onnx
from qatgraph.backends.onnx_lint_qparams import (
    _check_concat,
    _check_quantized_twice,
    _check_scales,
    _check_zero_points,
)
from qatgraph.backends.onnx_lint_rules import RULES as RULES
from qatgraph.backends.onnx_lint_rules import (
    Finding,
    _check_batchnorm,
    _check_opset,
    _check_residual_adds,
    _check_tiny_layers,
    _check_unsupported_ops,
    _check_weight_axis,
    _check_weight_not_folded,
    _check_weighted_inputs,
    _check_weighted_outputs,
)
from qatgraph.errors import ExportError, did_you_mean, listing

logger = logging.getLogger(__name__)

TARGETS = ("tensorrt", "onnxruntime")


def lint(model: onnx.ModelProto | str | os.PathLike, target: str = "tensorrt") -> list[Finding]:
    """Check an exported Q/DQ model against the ``target`` backend's rules (see RULES)."""
    if target not in TARGETS:
        raise ExportError(f"lint: unknown target {target!r}{did_you_mean(target, TARGETS)}; "
                          f"valid targets are {listing(TARGETS)}.")
    if not isinstance(model, onnx.ModelProto):
        model = _load(model)
    graph = GraphIndex.build(model)
    findings = [finding for check in _CHECKS for finding in check(graph, target)]
    logger.debug("lint(%s): %d nodes, %d findings", target, len(graph.nodes), len(findings))
    return findings


def format_findings(findings: Iterable[Finding]) -> str:
    """One line per finding, ``[rule] node: message -- fix``; empty string when none."""
    return "\n".join(f"[{f.rule}] {f.node}: {f.message} -- {f.fix}" for f in findings)


def _load(path: str | os.PathLike) -> onnx.ModelProto:
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"lint: expected an onnx.ModelProto or a path to an .onnx file, "
                          f"got {type(path).__name__}.")
    if not os.path.isfile(path):
        raise ExportError(f"lint: ONNX file {os.fspath(path)!r} does not exist; "
                          f"pass the path written by qatgraph's export.")
    return load_onnx(path)


_CHECKS: list[Callable[[GraphIndex, str], Iterable[Finding]]] = [
    _check_opset, _check_unsupported_ops, _check_batchnorm, _check_weighted_inputs,
    _check_weighted_outputs, _check_residual_adds, _check_quantized_twice, _check_concat,
    _check_zero_points, _check_scales, _check_weight_axis, _check_tiny_layers,
    _check_weight_not_folded,
]
