"""Architectures as their authors write them (tests/models_arch.py): a ViT on nn.MultiheadAttention,
Swin-style window attention on F.linear with its own parameters, EfficientNet-style MBConv.

Each goes compile (tensorrt) -> calibrate -> export -> lint (no errors, no warnings) -> ONNX Runtime
parity, and the weighted ops counted in the float model's fx graph (independently of qatgraph)
equal the rows of ``qatgraph.summary``, each with a status and the rule that decided it.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import models_arch
import onnx
import pytest
import torch
import torch.nn.functional as F
from placement import quantized_edges
from torch import fx, nn

import qatgraph
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.parity import check_parity

pytestmark = pytest.mark.filterwarnings("ignore::qatgraph.QatgraphWarning", "ignore::torch.jit.TracerWarning")

GEMM_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                  F.conv_transpose3d, torch.matmul, operator.matmul, torch.bmm, torch.einsum}
GEMM_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d)


def count_weighted_ops(model: nn.Module) -> int:
    """Weighted ops of the float model's fx graph, counted without qatgraph: Conv/Linear calls,
    functional GEMMs, and per nn.MultiheadAttention its in-projection(s), two attention matmuls and
    out_proj."""
    gm = fx.symbolic_trace(model)
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.MultiheadAttention):
                packed = module._qkv_same_embed_dim and node.args[0] is node.args[1] is node.args[2]
                count += (1 if packed else 3) + 2 + 1
            elif isinstance(module, GEMM_MODULES):
                count += 1
        elif node.op == "call_function" and node.target in GEMM_FUNCTIONS:
            count += 1
        elif node.op == "call_method" and node.target in ("matmul", "bmm"):
            count += 1
    return count


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "vit_mha": models_arch.VitMha,
    "swin_window": models_arch.SwinLike,
    "efficientnet_mbconv": lambda: models_arch.EfficientNetLike(),
}
EXPECTED_WEIGHTED = {"vit_mha": 14, "swin_window": 21, "efficientnet_mbconv": 32}


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def policy_with(frontend: str) -> dict:
    return {"preset": "tensorrt", "tracing": {"frontend": frontend}}


def compile_calibrated(name: str, frontend: str = "fx") -> nn.Module:
    torch.manual_seed(0)
    model = ARCHITECTURES[name]().eval()
    qmodel = qatgraph.compile(model, policy_with(frontend), example_inputs=(images(2, 0),))
    qatgraph.calibrate(qmodel, [images(4, seed) for seed in (1, 2)], show_progress=False)
    return qmodel


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_compile_calibrate_export_lint_parity(name: str, frontend: str, tmp_path) -> None:
    qmodel = compile_calibrated(name, frontend)
    path = str(tmp_path / f"{name}.onnx")
    result = export_onnx(qmodel, path, images(2, 0))
    assert result.errors == [] and result.warnings == [], [(f.rule, f.node) for f in result.findings]
    parity = check_parity(qmodel, path, [images(3, seed) for seed in (3, 4)])
    assert parity.passed, str(parity)
    nodes = onnx.load(path).graph.node
    assert not any(n.op_type in ("Einsum", "BatchNormalization") for n in nodes)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_weighted_op_is_in_the_summary(name: str, frontend: str) -> None:
    """torch.export too: nn.MultiheadAttention's in-projection is an ATen linear on a parameter there."""
    model = ARCHITECTURES[name]().eval()
    qmodel = qatgraph.compile(model, policy_with(frontend), example_inputs=(images(2, 0),))
    assert qmodel.trace_report.frontend == ("torch.export" if frontend == "export" else "torch.fx")
    rows = qatgraph.summary(qmodel, print_table=False).rows
    assert len(rows) == count_weighted_ops(model) == EXPECTED_WEIGHTED[name]
    assert all(row.status in ("INT", "FP") and row.reason for row in rows)
    floating = {row.layer: row.reason for row in rows if row.status != "INT"}
    assert all(reason.startswith("tiny layer") for reason in floating.values()), floating


def test_vit_attention_is_quantized_for_tensorrt_mha_fusion() -> None:
    qmodel = compile_calibrated("vit_mha")
    info = qmodel.qatgraph_info
    for block in range(2):
        prefix = f"layers.{block}.self_attention"
        in_proj, out_proj = info.layer(f"{prefix}.in_proj"), info.layer(f"{prefix}.out_proj")
        assert in_proj.quantized and in_proj.weight_quantizer == f"{prefix}.in_proj_weight_quantizer"
        assert qmodel.get_submodule(in_proj.weight_quantizer).axis == 0
        assert out_proj.quantized and out_proj.type_name == "QuantLinear"
        for role in ("qk", "pv"):
            matmul = info.layer(f"layers_{block}_self_attention_attention_{role}")
            assert matmul.quantized and len(matmul.input_quantizers) == 2
    edges = quantized_edges(qmodel)
    # softmax feeds only the P@V matmul through its quantizer; the scores and LayerNorm outputs
    # are quantized only where a GEMM reads them.
    assert edges["layers_0_self_attention_attention_softmax"] == {"layers_0_self_attention_attention_pv"}
    assert "layers_0_self_attention_attention_scaled" not in edges
    assert set(qmodel.state_dict()) >= set(ARCHITECTURES["vit_mha"]().state_dict())


def test_swin_functional_weights_per_channel_and_relative_bias_float() -> None:
    qmodel = compile_calibrated("swin_window")
    info = qmodel.qatgraph_info
    qkv = info.layer("stage1.0.attn.qkv")
    assert qkv.quantized and qkv.type_name == "linear" and qkv.weight_quantizer == "stage1.0.attn.qkv.weight_quantizer"
    quantizer = qmodel.get_submodule(qkv.weight_quantizer)
    assert quantizer.axis == 0 and quantizer.scale.numel() == 96
    assert not any("relative_position" in name for name in quantized_edges(qmodel))


def residual_adds(qmodel: fx.GraphModule) -> list[fx.Node]:
    return [n for n in qmodel.graph.nodes if n.meta.get("qatgraph.residual") is not None]


@pytest.mark.parametrize("training", [False, True])
def test_every_mbconv_residual_gets_its_skip_quantized(training: bool) -> None:
    model = models_arch.EfficientNetLike().train(training)
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(images(2, 0),))
    adds = residual_adds(qmodel)
    assert len(adds) == 4
    for add in adds:
        skip = add.meta["qatgraph.residual"]["skip_arg"]
        quantized = [isinstance(arg, fx.Node) and "qatgraph.quantizer" in arg.meta for arg in add.args[:2]]
        assert quantized[skip] and not quantized[1 - skip], (add.name, quantized)


class SqueezeAfterLastConv(nn.Module):
    """``y = se(conv_bn(x)); y += x``: a multiply between the last conv and the Add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = models_arch.conv_bn(32, 32, 3, act=False)
        self.se = models_arch.SqueezeExcitation(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.conv(x))
        y += x
        return y


class InplaceAddThroughIdentities(nn.Module):
    """``conv(x)`` through Dropout and Identity, added in place with ``add_``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = models_arch.conv_bn(32, 32, 3, act=False)
        self.dropout, self.identity = nn.Dropout(0.1), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.identity(self.dropout(self.conv(x))).add_(x)


@pytest.mark.parametrize("block", [SqueezeAfterLastConv, InplaceAddThroughIdentities])
@pytest.mark.parametrize("training", [False, True])
def test_residual_rule_through_se_and_inplace_adds(block: type, training: bool, tmp_path) -> None:
    x = torch.randn(2, 32, 8, 8)
    qmodel = qatgraph.compile(block().train(training), "tensorrt", example_inputs=(x,))
    [add] = residual_adds(qmodel)
    assert add.meta["qatgraph.residual"] == {"skip_arg": 1, "main_layer": "conv.0"}
    assert quantized_edges(qmodel)["x"] == {"conv_0", add.name}
    if not training:
        qatgraph.calibrate(qmodel, [torch.randn(4, 32, 8, 8)], show_progress=False)
        result = export_onnx(qmodel.eval(), str(tmp_path / "block.onnx"), x)
        assert result.errors == [] and result.warnings == []


def test_cross_attention_on_packed_weights_exports(tmp_path) -> None:
    """Query from one tensor, key/value from another: three row slices of one quantized weight."""

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.out = nn.Linear(64, 32)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.out(self.attn(x, memory, memory, need_weights=False)[0])

    g = torch.Generator().manual_seed(0)
    x, memory = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    model = Decoder().eval()
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(x, memory))
    assert sum(d.quantized for d in qmodel.qatgraph_info.layers) == 7
    qatgraph.calibrate(qmodel, [(torch.randn(4, 16, 64), torch.randn(4, 16, 64))], show_progress=False)
    path = str(tmp_path / "decoder.onnx")
    result = export_onnx(qmodel, path, (x, memory))
    assert result.errors == [], [(f.rule, f.node) for f in result.errors]
    assert check_parity(qmodel, path, [(torch.randn(3, 16, 64), torch.randn(3, 16, 64))]).passed


def test_policy_rules_reach_functional_layers() -> None:
    """A skip list (sensitivity's output) and type rules name functional ops like modules."""
    skip_list = {"preset": "tensorrt", "skip": ["stage1.0.attn.qkv"]}
    qmodel = qatgraph.compile(models_arch.SwinLike().eval(), skip_list, example_inputs=(images(2, 0),))
    info = qmodel.qatgraph_info
    assert "skip list" in info.layer("stage1.0.attn.qkv").reason and info.layer("stage1.1.attn.qkv").quantized
    assert not hasattr(qmodel.get_submodule("stage1.0.attn.qkv"), "weight_quantizer")
    by_type = {"preset": "tensorrt", "overrides": [{"type": "Linear", "skip": True}]}
    qmodel = qatgraph.compile(models_arch.SwinLike().eval(), by_type, example_inputs=(images(2, 0),))
    info = qmodel.qatgraph_info
    assert "skipped by override" in info.layer("stage2.0.attn.qkv").reason  # F.linear is a Linear to type rules
    assert "skipped by override" in info.layer("stage2.0.mlp.0").reason
    assert info.layer("matmul_4").quantized


def test_calibrate_refreshes_functional_weight_scales() -> None:
    qmodel = compile_calibrated("vit_mha")
    attention = qmodel.get_submodule("layers.0.self_attention")
    with torch.no_grad():
        attention.in_proj_weight.mul_(2.0)
    before = attention.in_proj_weight_quantizer.scale.clone()
    qatgraph.calibrate(qmodel, [images(4, 1)], show_progress=False)
    torch.testing.assert_close(attention.in_proj_weight_quantizer.scale, before * 2.0)


class FunctionalLayers(nn.Module):
    """F.conv2d / F.conv_transpose2d / ``@`` on the module's own parameters and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv_weight = nn.Parameter(torch.randn(32, 16, 3, 3, generator=g) * 0.1)
        self.conv_bias = nn.Parameter(torch.zeros(32))
        self.up_weight = nn.Parameter(torch.randn(32, 16, 2, 2, generator=g) * 0.1)  # [in, out, kh, kw]
        self.register_buffer("projection", torch.randn(16, 24, generator=g) * 0.1)  # [K, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.conv_weight, self.conv_bias, padding=1))
        x = F.conv_transpose2d(x, self.up_weight, stride=2)
        return x.flatten(2).transpose(1, 2) @ self.projection


def test_functional_conv_transpose_and_matmul_weights(tmp_path) -> None:
    x = torch.randn(2, 16, 8, 8)
    qmodel = qatgraph.compile(FunctionalLayers().eval(), "tensorrt", example_inputs=(x,))
    rows = {d.layer: d for d in qmodel.qatgraph_info.layers}
    assert set(rows) == {"conv", "up", "projection"} and all(d.quantized for d in rows.values())
    axes = {name: qmodel.get_submodule(d.weight_quantizer).axis for name, d in rows.items()}
    assert axes == {"conv": 0, "up": 1, "projection": 1}
    assert [len(d.input_quantizers) for d in rows.values()] == [1, 1, 1]
    qatgraph.calibrate(qmodel, [torch.randn(4, 16, 8, 8)], show_progress=False)
    path = str(tmp_path / "functional.onnx")
    result = export_onnx(qmodel, path, x)
    assert result.errors == [] and result.warnings == [], [(f.rule, f.node) for f in result.findings]
    model = onnx.load(path)
    assert not any(init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2 for init in model.graph.initializer)
    assert check_parity(qmodel, path, [torch.randn(3, 16, 8, 8)]).passed
