"""Tests of the TensorRT-compliance linter (qatgraph.backends.onnx_lint).

Every rule has one small graph, built with ``onnx.helper``, that triggers exactly that rule;
a clean graph (ResNet BasicBlock with downsample, a Concat, attention-like MatMuls) must give
no findings and must also be a valid model that ONNX Runtime can run. The graphs:
tests/backends/onnx_lint_graphs.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx_lint_graphs import (
    RULE_GRAPHS,
    WARNING_RULES,
    GraphBuilder,
    build_clean,
    g_batchnorm_left,
    g_concat_scale_mismatch,
    g_nonpositive_scale,
    g_nonzero_zero_point,
    g_tensor_quantized_twice,
    g_tiny_layer_quantized,
    quantized_conv,
)

from qatgraph.backends.onnx_lint import RULES, Finding, format_findings, lint
from qatgraph.errors import ExportError


def rule_ids(findings: list[Finding]) -> set[str]:
    return {f.rule for f in findings}


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
