"""Conv/Linear-BN fusion keeps the floating-point function, and BN folding is exact with per-channel
weight scales (negative gammas included)."""
from __future__ import annotations

import copy

import pytest
import torch
from models import BLOCKS, randomize_batchnorm, resnet18_like
from torch import nn

import qatgraph
from qatgraph.graph.folding import fold_graph_batchnorm

BN_BLOCKS = ["conv_bn_relu_stack", "basic_identity", "basic_downsample", "bottleneck_downsample",
             "inverted_residual", "depthwise_separable", "inception", "linear_head"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def disable_all(model: nn.Module) -> None:
    for _, quantizer in qatgraph.iter_quantizers(model):
        quantizer.disable()


@pytest.mark.parametrize("name", BN_BLOCKS)
def test_fold_mode_keeps_the_float_function(name):
    factory, shape = BLOCKS[name]
    model = randomize_batchnorm(factory(), torch.Generator().manual_seed(1)).eval()
    x = torch.randn(*shape)
    qmodel = qatgraph.compile(model, {"preset": "tensorrt", "bn": "fold"}, example_inputs=(x,))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules()), "every BN is folded"
    disable_all(qmodel)
    with torch.no_grad():
        assert relative_error(qmodel.eval()(x), model(x)) < 1e-5


class _LayerThenBN(nn.Module):
    def __init__(self, layer: nn.Module, bn: nn.Module):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x):
        return torch.relu(self.bn(self.layer(x)))


FOLD_CASES = {
    "conv1d": (lambda: _LayerThenBN(nn.Conv1d(16, 32, 3, bias=True), nn.BatchNorm1d(32)), (4, 16, 20)),
    "conv3d": (lambda: _LayerThenBN(nn.Conv3d(16, 16, 3, groups=2), nn.BatchNorm3d(16)), (2, 16, 6, 6, 6)),
    "conv_transpose2d": (lambda: _LayerThenBN(nn.ConvTranspose2d(16, 32, 2, stride=2), nn.BatchNorm2d(32)),
                         (2, 16, 5, 5)),
    "grouped_conv_transpose2d": (lambda: _LayerThenBN(nn.ConvTranspose2d(16, 32, 3, groups=4), nn.BatchNorm2d(32)),
                                 (2, 16, 5, 5)),
    "linear_bn1d": (lambda: _LayerThenBN(nn.Linear(24, 32), nn.BatchNorm1d(32)), (8, 24)),
}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_fold_mode_other_layer_types(case):
    factory, shape = FOLD_CASES[case]
    model = randomize_batchnorm(factory(), torch.Generator().manual_seed(2)).eval()
    x = torch.randn(*shape)
    qmodel = qatgraph.compile(model, {"preset": "tensorrt", "bn": "fold"}, example_inputs=(x,))
    assert "bn" not in dict(qmodel.named_children()), f"{case}: BN not folded"
    disable_all(qmodel)
    with torch.no_grad():
        assert relative_error(qmodel.eval()(x), model(x)) < 1e-5


def test_linear_bn_not_folded_without_shapes():
    """BatchNorm1d normalizes dim 1, which is Linear's feature dim only for 2-D outputs: without
    example inputs the shape is unknown, so the pair is left alone (still correct)."""
    model = randomize_batchnorm(_LayerThenBN(nn.Linear(24, 32), nn.BatchNorm1d(32))).eval()
    qmodel = qatgraph.compile(model, {"preset": "tensorrt", "bn": "fold"})
    assert isinstance(qmodel.bn, nn.BatchNorm1d)


def test_train_mode_records_pairs_and_keeps_bn():
    factory, shape = BLOCKS["basic_downsample"]
    qmodel = qatgraph.compile(factory().eval(), "tensorrt", example_inputs=(torch.randn(*shape),))
    assert isinstance(qmodel.bn1, nn.BatchNorm2d)
    recorded = {n.name: n.meta["qatgraph.bn"] for n in qmodel.graph.nodes if "qatgraph.bn" in n.meta}
    assert recorded == {"conv1": "bn1", "conv2": "bn2", "downsample_0": "downsample.1"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_export_time_folding_is_exact_with_per_channel_scales(seed):
    """A BN kept training (bn: train) folds at export into conv weights and per-channel weight
    scales without changing a single quantized weight value, negative gammas included."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(resnet18_like(), torch.Generator().manual_seed(seed)).eval()
    x = torch.randn(4, 3, 32, 32)
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(x,))
    qatgraph.calibrate(qmodel, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    qmodel.eval()
    gammas = {name: m.weight.detach().clone() for name, m in qmodel.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert any((g < 0).any() for g in gammas.values())
    pairs = {n.name: (str(n.target), n.meta["qatgraph.bn"]) for n in qmodel.graph.nodes if "qatgraph.bn" in n.meta}
    folded = copy.deepcopy(qmodel)
    assert len(fold_graph_batchnorm(folded, snap_to_codes=True)) == len(pairs) == 20
    for conv_name, bn_name in pairs.values():
        conv, bn = qmodel.get_submodule(conv_name), qmodel.get_submodule(bn_name)
        if not hasattr(conv, "weight_quantizer"):
            continue  # the tiny stem conv stays float
        factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        folded_conv = folded.get_submodule(conv_name)
        codes_before = conv.weight_quantizer(conv.weight) / conv.weight_quantizer.scale.view(-1, 1, 1, 1)
        codes_after = folded_conv.weight_quantizer(folded_conv.weight) / \
            folded_conv.weight_quantizer.scale.view(-1, 1, 1, 1)
        sign = torch.sign(factor).view(-1, 1, 1, 1)
        assert torch.equal(codes_after.round(), (codes_before * sign).round()), conv_name
    # Float rounding can move an activation across a rounding boundary now and then; the output
    # stays within a small fraction of its range.
    with torch.no_grad():
        assert relative_error(folded(x), qmodel(x)) < 5e-3
