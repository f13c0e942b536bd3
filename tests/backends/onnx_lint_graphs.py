"""Small ONNX graphs for the TensorRT-compliance linter tests (test_onnx_lint.py), built with ``onnx.helper``.

``GraphBuilder`` writes Q/DQ graphs the way qatgraph's exporter does; ``build_clean`` is a clean
graph (ResNet BasicBlock with downsample, a Concat, attention-like MatMuls); ``RULE_GRAPHS`` maps
every lint rule to a graph that triggers exactly that rule (``WARNING_RULES``: those that warn).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Tiny helper writing Q/DQ graphs the way qatgraph's exporter does."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.counter = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, array, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def input(self, name: str, shape: list[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, n_out: int = 1,
           **attrs) -> str:
        outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        node_name = self.fresh(op_type) if name is None else name
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, **attrs))
        return outputs[0]

    def qdq(self, tensor: str, scale: float = 0.05, zero_point=np.int8(0)) -> str:
        scale_name = self.const(np.float32(scale), "scale")
        zp_name = self.const(zero_point, "zp")
        quant = self.op("QuantizeLinear", [tensor, scale_name, zp_name])
        return self.op("DequantizeLinear", [quant, scale_name, zp_name])

    def weight(self, shape: list[int], axis: int = 0, n_scales: int | None = None) -> str:
        """INT8 initializer -> DequantizeLinear with per-channel scales on ``axis``."""
        rng = np.random.default_rng(self.counter)
        w_int8 = self.const(rng.integers(-127, 128, size=shape).astype(np.int8), "w")
        count = shape[axis] if n_scales is None else n_scales
        scales = self.const(np.full(count, 0.01, np.float32), "wscale")
        zps = self.const(np.zeros(count, np.int8), "wzp")
        return self.op("DequantizeLinear", [w_int8, scales, zps], axis=axis)

    def conv(self, x: str, cin: int, cout: int, k: int = 1, **attrs) -> str:
        bias = self.const(np.zeros(cout, np.float32), "b")
        return self.op("Conv", [x, self.weight([cout, cin, k, k]), bias], kernel_shape=[k, k],
                       **attrs)

    def model(self, opset: int = 17, output_shape: list[int] | None = None) -> onnx.ModelProto:
        outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, output_shape)
                   for o in self.outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# --- the clean graph ---------------------------------------------------------------------------
def build_clean() -> onnx.ModelProto:
    b = GraphBuilder()
    x_dq = b.qdq(b.input("x", [1, 16, 8, 8]), 0.02)
    # BasicBlock with downsample: the conv2 branch reaches the Add unquantized, the
    # downsample branch (the skip) is quantized.
    r1 = b.op("Relu", [b.conv(x_dq, 16, 32, k=3, strides=[2, 2], pads=[1, 1, 1, 1])])
    c2 = b.conv(b.qdq(r1), 32, 32, k=3, pads=[1, 1, 1, 1])
    down = b.conv(x_dq, 16, 32, strides=[2, 2])
    y1 = b.op("Relu", [b.op("Add", [c2, b.qdq(down)])])
    # Concat: inputs and output share one scale (0.03), values equal in separate initializers.
    y1_dq = b.qdq(y1)
    left, right = (b.op("Relu", [b.conv(y1_dq, 32, 16)]) for _ in range(2))
    cat = b.op("Concat", [b.qdq(left, 0.03), b.qdq(right, 0.03)], axis=1)
    r3 = b.op("Relu", [b.conv(b.qdq(cat, 0.03), 32, 32)])
    # Attention-like: projections with constant weights (axis 1), Q @ K^T, softmax @ V.
    shape = b.const(np.array([1, 32, 16], np.int64), "shape")
    tokens = b.op("Transpose", [b.op("Reshape", [r3, shape])], perm=[0, 2, 1])
    tokens_dq = b.qdq(tokens)
    query, key, value = (b.op("MatMul", [tokens_dq, b.weight([32, 32], axis=1)])
                         for _ in range(3))
    key_t = b.op("Transpose", [key], perm=[0, 2, 1])
    scores = b.op("MatMul", [b.qdq(query), b.qdq(key_t)])
    attn = b.op("Softmax", [scores], axis=-1)
    b.outputs.append(b.op("MatMul", [b.qdq(attn, 1 / 127), b.qdq(value)]))
    return b.model(output_shape=[1, 16, 32])


# --- one graph per rule ------------------------------------------------------------------------
def quantized_conv(b: GraphBuilder, x: str, cin: int = 16, cout: int = 16, **qdq) -> str:
    return b.conv(b.qdq(x, **qdq), cin, cout)


def g_opset():
    b = GraphBuilder()
    b.outputs.append(b.op("Relu", [b.input("x", [1, 4])]))
    return b.model(opset=11)


def g_unsupported_quant_op():
    b = GraphBuilder()
    b.outputs.append(b.op("DynamicQuantizeLinear", [b.input("x", [1, 4])], n_out=3))
    return b.model()


def g_batchnorm_left():
    b = GraphBuilder()
    stats = [b.const(np.ones(16, np.float32)) for _ in range(4)]
    b.outputs.append(b.op("BatchNormalization", [b.input("x", [1, 16, 4, 4]), *stats]))
    return b.model()


def g_weighted_input_unquantized():
    b = GraphBuilder()
    float_weight = b.const(np.ones((16, 16, 1, 1), np.float32), "w")
    b.outputs.append(b.op("Conv", [b.qdq(b.input("x", [1, 16, 4, 4])), float_weight]))
    return b.model()


def g_weighted_output_quantized():
    b = GraphBuilder()
    b.outputs.append(b.qdq(quantized_conv(b, b.input("x", [1, 16, 4, 4]))))
    return b.model()


def g_qdq_before_residual_add():
    b = GraphBuilder()
    x = b.input("x", [1, 16, 4, 4])
    b.outputs.append(b.op("Add", [b.qdq(quantized_conv(b, x)), x]))
    return b.model()


def g_residual_both_quantized():
    b = GraphBuilder()
    x_dq = b.qdq(b.input("x", [1, 16, 4, 4]))
    b.outputs.append(b.op("Add", [b.qdq(b.conv(x_dq, 16, 16)), x_dq]))
    return b.model()


def g_residual_skip_unquantized():
    b = GraphBuilder()
    x = b.input("x", [1, 16, 4, 4])
    b.outputs.append(b.op("Add", [quantized_conv(b, x), x]))
    return b.model()


def g_tensor_quantized_twice(second_scale: float = 0.07):
    b = GraphBuilder()
    x = b.input("x", [1, 16, 4, 4])
    b.outputs += [quantized_conv(b, x, scale=0.05), quantized_conv(b, x, scale=second_scale)]
    return b.model()


def g_concat_scale_mismatch():
    b = GraphBuilder()
    left, right = b.input("a", [1, 16, 4, 4]), b.input("b", [1, 16, 4, 4])
    b.outputs.append(b.op("Concat", [b.qdq(left, 0.02), b.qdq(right, 0.05)], axis=1))
    return b.model()


def g_nonzero_zero_point():
    b = GraphBuilder()
    b.outputs.append(quantized_conv(b, b.input("x", [1, 16, 4, 4]), zero_point=np.uint8(128)))
    return b.model()


def g_nonpositive_scale():
    b = GraphBuilder()
    b.outputs.append(quantized_conv(b, b.input("x", [1, 16, 4, 4]), scale=-0.1))
    return b.model()


def g_per_channel_axis():
    b = GraphBuilder()
    w_dq = b.weight([32, 16, 1, 1], axis=1)  # scales along input channels
    b.outputs.append(b.op("Conv", [b.qdq(b.input("x", [1, 16, 4, 4])), w_dq]))
    return b.model()


def g_tiny_layer_quantized():
    b = GraphBuilder()
    b.outputs.append(quantized_conv(b, b.input("x", [1, 16, 4, 4]), cin=16, cout=8))
    return b.model()


def g_weight_not_folded():
    b = GraphBuilder()
    float_weight = b.const(np.ones((16, 16, 1, 1), np.float32), "w")
    b.outputs.append(b.op("Conv", [b.qdq(b.input("x", [1, 16, 4, 4])), b.qdq(float_weight)]))
    return b.model()


RULE_GRAPHS = {
    "opset": g_opset,
    "unsupported-quant-op": g_unsupported_quant_op,
    "batchnorm-left": g_batchnorm_left,
    "weighted-input-unquantized": g_weighted_input_unquantized,
    "weighted-output-quantized": g_weighted_output_quantized,
    "qdq-before-residual-add": g_qdq_before_residual_add,
    "residual-both-quantized": g_residual_both_quantized,
    "residual-skip-unquantized": g_residual_skip_unquantized,
    "tensor-quantized-twice": g_tensor_quantized_twice,
    "concat-scale-mismatch": g_concat_scale_mismatch,
    "nonzero-zero-point": g_nonzero_zero_point,
    "nonpositive-scale": g_nonpositive_scale,
    "per-channel-axis": g_per_channel_axis,
    "tiny-layer-quantized": g_tiny_layer_quantized,
    "weight-not-folded": g_weight_not_folded,
}
WARNING_RULES = {"weighted-output-quantized", "residual-skip-unquantized",
                 "tiny-layer-quantized", "weight-not-folded"}
