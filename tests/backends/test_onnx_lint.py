"""Tests of the TensorRT-compliance linter (qatgraph.backends.onnx_lint).

Every rule has one small graph, built with ``onnx.helper``, that triggers exactly that rule;
a clean graph (ResNet BasicBlock with downsample, a Concat, attention-like MatMuls) must give
no findings and must also be a valid model that ONNX Runtime can run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qatgraph.backends.onnx_lint import RULES, Finding, format_findings, lint
from qatgraph.errors import ExportError


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


def rule_ids(findings: list[Finding]) -> set[str]:
    return {f.rule for f in findings}


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


def test_clean_graph_has_no_findings():
    model = build_clean()
    onnx.checker.check_model(model, full_check=True)
    assert lint(model) == []
    assert lint(model, target="onnxruntime") == []


def test_clean_graph_runs_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(build_clean().SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    (out,) = session.run(None, {"x": x})
    assert out.shape == (1, 16, 32) and np.isfinite(out).all()


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


def test_every_rule_has_a_triggering_graph():
    assert set(RULE_GRAPHS) == set(RULES)


@pytest.mark.parametrize("rule", sorted(RULE_GRAPHS))
def test_rule_graph_triggers_exactly_its_rule(rule):
    findings = lint(RULE_GRAPHS[rule]())
    assert rule_ids(findings) == {rule}, format_findings(findings)
    expected = "warning" if rule in WARNING_RULES else "error"
    assert {f.severity for f in findings} == {expected}
    assert all(f.node and f.message and f.fix for f in findings)


# --- rule details ------------------------------------------------------------------------------
@pytest.mark.parametrize("op_type", ["QLinearConv", "QLinearMatMul", "ConvInteger",
                                     "MatMulInteger", "QLinearAdd"])
def test_every_qoperator_op_is_unsupported(op_type):
    b = GraphBuilder()
    b.outputs.append(b.op(op_type, [b.input("x", [1, 4])], name="qop"))
    findings = lint(b.model())
    assert [(f.rule, f.node) for f in findings] == [("unsupported-quant-op", "qop")]


def test_messages_carry_the_concrete_scales():
    (finding,) = lint(g_concat_scale_mismatch())
    assert "0.02" in finding.message and "0.05" in finding.message
    (finding,) = lint(g_tensor_quantized_twice())
    assert "0.07" in finding.message and "0.05" in finding.message


def test_same_scale_quantized_twice_is_a_duplicate_warning():
    (finding,) = lint(g_tensor_quantized_twice(second_scale=0.05))
    assert finding.rule == "tensor-quantized-twice" and finding.severity == "warning"
    assert "duplicate Q/DQ, share one" in finding.message


def test_concat_output_requantized_with_other_scale():
    b = GraphBuilder()
    left, right = b.input("a", [1, 16, 4, 4]), b.input("b", [1, 16, 4, 4])
    cat = b.op("Concat", [b.qdq(left, 0.02), b.qdq(right, 0.02)], axis=1, name="cat")
    b.outputs.append(b.op("Relu", [b.qdq(cat, 0.09)]))
    findings = lint(b.model())
    assert [(f.rule, f.node) for f in findings] == [("concat-scale-mismatch", "cat")]
    assert "0.09" in findings[0].message


def test_scale_length_must_match_output_channels():
    b = GraphBuilder()
    w_dq = b.weight([32, 16, 1, 1], axis=0, n_scales=8)
    b.outputs.append(b.op("Conv", [b.qdq(b.input("x", [1, 16, 4, 4])), w_dq]))
    (finding,) = lint(b.model())
    assert finding.rule == "per-channel-axis" and "8 scales" in finding.message


@pytest.mark.parametrize("op_type, attrs, weight_shape, axis, ok", [
    ("Gemm", {"transB": 1}, [32, 16], 0, True),
    ("Gemm", {"transB": 1}, [32, 16], 1, False),
    ("Gemm", {}, [16, 32], 1, True),
    ("Gemm", {}, [16, 32], 0, False),
    ("MatMul", {}, [16, 32], 1, True),
    ("MatMul", {}, [16, 32], -1, True),
    ("MatMul", {}, [16, 32], 0, False),
    ("ConvTranspose", {"kernel_shape": [1, 1]}, [16, 32, 1, 1], 1, True),
    ("ConvTranspose", {"kernel_shape": [1, 1]}, [16, 32, 1, 1], 0, False),
])
def test_output_channel_axis_per_op(op_type, attrs, weight_shape, axis, ok):
    b = GraphBuilder()
    x = b.qdq(b.input("x", [4, 16] if op_type in ("Gemm", "MatMul") else [1, 16, 4, 4]))
    b.outputs.append(b.op(op_type, [x, b.weight(weight_shape, axis=axis)], **attrs))
    assert rule_ids(lint(b.model())) == (set() if ok else {"per-channel-axis"})


def test_scales_and_zero_points_from_constant_nodes_are_resolved():
    b = GraphBuilder()
    scale = b.op("Constant", [], value_float=-0.5)
    zero_point = b.op("Constant", [], value=numpy_helper.from_array(np.uint8(3), "zp"))
    quant = b.op("QuantizeLinear", [b.input("x", [1, 4]), scale, zero_point])
    b.outputs.append(b.op("DequantizeLinear", [quant, scale, zero_point]))
    findings = lint(b.model())
    assert rule_ids(findings) == {"nonpositive-scale", "nonzero-zero-point"}
    assert len(findings) == 4  # both rules on both the Q and the DQ
    assert rule_ids(lint(b.model(), target="onnxruntime")) == {"nonpositive-scale"}


def test_nonzero_int8_zero_point_and_missing_zero_point():
    b = GraphBuilder()
    b.outputs.append(quantized_conv(b, b.input("x", [1, 16, 4, 4]), zero_point=np.int8(3)))
    assert rule_ids(lint(b.model())) == {"nonzero-zero-point"}
    b = GraphBuilder()
    scale = b.const(np.float32(0.1))
    quant = b.op("QuantizeLinear", [b.input("x", [1, 4]), scale])  # defaults to uint8
    b.outputs.append(b.op("DequantizeLinear", [quant, scale]))
    (finding,) = lint(b.model())
    assert finding.rule == "nonzero-zero-point" and "uint8" in finding.message


def test_onnxruntime_target_allows_uint8_activations_and_tiny_layers():
    assert lint(g_nonzero_zero_point(), target="onnxruntime") == []
    assert lint(g_tiny_layer_quantized(), target="onnxruntime") == []
    # Weights must still be signed int8 for ONNX Runtime's U8S8 format.
    b = GraphBuilder()
    w_uint8 = b.const(np.full((16, 16, 1, 1), 7, np.uint8), "w")
    w_dq = b.op("DequantizeLinear", [w_uint8, b.const(np.float32(0.01))])
    b.outputs.append(b.op("Conv", [b.qdq(b.input("x", [1, 16, 4, 4])), w_dq]))
    assert rule_ids(lint(b.model(), target="onnxruntime")) == {"nonzero-zero-point"}


def test_fully_float_weighted_op_is_a_legitimate_skip():
    b = GraphBuilder()
    float_weight = b.const(np.ones((4, 16, 1, 1), np.float32), "w")
    b.outputs.append(b.op("Conv", [b.input("x", [1, 16, 4, 4]), float_weight]))
    assert lint(b.model()) == []


def test_bias_add_is_not_a_residual():
    b = GraphBuilder()
    x_dq = b.qdq(b.input("x", [4, 32]))
    projected = b.op("MatMul", [x_dq, b.weight([32, 32], axis=1)])
    b.outputs.append(b.op("Add", [projected, b.const(np.zeros(32, np.float32))]))
    assert lint(b.model()) == []


# --- API ---------------------------------------------------------------------------------------
def test_unnamed_node_gets_a_stable_label():
    b = GraphBuilder()
    x = b.op("Relu", [b.input("x", [1, 16, 4, 4])], name="")
    stats = [b.const(np.ones(16, np.float32)) for _ in range(4)]
    b.outputs.append(b.op("BatchNormalization", [x, *stats], name=""))
    (finding,) = lint(b.model())
    assert finding.node == "BatchNormalization#1"


def test_path_input(tmp_path: Path):
    clean, bad = tmp_path / "clean.onnx", tmp_path / "bad.onnx"
    onnx.save(build_clean(), clean)
    onnx.save(g_batchnorm_left(), bad)
    assert lint(clean) == [] and lint(str(clean)) == []
    assert rule_ids(lint(str(bad))) == {"batchnorm-left"}
    with pytest.raises(ExportError, match="does not exist"):
        lint(tmp_path / "missing.onnx")


def test_unknown_target_lists_valid_targets():
    with pytest.raises(ExportError, match="tensorrt") as info:
        lint(build_clean(), target="tensor-rt")
    assert "onnxruntime" in str(info.value) and "did you mean" in str(info.value)


def test_format_findings_one_line_each():
    findings = lint(g_nonpositive_scale())
    text = format_findings(findings)
    assert len(text.splitlines()) == len(findings) == 2
    first = findings[0]
    assert text.splitlines()[0] == f"[{first.rule}] {first.node}: {first.message} -- {first.fix}"
    assert format_findings([]) == ""


def test_rules_have_descriptions():
    assert all(isinstance(text, str) and text for text in RULES.values())
