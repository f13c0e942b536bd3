"""The EfQAT freeze pass: which rows train, and what the backward pass skips.

What is checked, each against an independent expectation:
* selection — how many rows train (CWPL per layer, CWPN across the network, LWPN whole layers),
  and which (the top ``mean |w|`` rows / layers, built with known importances);
* work — backward FLOPs drop by exactly the frozen rows' weight-gradient FLOPs (also with
  learnable weight scales), and ``remove`` restores ordinary QAT.
Models and helpers: freeze_cases.py; training with a frozen model: test_freeze_training.py.
"""
from __future__ import annotations

import pytest
import torch
from freeze_cases import (
    INPUTS,
    ConvNet,
    LinearStack,
    compile_model,
    exact_ceil,
    importance,
    refreeze,
    set_row_importances,
    trainable_mask,
)
from models import resnet18_like
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import qatgraph


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return compile_model(resnet18_like(), {"mode": "cwpn", "ratio": 0.05}, min_channels=16)


# --------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.25, 1.0])
def test_cwpl_trains_ceil_ratio_rows_of_each_layer_the_most_important(resnet, ratio):
    controller = refreeze(resnet, "cwpl", ratio)
    assert len(controller.layers) == 19, "every quantized conv of the ResNet (conv1/fc stay FP: tiny)"
    for layer in controller.layers:
        expected = exact_ceil(ratio, layer.num_rows)
        top = torch.topk(importance(layer.module.weight), expected).indices.sort().values
        assert trainable_mask(layer).sum() == expected, layer.name
        assert torch.equal(trainable_mask(layer).nonzero().flatten(), top), layer.name
        # no row trainable -> the weight gets no gradient at all (no dW GEMM, no weight fake-quant backward)
        assert layer.module.weight.requires_grad == (expected > 0)
        # all rows (or none) trainable -> the ordinary (unmasked) forward; otherwise exactly the chosen rows
        assert (layer.module.trainable_rows is None) == (expected in (0, layer.num_rows))
    assert controller.trainable_rows == sum(exact_ceil(ratio, layer.num_rows) for layer in controller.layers)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.25, 1.0])
@pytest.mark.parametrize("kind", ["layer_normalized", "raw"])
def test_cwpn_trains_ceil_ratio_of_all_rows_the_most_important_network_wide(resnet, ratio, kind):
    controller = refreeze(resnet, "cwpn", ratio, importance=kind)
    assert controller.trainable_rows == exact_ceil(ratio, controller.total_rows)
    per_layer = [importance(layer.module.weight) for layer in controller.layers]
    if kind == "layer_normalized":
        per_layer = [scores / scores.mean() for scores in per_layer]
    scores = torch.cat(per_layer)
    chosen = torch.cat([trainable_mask(layer) for layer in controller.layers])
    if 0 < chosen.sum() < chosen.numel():
        assert scores[chosen].min() > scores[~chosen].max(), "a frozen row is more important than a trained one"


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.25, 0.6, 1.0])
def test_lwpn_trains_whole_layers_most_important_first_within_the_budget(resnet, ratio):
    controller = refreeze(resnet, "lwpn", ratio)
    budget = ratio * controller.total_rows
    assert controller.trainable_rows <= budget + 1e-9
    trained = [layer for layer in controller.layers if layer.rows is None]
    frozen = [layer for layer in controller.layers if layer.rows is not None]
    for layer in controller.layers:
        assert layer.module.trainable_rows is None, "LWPN never routes through the masked ops"
        assert layer.module.weight.requires_grad == (layer in trained)
    for layer in frozen:
        assert layer.rows.numel() == 0, "LWPN freezes all or nothing of a layer"
        # greedy by importance: a frozen layer more important than a trained one did not fit
        level = importance(layer.module.weight).mean()
        more_important = [t for t in trained if importance(t.module.weight).mean() > level]
        if len(more_important) < len(trained):
            assert sum(t.num_rows for t in more_important) + layer.num_rows > budget, layer.name
    if ratio == 1.0:
        assert not frozen
    if ratio == 0.0:
        assert not trained


@pytest.mark.parametrize("ratio, expected", [
    (0.5, {"l1", "l2"}), (0.6, {"l1", "l2", "l3"}), (1.0, {"l0", "l1", "l2", "l3"}),
    (0.3, {"l1", "l3"}),  # l2 (32 rows) does not fit after l1; the less important l3 (16 rows) does
    (0.1, set()),  # budget 11.2 rows: no layer fits
])
def test_lwpn_picks_layers_by_known_mean_abs_weight(ratio, expected):
    """Layers of 48/16/32/16 rows with mean |w| 0.1/0.4/0.3/0.2; the budget is ratio * 112 rows."""
    generator = torch.Generator().manual_seed(3)
    model = LinearStack()
    for name, level in {"l0": 0.1, "l1": 0.4, "l2": 0.3, "l3": 0.2}.items():
        layer = getattr(model, name)
        set_row_importances(layer, torch.full((layer.out_features,), level), generator)
    controller = compile_model(model, {"mode": "lwpn", "ratio": ratio}).qatgraph_freeze
    assert {layer.name for layer in controller.layers if layer.rows is None} == expected


@pytest.mark.parametrize("mode", ["cwpl", "cwpn"])
def test_rows_chosen_by_known_mean_abs_weight(mode):
    """Raw importance (the paper's mean |w|): rows are compared across layers as they are."""
    generator = torch.Generator().manual_seed(4)
    model = LinearStack()
    layers = [model.l0, model.l1, model.l2, model.l3]
    values = (torch.randperm(112, generator=generator).float() + 1) / 100  # distinct importances
    values = values.split([layer.out_features for layer in layers])
    for layer, layer_values in zip(layers, values):
        set_row_importances(layer, layer_values, generator)
    controller = compile_model(model, {"mode": mode, "ratio": 0.25, "importance": "raw"}).qatgraph_freeze
    for layer, layer_values in zip(controller.layers, values):
        if mode == "cwpl":
            expected = torch.topk(layer_values, exact_ceil(0.25, len(layer_values))).indices.sort().values
        else:
            expected = (layer_values >= torch.cat(values).topk(28).values.min()).nonzero().flatten()
        assert torch.equal(layer.module.trainable_rows, expected), layer.name


def test_layer_normalized_cwpn_trains_rows_of_a_layer_with_small_weights():
    """l0 has weights 10x smaller than l1: raw mean |w| gives every trainable row to l1, the
    per-layer normalized score ranks each row against its own layer and picks from both."""
    generator = torch.Generator().manual_seed(5)
    model = LinearStack()
    spread = lambda n: torch.linspace(0.5, 1.5, n)  # noqa: E731  (row importance relative to the layer)
    set_row_importances(model.l0, 0.01 * spread(48), generator)
    set_row_importances(model.l1, 0.1 * spread(16), generator)
    for layer in (model.l2, model.l3):
        set_row_importances(layer, torch.full((layer.out_features,), 1e-3), generator)
    rows = {}
    for kind in ("raw", "layer_normalized"):
        controller = compile_model(model, {"mode": "cwpn", "ratio": 0.1, "importance": kind}).qatgraph_freeze
        rows[kind] = {layer.name: int(trainable_mask(layer).sum()) for layer in controller.layers}
    assert rows["raw"] == {"l0": 0, "l1": 12, "l2": 0, "l3": 0}
    # normalized: l0's and l1's top rows both score about 1.5; l2/l3 rows all score 1.0
    assert rows["layer_normalized"]["l0"] > 0 and rows["layer_normalized"]["l1"] > 0
    assert rows["layer_normalized"]["l2"] == rows["layer_normalized"]["l3"] == 0


def test_unknown_importance_is_named():
    with pytest.raises(qatgraph.PolicyError, match="freeze.importance"):
        qatgraph.Policy.from_any({"preset": "tensorrt", "freeze": {"importance": "mean"}})


@pytest.mark.parametrize("mode", ["cwpl", "cwpn"])
def test_ratio_rounding_is_exact_for_decimal_ratios(mode):
    model = nn.Sequential(nn.Linear(16, 100), nn.ReLU(), nn.Linear(100, 100))
    controller = compile_model(model, {"mode": mode, "ratio": 0.55}, input_shape=(2, 16)).qatgraph_freeze
    assert controller.trainable_rows == 110


def layer_flops(qmodel: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Forward FLOPs of each freezable layer (= its weight-gradient FLOPs in the backward)."""
    flops: dict[str, int] = {}

    def record(name):
        def hook(module, args, output):
            if isinstance(module, nn.Linear):
                flops[name] = 2 * args[0].numel() // args[0].shape[-1] * module.weight.numel()
            else:
                flops[name] = conv_flop_count(list(args[0].shape), list(module.weight.shape), list(output.shape))
        return hook

    hooks = [layer.module.register_forward_hook(record(layer.name)) for layer in qmodel.qatgraph_freeze.layers]
    with torch.no_grad():
        qmodel(x)
    for handle in hooks:
        handle.remove()
    return flops


def backward_flops(qmodel: nn.Module, x: torch.Tensor) -> int:
    qmodel.zero_grad(set_to_none=True)
    loss = qmodel(x).square().sum()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode, ratio", [("lwpn", 0.0), ("lwpn", 0.25), ("cwpn", 0.1), ("cwpl", 0.25), ("cwpl", 0.0)])
def test_backward_skips_exactly_the_frozen_rows_weight_gradient_flops(resnet, mode, ratio):
    x = torch.randn(1, 3, 16, 16)
    resnet.qatgraph_freeze.remove()
    full_qat = backward_flops(resnet, x)
    controller = refreeze(resnet, mode, ratio)
    per_layer = layer_flops(resnet, x)
    saved = sum(per_layer[layer.name] * int((~trainable_mask(layer)).sum()) // layer.num_rows
                for layer in controller.layers)
    assert saved > 0
    assert backward_flops(resnet, x) == full_qat - saved
    for layer in controller.layers:
        if mode == "lwpn" and layer.rows is not None:
            assert not layer.module.weight.requires_grad and layer.module.weight.grad is None, layer.name


def test_lwpn_with_learnable_weight_scales_skips_the_weight_gradient_too():
    """A learnable scale's LSQ gradient needs dL/d(quantized weight): unless the frozen layer's scale
    stops training too, autograd runs its full weight-gradient GEMM anyway."""
    x = torch.randn(*INPUTS[ConvNet])
    plain = compile_model(ConvNet(), {"mode": "lwpn", "ratio": 0.0})
    learnable = compile_model(ConvNet(), {"mode": "lwpn", "ratio": 0.0}, weight={"learnable_scale": True})
    assert not any(layer.module.weight_quantizer.scale.requires_grad for layer in learnable.qatgraph_freeze.layers)
    assert backward_flops(learnable, x) == backward_flops(plain, x)


def test_remove_restores_ordinary_qat_with_learnable_scales():
    x = torch.randn(*INPUTS[ConvNet])
    full_qat = compile_model(ConvNet(), weight={"learnable_scale": True})
    qmodel = compile_model(ConvNet(), {"mode": "lwpn", "ratio": 0.0}, weight={"learnable_scale": True})
    qmodel.qatgraph_freeze.remove()
    assert all(p.requires_grad for p in qmodel.parameters())
    assert backward_flops(qmodel, x) == backward_flops(full_qat, x)
