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
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from qatgraph.backends.onnx_graph import WEIGHTED_OPS, GraphIndex, attribute, format_values
from qatgraph.errors import ExportError, did_you_mean, listing

logger = logging.getLogger(__name__)

TARGETS = ("tensorrt", "onnxruntime")

RULES: dict[str, str] = {
    "opset": "default-domain opset is below 13 (per-channel Q/DQ needs opset >= 13)",
    "unsupported-quant-op": "QOperator op (QLinear*, *Integer, DynamicQuantizeLinear), not Q/DQ",
    "batchnorm-left": "BatchNormalization left in the graph (fold BN at export)",
    "weighted-input-unquantized": "Conv/Gemm/MatMul with some inputs quantized and others not",
    "weighted-output-quantized": "Q/DQ on a weighted op's output that no quantized op consumes",
    "qdq-before-residual-add": "Q/DQ between a conv/gemm branch and the Add it should fuse into",
    "residual-both-quantized": "residual Add with both inputs quantized (quantize only the skip)",
    "residual-skip-unquantized": "residual Add whose skip input is not quantized (no INT8 fusion)",
    "tensor-quantized-twice": "one tensor feeding several QuantizeLinear nodes (share one Q/DQ)",
    "concat-scale-mismatch": "Concat inputs/output quantized with different scales",
    "nonzero-zero-point": "zero point that is non-zero or not signed int8 (TensorRT is symmetric)",
    "nonpositive-scale": "Q/DQ scale that is zero, negative, NaN or infinite",
    "per-channel-axis": "per-channel weight scales on the wrong axis or of the wrong length",
    "tiny-layer-quantized": "quantized layer with fewer than 16 channels (usually faster in FP16)",
    "weight-not-folded": "float weight quantized at run time instead of stored as INT8",
}

# Zero-point element types TensorRT accepts (INT4 weights and FP8 exist since TensorRT 10).
_TRT_ZERO_POINT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4,
                         onnx.TensorProto.FLOAT8E4M3FN}
_ORT_WEIGHT_ZERO_POINT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4}
_TINY_CHANNELS = 16
# Ops a quantized tensor passes through unchanged in INT8 (TensorRT propagates Q/DQ across
# them), used to decide whether a Q/DQ on a weighted op's output reaches a quantized consumer.
_INT8_PASSTHROUGH = {"QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose", "Flatten",
                     "Squeeze", "Unsqueeze", "MaxPool", "Identity", "Slice", "Split", "Concat",
                     "Pad", "Gather", "Expand", "Tile", "Resize"}
_SLOT_NAMES = {0: "input", 1: "weight"}


@dataclass(frozen=True)
class Finding:
    """One rule violation: ``rule`` (a key of RULES), the offending ``node``, what is wrong
    (``message``, with the values), how to fix it (``fix``) and ``severity`` error|warning."""

    rule: str
    node: str
    message: str
    fix: str
    severity: str = "error"


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
    return onnx.load(os.fspath(path))


def _qdq_nodes(graph: GraphIndex) -> Iterator[onnx.NodeProto]:
    return (n for n in graph.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


# --- model-level and op-level rules -----------------------------------------------------------
def _check_opset(graph: GraphIndex, target: str) -> Iterator[Finding]:
    version = graph.default_opset()
    if version is not None and version < 13:
        yield Finding("opset", "model", f"default-domain opset is {version}; per-channel "
                      "QuantizeLinear/DequantizeLinear (axis) needs opset >= 13",
                      "export again with opset_version >= 13 (17 or newer recommended)")


def _check_unsupported_ops(graph: GraphIndex, target: str) -> Iterator[Finding]:
    for node, label in zip(graph.nodes, graph.labels):
        op = node.op_type
        if op.startswith("QLinear") or op.endswith("Integer") or op == "DynamicQuantizeLinear":
            yield Finding("unsupported-quant-op", label,
                          f"{op} is an integer (QOperator) op; {target} explicit quantization "
                          "only reads QuantizeLinear/DequantizeLinear pairs",
                          "export in QDQ format (fake quantizers become Q/DQ pairs) and do not "
                          "convert the model with onnxruntime.quantization's QOperator format")


def _check_batchnorm(graph: GraphIndex, target: str) -> Iterator[Finding]:
    for node, label in zip(graph.nodes, graph.labels):
        if node.op_type == "BatchNormalization":
            yield Finding("batchnorm-left", label, "BatchNormalization is still in the graph; "
                          "its conv's weight scales then do not describe the deployed weights",
                          "fold BN into the preceding Conv/Gemm before export (the fuse pass); "
                          "with per-channel weight scales the fold only rescales each channel")


# --- weighted ops ------------------------------------------------------------------------------
def _present_slots(node: onnx.NodeProto) -> list[int]:
    return [s for s in WEIGHTED_OPS[node.op_type] if s < len(node.input) and node.input[s]]


def _check_weighted_inputs(graph: GraphIndex, target: str) -> Iterator[Finding]:
    for node, label in zip(graph.nodes, graph.labels):
        if node.op_type not in WEIGHTED_OPS:
            continue
        slots = _present_slots(node)
        quantized = [s for s in slots if graph.produced_by(node.input[s], "DequantizeLinear")]
        # No quantized input at all is a deliberate float layer (a skip): legitimate.
        if quantized and len(quantized) < len(slots):
            missing = [s for s in slots if s not in quantized]
            names = ", ".join(f"{_SLOT_NAMES[s]} {node.input[s]!r}" for s in missing)
            yield Finding("weighted-input-unquantized", label,
                          f"{node.op_type} has quantized and unquantized inputs; not quantized: "
                          f"{names}", "quantize every input of this op in the policy, or skip "
                          "the layer entirely so that it runs in FP16")


def _reaches_fusable_consumer(graph: GraphIndex, quant: onnx.NodeProto) -> bool:
    """True if some path from ``quant`` through INT8 pass-through ops reaches a weighted op
    (an INT8 input) or an Add (judged by the residual rules instead)."""
    pending, seen = [quant.output[0]], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for consumer in graph.consumers_of(tensor):
            if consumer.op_type in WEIGHTED_OPS or consumer.op_type == "Add":
                return True
            if consumer.op_type in _INT8_PASSTHROUGH:
                pending.extend(out for out in consumer.output if out)
    return False


def _check_weighted_outputs(graph: GraphIndex, target: str) -> Iterator[Finding]:
    for node, label in zip(graph.nodes, graph.labels):
        if node.op_type != "QuantizeLinear":
            continue
        head = graph.producer_of(node.input[0])
        if head is None or head.op_type not in WEIGHTED_OPS:
            continue
        if not _reaches_fusable_consumer(graph, node):
            yield Finding("weighted-output-quantized", label,
                          f"output {node.input[0]!r} of {head.op_type} {graph.label(head)} is "
                          "quantized but no quantized op consumes it; TensorRT cannot fuse this "
                          "Q/DQ and runs an extra INT8 round trip",
                          "remove the output quantizer of this op (quantize outputs only where "
                          "the consumer is a quantized op)", "warning")


def _output_channel_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1
    return 0  # Conv


def _check_weight_axis(graph: GraphIndex, target: str) -> Iterator[Finding]:
    for node, label in zip(graph.nodes, graph.labels):
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        dq = graph.produced_by(node.input[1], "DequantizeLinear")
        source = graph.dq_source_constant(dq) if dq is not None else None
        scale_shape = graph.constants.shape(dq.input[1]) if source is not None else None
        if scale_shape is None or int(np.prod(scale_shape)) <= 1 or attribute(dq, "block_size", 0):
            continue  # not a constant weight, per-tensor, or blocked (INT4) quantization
        weight_shape = graph.constants.shape(source)
        rank = len(weight_shape)
        axis = attribute(dq, "axis", 1)  # ONNX default axis is 1
        expected = _output_channel_axis(node, rank)
        scale_count = int(np.prod(scale_shape))
        if not -rank <= axis < rank or axis % rank != expected:
            message = (f"weight {source!r} {weight_shape} has per-channel scales on axis {axis}, "
                       f"but the output channels of {node.op_type} are axis {expected}")
        elif scale_count != weight_shape[expected]:
            message = (f"weight {source!r} {weight_shape} has {scale_count} scales but "
                       f"{weight_shape[expected]} output channels (axis {expected})")
        else:
            continue
        yield Finding("per-channel-axis", graph.label(dq), message,
                      f"export the weight quantizer of {label} per output channel: axis "
                      f"{expected}, one scale per channel")


def _layer_channels(graph: GraphIndex, node: onnx.NodeProto) -> tuple[int, int] | None:
    """(input channels or K, output channels or N) from the constant weight's shape."""
    dq = graph.produced_by(node.input[1], "DequantizeLinear")
    source = graph.dq_source_constant(dq) if dq is not None else None
    shape = graph.constants.shape(source) if source is not None else None
    if shape is None or len(shape) < 2:
        return None
    group = attribute(node, "group", 1)
    if node.op_type == "Conv":
        return shape[1] * group, shape[0]
    if node.op_type == "ConvTranspose":
        return shape[0], shape[1] * group
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        return shape[1], shape[0]
    return shape[-2], shape[-1]  # Gemm transB=0, MatMul: (K, N)


def _check_tiny_layers(graph: GraphIndex, target: str) -> Iterator[Finding]:
    if target != "tensorrt":
        return
    for node, label in zip(graph.nodes, graph.labels):
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        slots = _present_slots(node)
        if not all(graph.produced_by(node.input[s], "DequantizeLinear") for s in slots):
            continue
        channels = _layer_channels(graph, node)
        if channels is not None and min(channels) < _TINY_CHANNELS:
            yield Finding("tiny-layer-quantized", label,
                          f"{node.op_type} is quantized with only {channels[0]} input and "
                          f"{channels[1]} output channels (< {_TINY_CHANNELS}); INT8 kernels "
                          "rarely beat FP16 here and the Q/DQ costs extra", "skip this layer in "
                          "the policy so that it stays in FP16", "warning")


def _check_weight_not_folded(graph: GraphIndex, target: str) -> Iterator[Finding]:
    for node, label in zip(graph.nodes, graph.labels):
        if node.op_type == "QuantizeLinear" and graph.is_constant(node.input[0]):
            yield Finding("weight-not-folded", label,
                          f"constant {node.input[0]!r} is stored in float and quantized at run "
                          "time", "export weights as INT8 initializers feeding "
                          "DequantizeLinear directly (a 4x smaller file)", "warning")


# --- residual adds -----------------------------------------------------------------------------
def _add_input_kind(graph: GraphIndex, tensor: str) -> str:
    """'weighted', 'quantized-weighted' (weighted -> Q -> DQ), 'quantized' or 'other'."""
    if graph.weighted_chain_head(tensor) is not None:
        return "weighted"
    dq = graph.produced_by(tensor, "DequantizeLinear")
    if dq is None:
        return "other"
    quant = graph.produced_by(dq.input[0], "QuantizeLinear")
    if quant is not None and graph.weighted_chain_head(quant.input[0]) is not None:
        return "quantized-weighted"
    return "quantized"


def _check_residual_adds(graph: GraphIndex, target: str) -> Iterator[Finding]:
    if target != "tensorrt":
        return  # conv+add fusion is TensorRT's; ONNX Runtime wants both inputs quantized (QLinearAdd)
    for node, label in zip(graph.nodes, graph.labels):
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        if any(graph.is_constant(t) for t in node.input):
            continue  # a bias add, not a residual
        kinds = [_add_input_kind(graph, t) for t in node.input]
        if not {"weighted", "quantized-weighted"} & set(kinds):
            continue  # not fed by a weighted op: not a fusable residual add
        quantized = [k.startswith("quantized") for k in kinds]
        inputs = f"inputs {node.input[0]!r} ({kinds[0]}) and {node.input[1]!r} ({kinds[1]})"
        if all(quantized):
            yield Finding("residual-both-quantized", label, f"both {inputs} are quantized",
                          "quantize only the skip input; the conv branch must reach the Add "
                          "unquantized so that TensorRT fuses the Add into the conv")
        elif "quantized-weighted" in kinds and "other" in kinds:
            yield Finding("qdq-before-residual-add", label, f"{inputs}: the weighted branch "
                          "is quantized before the Add and the skip is not, so TensorRT cannot "
                          "fuse the Add into the conv", "move the Q/DQ from the weighted branch "
                          "to the skip input of the Add (residual pass)")
        elif not any(quantized):
            yield Finding("residual-skip-unquantized", label, f"{inputs}: no input is quantized, "
                          "so the conv+add runs without an INT8 residual", "quantize the skip "
                          "input of this Add (residual pass)", "warning")


# --- quantization parameters -------------------------------------------------------------------
def _check_quantized_twice(graph: GraphIndex, target: str) -> Iterator[Finding]:
    quants_by_tensor: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.nodes:
        if node.op_type == "QuantizeLinear":
            quants_by_tensor[node.input[0]].append(node)
    for tensor, quants in quants_by_tensor.items():
        first = quants[0]
        for other in quants[1:]:
            same = (graph.same_qdq_param(first, other, 1) and graph.same_qdq_param(first, other, 2)
                    and attribute(first, "axis", 1) == attribute(other, "axis", 1))
            where = f"tensor {tensor!r} is also quantized by {graph.label(first)}"
            if same:
                yield Finding("tensor-quantized-twice", graph.label(other),
                              f"{where} with the same scale: duplicate Q/DQ, share one",
                              "export one Q/DQ per tensor and let all consumers share it",
                              "warning")
            else:
                yield Finding("tensor-quantized-twice", graph.label(other),
                              f"{where} with a different scale/zero point: scale "
                              f"{format_values(graph.qdq_param(other, 1))} vs "
                              f"{format_values(graph.qdq_param(first, 1))}",
                              "give the tensor a single quantizer shared by all its consumers "
                              "(one Q/DQ per tensor)")


def _check_concat(graph: GraphIndex, target: str) -> Iterator[Finding]:
    fix = "share one activation quantizer across the Concat's inputs and output"
    for node, label in zip(graph.nodes, graph.labels):
        if node.op_type != "Concat":
            continue
        dqs = [dq for t in node.input if (dq := graph.produced_by(t, "DequantizeLinear"))]
        if not dqs:
            continue
        first = dqs[0]
        odd = [dq for dq in dqs[1:] if not graph.same_qdq_param(first, dq, 1)]
        if odd:
            scales = ", ".join(format_values(graph.qdq_param(dq, 1)) for dq in dqs)
            yield Finding("concat-scale-mismatch", label,
                          f"inputs are dequantized with different scales: {scales}", fix)
        for consumer in graph.consumers_of(node.output[0]):
            requantized = consumer.op_type == "QuantizeLinear"
            if requantized and not graph.same_qdq_param(first, consumer, 1):
                yield Finding("concat-scale-mismatch", label,
                              f"output is re-quantized by {graph.label(consumer)} with scale "
                              f"{format_values(graph.qdq_param(consumer, 1))} but the inputs use "
                              f"{format_values(graph.qdq_param(first, 1))}", fix)


def _zero_point_problem(graph: GraphIndex, node: onnx.NodeProto, allowed: set[int]) -> str | None:
    zero_point = node.input[2] if len(node.input) > 2 else ""
    type_name = onnx.TensorProto.DataType.Name
    if zero_point:
        dtype = graph.constants.dtype(zero_point)
        if dtype is None:
            return None  # computed at run time: cannot be checked statically
        if dtype not in allowed:
            return f"zero point {zero_point!r} has type {type_name(dtype)}"
        value = graph.constants.array(zero_point)
        if value is not None and np.any(value.astype(np.float64) != 0):
            return f"zero point {zero_point!r} is {format_values(value)}, not 0 (asymmetric)"
        return None
    if node.op_type == "QuantizeLinear":
        output_dtype = attribute(node, "output_dtype", 0)
        if output_dtype == 0:
            return "no zero point, so ONNX makes the QuantizeLinear output uint8"
        return None if output_dtype in allowed else f"output_dtype is {type_name(output_dtype)}"
    dtype = graph.constants.dtype(node.input[0])  # DQ without zero point: its input's type
    if dtype is not None and dtype not in allowed:
        return f"input {node.input[0]!r} has type {type_name(dtype)}"
    return None


def _check_zero_points(graph: GraphIndex, target: str) -> Iterator[Finding]:
    for node in _qdq_nodes(graph):
        is_weight = graph.is_weight_qdq(node)
        if target == "onnxruntime" and not is_weight:
            continue  # ONNX Runtime's U8S8 format: uint8 asymmetric activations are fine
        allowed = _TRT_ZERO_POINT_TYPES if target == "tensorrt" else _ORT_WEIGHT_ZERO_POINT_TYPES
        problem = _zero_point_problem(graph, node, allowed)
        if problem:
            kind = "weight" if is_weight else "activation"
            yield Finding("nonzero-zero-point", graph.label(node),
                          f"{problem}; {target} needs symmetric signed {kind} quantization",
                          "use the symmetric signed format (int8 zero point 0), e.g. the "
                          f"'{target}' policy preset")


def _check_scales(graph: GraphIndex, target: str) -> Iterator[Finding]:
    for node in _qdq_nodes(graph):
        scale = graph.qdq_param(node, 1)
        if scale is None:
            continue
        values = scale.astype(np.float64).reshape(-1)
        bad = values[~(np.isfinite(values) & (values > 0))]
        if bad.size:
            yield Finding("nonpositive-scale", graph.label(node),
                          f"scale {node.input[1]!r} has {bad.size} invalid value(s) "
                          f"(zero, negative or non-finite): {format_values(bad)}",
                          "recalibrate (an all-zero calibration tensor gives scale 0) and "
                          "clamp scales to a small positive minimum in the quantizer")


_CHECKS: list[Callable[[GraphIndex, str], Iterable[Finding]]] = [
    _check_opset, _check_unsupported_ops, _check_batchnorm, _check_weighted_inputs,
    _check_weighted_outputs, _check_residual_adds, _check_quantized_twice, _check_concat,
    _check_zero_points, _check_scales, _check_weight_axis, _check_tiny_layers,
    _check_weight_not_folded,
]
