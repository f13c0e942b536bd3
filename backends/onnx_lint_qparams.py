"""Lint rules about quantization parameters: shared tensors, Concat scales, zero points, scales.

* ``tensor-quantized-twice``: one tensor feeding several QuantizeLinear nodes.
* ``concat-scale-mismatch``: Concat inputs/output quantized with different scales.
* ``nonzero-zero-point``: zero points that are non-zero or of a type the target does not take
  (TensorRT: int8/int4/fp8 everywhere; ONNX Runtime: int8/int4, checked on weights only).
* ``nonpositive-scale``: scales that are zero, negative, NaN or infinite.

Same contract as the rules in ``qatgraph.backends.onnx_lint_rules`` (where :data:`RULES` and
:class:`Finding` live): each check reads a GraphIndex, never modifies the model, and yields
findings; ``qatgraph.backends.onnx_lint`` runs them.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx

from qatgraph.backends.onnx_graph import GraphIndex, attribute, format_values
from qatgraph.backends.onnx_lint_rules import Finding

# Zero-point element types TensorRT accepts (INT4 weights and FP8 exist since TensorRT 10).
_TRT_ZERO_POINT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4,
                         onnx.TensorProto.FLOAT8E4M3FN}
_ORT_WEIGHT_ZERO_POINT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4}


def _qdq_nodes(graph: GraphIndex) -> Iterator[onnx.NodeProto]:
    return (n for n in graph.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


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
