"""Golden Q/DQ placement tests: exactly which tensors carry quantizers, and for which consumers.

Each expectation is the TensorRT explicit-quantization rule applied by hand (DESIGN.md):
inputs of weighted ops quantized, outputs not; one quantizer per tensor shared by its
consumers; the residual skip input quantized, never the conv branch; Concat shares a scale.
"""
from __future__ import annotations

import pytest
import torch
from models import BLOCKS, InceptionBlock
from placement import quantized_edges, quantizer_targets

import qatgraph


def compile_block(name: str, policy="tensorrt"):
    factory, shape = BLOCKS[name]
    model = factory().eval()
    return qatgraph.compile(model, policy, example_inputs=(torch.randn(*shape),))


GOLDEN = {
    # Conv-BN-ReLU stack: each conv's input, nothing after the last ReLU.
    "conv_bn_relu_stack": {"x": {"layers_0_0"}, "layers_0_2": {"layers_1_0"}, "layers_1_2": {"layers_2_0"}},
    # BasicBlock, identity: x feeds conv1 and the residual add through ONE quantizer; bn2 -> add stays float.
    "basic_identity": {"x": {"conv1", "add"}, "relu": {"conv2"}},
    # BasicBlock, downsample: both add inputs are conv chains; the shorter (downsample) is the skip.
    "basic_downsample": {"x": {"conv1", "downsample_0"}, "relu": {"conv2"}, "downsample_1": {"add"}},
    "bottleneck_identity": {"x": {"conv1", "add"}, "relu": {"conv2"}, "relu_1": {"conv3"}},
    "bottleneck_downsample": {"x": {"conv1", "downsample_0"}, "relu": {"conv2"}, "relu_1": {"conv3"},
                              "downsample_1": {"add"}},
    # MobileNetV2 inverted residual: Add with no ReLU after it; x is the skip.
    "inverted_residual": {"x": {"conv_0_0", "add"}, "conv_0_2": {"conv_1_0"}, "conv_1_2": {"conv_2"}},
    "inverted_residual_strided": {"x": {"conv_0_0"}, "conv_0_2": {"conv_1_0"}, "conv_1_2": {"conv_2"}},
    "inverted_residual_no_expand": {"x": {"conv_0_0", "add"}, "conv_0_2": {"conv_1"}},
    # Depthwise conv quantized like any conv (32 channels is not tiny).
    "depthwise_separable": {"x": {"conv1"}, "relu1": {"conv2"}},
    # Inception: branch inputs, the pooled branch's conv input, and the concat output feeding the projection.
    "inception": {"x": {"branch1_0", "branch2_0_0", "branch3_0_0"}, "branch2_0_2": {"branch2_1_0"},
                  "branch3_0_2": {"branch3_1_0"}, "branch4_0": {"branch4_1_0"}, "cat": {"project_0"}},
    # Linear head: conv input and the flattened features into fc1; fc2 has N=10 < 16 -> left in float.
    "linear_head": {"x": {"conv1"}, "flatten": {"fc1"}},
    # Attention: Linear inputs, both matmuls' inputs (Q, K^T; softmax P, V), residual skips.
    "attention": {"x": {"add"}, "norm1": {"qkv"}, "getitem_3": {"matmul"}, "transpose": {"matmul"},
                  "softmax": {"matmul_1"}, "getitem_5": {"matmul_1"}, "reshape_1": {"proj"}, "add": {"add_1"},
                  "norm2": {"mlp_fc1"}, "mlp_act": {"mlp_fc2"}},
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_placement(name):
    qmodel = compile_block(name)
    assert quantized_edges(qmodel) == GOLDEN[name]


@pytest.mark.parametrize("name", ["basic_identity", "basic_downsample", "bottleneck_identity", "inverted_residual"])
def test_conv_branch_into_residual_add_is_never_quantized(name):
    qmodel = compile_block(name)
    add = next(n for n in qmodel.graph.nodes if n.name == "add")
    main_branch = [arg for arg in add.args if "qatgraph.quantizer" not in arg.meta]
    assert len(main_branch) == 1, "exactly one Add input is quantized"
    assert main_branch[0].op == "call_module" and "bn" in str(main_branch[0].target) or \
        str(main_branch[0].target).startswith("conv.")


def test_weighted_op_outputs_are_not_quantized():
    qmodel = compile_block("conv_bn_relu_stack")
    for node in qmodel.graph.nodes:
        if node.op == "call_module" and isinstance(qmodel.get_submodule(node.target), torch.nn.Conv2d):
            assert all("qatgraph.quantizer" not in user.meta for user in node.users), node.name


def test_one_quantizer_per_tensor_shared_by_consumers():
    qmodel = compile_block("basic_identity")
    quantizer_nodes = [n for n in qmodel.graph.nodes if "qatgraph.quantizer" in n.meta]
    assert len(quantizer_nodes) == 2
    x_quant = next(n for n in quantizer_nodes if n.args[0].name == "x")
    assert {u.name for u in x_quant.users} == {"conv1", "add"}


def test_concat_inputs_and_output_share_one_scale():
    class ConcatOfQuantizedInputs(torch.nn.Module):
        """Input ``a`` also feeds a conv, so it is quantized: it must share the concat's scale. Input ``b``
        feeds only the concat and stays unquantized (quantizing it again would change nothing)."""

        def __init__(self):
            super().__init__()
            self.left = torch.nn.Conv2d(16, 16, 1)
            self.right = torch.nn.Conv2d(16, 16, 1)
            self.after_left = torch.nn.Conv2d(16, 16, 1)
            self.project = torch.nn.Conv2d(32, 16, 1)

        def forward(self, x):
            a, b = self.left(x).relu(), self.right(x).relu()
            return self.project(torch.cat([a, b], 1)) + self.after_left(a)

    qmodel = qatgraph.compile(ConcatOfQuantizedInputs(), "tensorrt", example_inputs=(torch.randn(1, 16, 8, 8),))
    targets = quantizer_targets(qmodel)
    assert targets["cat"] == targets["relu"] == "quantizers.cat"
    assert "relu_1" not in targets
    qatgraph.calibrate(qmodel, [torch.randn(2, 16, 8, 8)])
    assert qmodel(torch.randn(1, 16, 8, 8)).shape == (1, 16, 8, 8)


def test_inception_concat_output_quantized_once():
    qmodel = qatgraph.compile(InceptionBlock(32).eval(), "tensorrt", example_inputs=(torch.randn(1, 32, 8, 8),))
    targets = quantizer_targets(qmodel)
    assert list(targets.values()).count("quantizers.cat") == 1


def test_tiny_layers_left_float_in_tensorrt_preset_but_not_with_min_channels_zero():
    qmodel = compile_block("linear_head")
    decision = qmodel.qatgraph_info.layer("fc2")
    assert not decision.quantized and "tiny" in decision.reason
    qmodel = compile_block("linear_head", {"preset": "tensorrt", "min_channels": 0})
    assert qmodel.qatgraph_info.layer("fc2").quantized
    assert quantized_edges(qmodel)["relu2"] == {"fc2"}


def test_tiny_matmul_uses_shapes():
    class SmallHeads(torch.nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(-2, -1)

    qmodel = qatgraph.compile(SmallHeads(), {"preset": "tensorrt", "quantize": ["matmul"]},
                              example_inputs=(torch.randn(1, 4, 8), torch.randn(1, 4, 8)))
    (decision,) = qmodel.qatgraph_info.layers
    assert not decision.quantized and "K=8" in decision.reason


def test_skipped_conv_pulls_no_quantizer_onto_its_residual_skip():
    qmodel = compile_block("basic_identity", {"preset": "tensorrt", "skip": ["conv2"]})
    assert quantized_edges(qmodel) == {"x": {"conv1"}}
    assert "skip list" in qmodel.qatgraph_info.layer("conv2").reason


def test_onnxruntime_preset_quantizes_stem_and_head():
    from models import resnet18_like

    qmodel = qatgraph.compile(resnet18_like().eval(), "onnxruntime", example_inputs=(torch.randn(1, 3, 32, 32),))
    assert qmodel.qatgraph_info.layer("conv1").quantized and qmodel.qatgraph_info.layer("fc").quantized
    assert qmodel.quantizers.x.spec.qmin == 0 and qmodel.quantizers.x.spec.qmax == 255


def test_onnxruntime_target_quantizes_both_residual_inputs():
    """ONNX Runtime fuses DQ,DQ -> Add -> Q into QLinearAdd (and no Add into a conv): both inputs."""
    qmodel = compile_block("basic_identity", "onnxruntime")
    assert quantized_edges(qmodel) == {"x": {"conv1", "add"}, "relu": {"conv2"}, "bn2": {"add"}}
