"""The Q/DQ linter's rule table, its Finding type, and the rules about graph structure.

:data:`RULES` maps every rule id to a one-line description (the quantization-parameter rules
included); :class:`Finding` is what each violation yields. The checks here read where Q/DQ
nodes sit: model- and op-level rules (opset, QOperator ops, BatchNormalization), the inputs,
outputs, weight axes and sizes of weighted ops, and residual adds. Each check takes a
:class:`~qatgraph.backends.onnx_graph.GraphIndex` and the target and yields findings without
modifying the model. The rules on scale and zero-point values are in
``qatgraph.backends.onnx_lint_qparams``; ``qatgraph.backends.onnx_lint`` runs them all and
re-exports ``RULES`` and ``Finding``.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from qatgraph.backends.onnx_graph import WEIGHTED_OPS, GraphIndex, attribute

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
