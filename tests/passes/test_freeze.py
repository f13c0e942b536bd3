"""The EfQAT freeze pass end to end: compile with ``freeze: {mode, ratio, interval}``, then train.

What is checked, each against an independent expectation:
* selection — how many rows train (CWPL per layer, CWPN across the network, LWPN whole layers),
  and which (the top ``mean |w|`` rows / layers, built with known importances);
* gradients — a compiled+frozen model's gradients equal those of the same compiled model without
  freezing, with the frozen rows zeroed (conv groups/stride/dilation/padding modes, depthwise,
  Conv1d, Linear on 2-D and 3-D inputs); input, bias, BN and scale gradients unchanged;
* work — backward FLOPs drop by exactly the frozen rows' weight-gradient FLOPs;
* optimizers — frozen rows and their learnable scale entries stay bit-identical through SGD
  (momentum, Nesterov, weight decay), Adam and AdamW, while trainable rows move;
* refresh counting, state_dict compatibility, summary, torch.compile, CPU bf16 autocast, finetune.
The op itself (qatgraph::masked_*) is tested in tests/test_partial_grad.py.
"""
from __future__ import annotations

import copy
import math
import re
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from models import resnet18_like
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import qatgraph
from qatgraph.passes import freeze as freeze_pass
from qatgraph.train.finetune import finetune

NEVER = 10**9  # refresh interval that never triggers within a test


# ------------------------------------------------------------------------------------------ models
class ConvNet(nn.Module):
    """Every conv flavour the masked conv path handles: grouped+strided+dilated+padded, depthwise,
    reflect padding (F.pad before the op), then Linear layers on 2-D inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(16, 32, 3, stride=2, padding=3, dilation=2, groups=2)
        self.bn = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.relu2 = nn.ReLU()
        self.reflect = nn.Conv2d(32, 16, 3, padding=1, padding_mode="reflect")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 24)
        self.relu3 = nn.ReLU()
        self.head = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.depthwise(self.relu(self.bn(self.grouped(x)))))
        x = torch.flatten(self.pool(self.reflect(x)), 1)
        return self.head(self.relu3(self.fc(x)))


class TokenNet(nn.Module):
    """Linear on 3-D (batch, tokens, features) inputs, a grouped Conv1d over tokens, Linear on 2-D."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.mix = nn.Conv1d(32, 32, 3, padding=1, groups=4)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = self.mix(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.fc2(x).mean(1))


class LinearStack(nn.Module):
    """Linear layers with 48, 16, 32 and 16 rows, for selections built from known importances."""

    def __init__(self) -> None:
        super().__init__()
        self.l0, self.l1, self.l2, self.l3 = nn.Linear(16, 48), nn.Linear(48, 16), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.l2(self.l1(self.l0(x))))


INPUTS = {ConvNet: (2, 16, 12, 12), TokenNet: (2, 6, 16), LinearStack: (2, 16)}


# ----------------------------------------------------------------------------------------- helpers
def compile_model(model: nn.Module, freeze: dict | None = None, *, input_shape: tuple[int, ...] | None = None,
                  preset: str = "tensorrt", **policy) -> nn.Module:
    """Compile (every layer quantized: min_channels 0), calibrate, return in train mode."""
    x = torch.randn(*(input_shape or INPUTS.get(type(model), (2, 3, 32, 32))))
    # max calibration: the percentile histograms cost seconds and are not what is tested here
    activation = {"calibrator": "max", **policy.pop("activation", {})}
    policy = {"preset": preset, "min_channels": 0, "activation": activation, **policy}
    if freeze is not None:
        policy["freeze"] = {"interval": NEVER, **freeze}
    qmodel = qatgraph.compile(model, policy, example_inputs=(x,))
    qatgraph.calibrate(qmodel, [x, 0.5 * x], show_progress=False)
    return qmodel.train()


def refreeze(qmodel: nn.Module, mode: str, ratio: float, interval: int = NEVER, importance: str = "layer_normalized"):
    """Re-run the freeze pass on a compiled model with another freeze config; returns the controller."""
    freeze_pass.apply(qmodel, qatgraph.Policy.from_any({"preset": "tensorrt", "freeze": {
        "mode": mode, "ratio": ratio, "interval": interval, "importance": importance}}))
    return qmodel.qatgraph_freeze


def exact_ceil(ratio: float, count: int) -> int:
    """ceil(ratio * count) for the decimal the user wrote (0.55 * 100 is 55, not 56)."""
    return math.ceil(Fraction(str(ratio)) * count)


def importance(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().flatten(1).mean(1)


def trainable_mask(layer) -> torch.Tensor:
    mask = torch.zeros(layer.num_rows, dtype=torch.bool)
    mask[slice(None) if layer.rows is None else layer.rows] = True
    return mask


def set_row_importances(linear: nn.Linear, values: torch.Tensor, generator: torch.Generator) -> None:
    """Rows with mean |w| = values but random signs (mean w near 0: a signed mean would rank wrongly)."""
    signs = torch.where(torch.rand(linear.weight.shape, generator=generator) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        linear.weight.copy_(signs * values[:, None])


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


# --------------------------------------------------------------------------------------- gradients
LEARNABLE_SCALES = {"weight": {"learnable_scale": True}, "activation": {"learnable_scale": True}}


def frozen_and_reference(model: nn.Module, freeze: dict, **policy) -> tuple[nn.Module, nn.Module]:
    """The same FP model compiled with and without freezing, with identical weights and scales."""
    reference = compile_model(model, **policy)
    frozen = compile_model(model, freeze, **policy)
    frozen.load_state_dict(reference.state_dict())  # same keys (tested below): same calibration
    return frozen, reference


def gradients(qmodel: nn.Module, x: torch.Tensor, upstream: torch.Tensor, run=None) -> tuple[dict, torch.Tensor]:
    """Parameter and input gradients of ``(run(x) * upstream).sum()``; ``run`` defaults to the model
    (pass its torch.compile wrapper to differentiate through the compiled graph)."""
    x = x.clone().requires_grad_()
    qmodel.zero_grad(set_to_none=True)
    ((qmodel if run is None else run)(x) * upstream).sum().backward()
    return {name: p.grad for name, p in qmodel.named_parameters()}, x.grad


def row_mask_of(controller, parameter_name: str) -> torch.Tensor | None:
    """Trainable-row mask when the parameter is a frozen layer's weight or learnable weight scale."""
    for layer in controller.layers:
        if parameter_name in (f"{layer.name}.weight", f"{layer.name}.weight_quantizer.scale"):
            return trainable_mask(layer)
    return None


@pytest.mark.parametrize("model_class", [ConvNet, TokenNet])
@pytest.mark.parametrize("mode, ratio, learnable", [("cwpl", 0.3, False), ("cwpn", 0.05, True), ("cwpn", 0.4, False),
                                                    ("lwpn", 0.5, False)])
def test_gradients_equal_the_unfrozen_model_with_frozen_rows_zeroed(model_class, mode, ratio, learnable):
    frozen, reference = frozen_and_reference(model_class(), {"mode": mode, "ratio": ratio},
                                             **(LEARNABLE_SCALES if learnable else {}))
    controller = frozen.qatgraph_freeze
    assert 0 < controller.trainable_rows < controller.total_rows
    x = torch.randn(*INPUTS[model_class])
    upstream = torch.randn(x.shape[0], 8)
    expected, expected_input_grad = gradients(reference, x, upstream)
    actual, input_grad = gradients(frozen, x, upstream)
    torch.testing.assert_close(input_grad, expected_input_grad)
    assert_frozen_rows_zeroed(controller, actual, expected)


def assert_frozen_rows_zeroed(controller, actual: dict, expected: dict) -> None:
    """Every gradient equals the unfrozen one, except frozen weight rows / weight-scale entries: zero
    (or no gradient at all for a layer with no trainable row: LWPN, or CWPL/CWPN giving it none)."""
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        mask = row_mask_of(controller, name)
        want = expected[name]
        if mask is not None:
            if grad is None:
                assert not mask.any(), f"{name}: a layer with trainable rows got no gradient"
                continue
            assert not grad[~mask].any(), f"{name}: frozen rows got a gradient"
            want = want.clone()
            want[~mask] = 0
        torch.testing.assert_close(grad, want, msg=lambda m, name=name: f"{name}: {m}")


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


# -------------------------------------------------------------------------------------- optimizers
OPTIMIZERS = {
    "sgd_momentum_nesterov_decay": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True,
                                                                  weight_decay=0.05),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.05),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
}


def train_steps(qmodel: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, steps: int,
                set_to_none: bool = True) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        qmodel(x).square().mean().backward()
        optimizer.step()


def frozen_state(controller) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return {layer.name: (trainable_mask(layer), layer.module.weight.detach().clone(),
                         layer.module.weight_quantizer.scale.detach().clone()) for layer in controller.layers}


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_frozen_rows_and_their_learnable_scales_stay_bit_identical(optimizer_name):
    qmodel = compile_model(ConvNet(), {"mode": "cwpn", "ratio": 0.3}, weight={"learnable_scale": True})
    controller = qmodel.qatgraph_freeze
    x = torch.randn(*INPUTS[ConvNet])
    optimizer = OPTIMIZERS[optimizer_name](qmodel.parameters())
    train_steps(qmodel, optimizer, x, 2)
    # New importances -> a new selection: rows trained so far now carry momentum / Adam state that
    # would keep moving them after they are frozen, unless the post-step hook restores them.
    with torch.no_grad():
        for layer in controller.layers:
            layer.module.weight.mul_(torch.rand(layer.num_rows, *[1] * (layer.module.weight.dim() - 1)) + 0.5)
    controller.refresh()
    before = frozen_state(controller)
    train_steps(qmodel, optimizer, x, 3)
    scales_moved = False
    for name, (mask, weight, scale) in before.items():
        module = qmodel.get_submodule(name)
        assert torch.equal(module.weight[~mask], weight[~mask]), f"{name}: frozen weight rows moved"
        assert torch.equal(module.weight_quantizer.scale[~mask], scale[~mask]), f"{name}: frozen scales moved"
        if mask.any():
            moved = (module.weight[mask] != weight[mask]).flatten(1).any(1)
            assert moved.all(), f"{name}: trainable rows {mask.nonzero().flatten()[~moved].tolist()} did not move"
            scales_moved |= bool((module.weight_quantizer.scale[mask] != scale[mask]).any())
    assert scales_moved, "learnable scales of trainable rows train"


def test_lwpn_frozen_layers_stay_identical_with_momentum_and_kept_zero_grads():
    qmodel = compile_model(ConvNet(), {"mode": "lwpn", "ratio": 1.0})
    x = torch.randn(*INPUTS[ConvNet])
    optimizer = OPTIMIZERS["sgd_momentum_nesterov_decay"](qmodel.parameters())
    train_steps(qmodel, optimizer, x, 2)  # every layer trains: momentum everywhere
    controller = refreeze(qmodel, "lwpn", 0.3)
    before = frozen_state(controller)
    # zero_grad(set_to_none=False) keeps a zero .grad on frozen weights, so SGD does not skip them:
    # momentum and weight decay would move them unless the post-step hook restores them.
    train_steps(qmodel, optimizer, x, 2, set_to_none=False)
    frozen_layers = [layer for layer in controller.layers if layer.rows is not None]
    assert frozen_layers and len(frozen_layers) < len(controller.layers)
    for layer in frozen_layers:
        assert not layer.module.weight.requires_grad and not layer.module.weight.grad.any(), layer.name
        assert torch.equal(layer.module.weight, before[layer.name][1]), layer.name


# ----------------------------------------------------------------------------------------- refresh
def test_refresh_every_interval_training_samples_only():
    qmodel = compile_model(TokenNet(), {"mode": "cwpl", "ratio": 0.25, "interval": 6})
    controller = qmodel.qatgraph_freeze
    x = torch.randn(*INPUTS[TokenNet])  # 2 samples per call
    assert controller.refreshes == 1, "selected once at compile; calibration does not count"
    qmodel.eval()
    for _ in range(4):
        qmodel(x)
    qmodel.train()
    with torch.no_grad():
        for _ in range(4):
            qmodel(x)
    assert controller.refreshes == 1 and controller.samples_since_refresh == 0
    # A frozen row becomes the most important one, a trained one the least: the next refresh swaps them.
    fc1 = qmodel.get_submodule("fc1")
    rising = int((~trainable_mask(controller.layers[0])).nonzero()[0])
    falling = int(fc1.trainable_rows[0])
    with torch.no_grad():
        fc1.weight[rising] *= 100
        fc1.weight[falling] = 0
    qmodel(x)
    qmodel(x)
    assert controller.refreshes == 1 and controller.samples_since_refresh == 4
    qmodel(x)
    assert controller.refreshes == 2 and controller.samples_since_refresh == 0
    assert rising in fc1.trainable_rows.tolist() and falling not in fc1.trainable_rows.tolist()


def test_refresh_counts_samples_of_keyword_arguments():
    qmodel = compile_model(TokenNet(), {"mode": "cwpl", "ratio": 0.25, "interval": 1000})
    qmodel(x=torch.randn(5, 6, 16))
    assert qmodel.qatgraph_freeze.samples_since_refresh == 5


# -------------------------------------------------------------------------- checkpoints and summary
def test_state_dict_matches_unfrozen_model_and_loads_into_the_float_model():
    model = ConvNet()
    frozen, reference = frozen_and_reference(model, {"mode": "cwpn", "ratio": 0.1})
    frozen_state_dict, reference_state_dict = frozen.state_dict(), reference.state_dict()
    assert list(frozen_state_dict) == list(reference_state_dict)
    assert all(frozen_state_dict[k].shape == reference_state_dict[k].shape for k in frozen_state_dict)
    float_model = ConvNet()
    result = float_model.load_state_dict(frozen_state_dict, strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all("quantizer" in key for key in result.unexpected_keys)
    assert torch.equal(float_model.depthwise.weight, frozen.get_submodule("depthwise").weight)


def test_summary_shows_the_frozen_rows_of_each_layer():
    qmodel = compile_model(ConvNet(), {"mode": "cwpl", "ratio": 0.25})
    layers = {layer.name: layer for layer in qmodel.qatgraph_freeze.layers}
    rows = qatgraph.summary(qmodel, print_table=False).rows
    assert {row.layer for row in rows} == set(layers)
    for row in rows:
        trainable = exact_ceil(0.25, layers[row.layer].num_rows)
        assert row.frozen == f"{trainable}/{layers[row.layer].num_rows} rows train", row.layer
    assert re.search(r"\d+/\d+ rows train", qatgraph.summary(qmodel, print_table=False).render())
    unfrozen_rows = qatgraph.summary(compile_model(ConvNet()), print_table=False).rows
    assert all(row.frozen == "" for row in unfrozen_rows)


@pytest.mark.parametrize("float_layers", ["train", "freeze"])
def test_float_layers_train_or_freeze_and_the_summary_says_which(float_layers):
    """With min_channels 16 the tiny ``head`` (8 outputs) stays float: LWPN 0 % freezes every
    quantized layer; the float head's weight trains unless ``float_layers: freeze``."""
    freeze = {"mode": "lwpn", "ratio": 0.0, "float_layers": float_layers}
    qmodel = compile_model(ConvNet(), freeze, min_channels=16)
    controller = qmodel.qatgraph_freeze
    assert set(controller.float_layers) == {"head"} and "head" not in {layer.name for layer in controller.layers}
    assert qmodel.head.weight.requires_grad == (float_layers == "train")
    assert not any(layer.module.weight.requires_grad for layer in controller.layers)
    rows = {row.layer: row.frozen for row in qatgraph.summary(qmodel, print_table=False).rows}
    assert rows["head"] == ("float, weights frozen" if float_layers == "freeze"
                            else "float, all rows train (freeze.float_layers)")
    loss = qmodel(torch.randn(2, 16, 8, 8)).sum()
    loss.backward()
    assert (qmodel.head.weight.grad is not None) == (float_layers == "train")
    controller.remove()
    assert qmodel.head.weight.requires_grad


def test_unknown_float_layers_choice_is_named():
    with pytest.raises(qatgraph.PolicyError, match="freeze.float_layers"):
        qatgraph.Policy.from_any({"preset": "tensorrt", "freeze": {"float_layers": "frozen"}})


# ------------------------------------------------------------------- torch.compile, autocast, finetune
def test_torch_compile_aot_eager_matches_unfrozen_and_follows_refreshes():
    frozen, reference = frozen_and_reference(TokenNet(), {"mode": "cwpl", "ratio": 0.25, "interval": 4})
    controller, fc1 = frozen.qatgraph_freeze, frozen.get_submodule("fc1")
    x, upstream = torch.randn(*INPUTS[TokenNet]), torch.randn(2, 8)
    try:
        expected, expected_input_grad = gradients(reference, x, upstream, torch.compile(reference, backend="aot_eager"))
        compiled = torch.compile(frozen, backend="aot_eager")
        actual, input_grad = gradients(frozen, x, upstream, compiled)  # 2 samples counted
        torch.testing.assert_close(input_grad, expected_input_grad)
        assert_frozen_rows_zeroed(controller, actual, expected)
        old_rows = fc1.trainable_rows.clone()
        with torch.no_grad():  # the next refresh picks other rows
            fc1.weight[old_rows] *= 0.01
        actual, _ = gradients(frozen, x, upstream, compiled)  # 4 samples: refreshes before this forward
        assert controller.refreshes == 2 and not set(old_rows.tolist()) & set(fc1.trainable_rows.tolist())
        nonzero_rows = actual["fc1.weight"].abs().sum(1).nonzero().flatten()
        assert nonzero_rows.numel() > 0 and set(nonzero_rows.tolist()) <= set(fc1.trainable_rows.tolist())
    finally:
        torch._dynamo.reset()


def test_cpu_bf16_autocast_keeps_frozen_rows_gradient_free():
    qmodel = compile_model(ConvNet(), {"mode": "cwpn", "ratio": 0.3})
    x, upstream = torch.randn(*INPUTS[ConvNet]), torch.randn(2, 8)
    expected, _ = gradients(qmodel, x, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, _ = gradients(qmodel, x, upstream)
    for layer in qmodel.qatgraph_freeze.layers:
        grad, want, mask = actual[f"{layer.name}.weight"], expected[f"{layer.name}.weight"], trainable_mask(layer)
        if grad is None:  # no trainable row in this layer: no weight gradient at all
            assert not mask.any(), layer.name
            continue
        assert grad.dtype == torch.float32 and not grad[~mask].any(), layer.name
        error = (grad[mask] - want[mask]).norm()
        assert error <= 0.05 * want[mask].norm() + 1e-6, f"{layer.name}: bf16 gradient error {error:.3g}"


def test_finetune_with_a_freezing_policy_keeps_frozen_rows_identical():
    qmodel = compile_model(ConvNet(), {"mode": "cwpn", "ratio": 0.2}, weight={"learnable_scale": True})
    controller = qmodel.qatgraph_freeze
    loader = [(torch.randn(*INPUTS[ConvNet]), torch.randint(0, 8, (2,))) for _ in range(3)]
    before = frozen_state(controller)
    history = finetune(qmodel, loader, F.cross_entropy, epochs=1, base_lr=5.0, show_progress=False)
    assert math.isfinite(history.final["train_loss"])
    moved = False
    for name, (mask, weight, scale) in before.items():
        module = qmodel.get_submodule(name)
        assert torch.equal(module.weight[~mask], weight[~mask]), name
        assert torch.equal(module.weight_quantizer.scale[~mask], scale[~mask]), name
        moved |= bool((module.weight[mask] != weight[mask]).any())
    assert moved, "trainable rows train"


class UntraceableRoot(nn.Module):
    """Data-dependent control flow at the root: compile traces only ``inner``, the root stays eager."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ConvNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x if x.sum() > 0 else -x)


@pytest.mark.parametrize("model_class", [
    ConvNet,
    UntraceableRoot,
])
def test_deepcopy_of_a_frozen_model_keeps_frozen_rows_identical_and_counts_samples(model_class):
    original = compile_model(model_class(), {"mode": "cwpn", "ratio": 0.2, "interval": 1000},
                             input_shape=INPUTS[ConvNet])
    qmodel = copy.deepcopy(original)
    controller = qmodel.qatgraph_freeze
    assert controller is not original.qatgraph_freeze
    assert all(layer.module is qmodel.get_submodule(layer.name) for layer in controller.layers)
    before = frozen_state(controller)
    optimizer = OPTIMIZERS["sgd_momentum_nesterov_decay"](qmodel.parameters())
    train_steps(qmodel, optimizer, torch.randn(*INPUTS[ConvNet]), 2)
    assert controller.samples_since_refresh == 4 and original.qatgraph_freeze.samples_since_refresh == 0
    for name, (mask, weight, _) in before.items():
        assert torch.equal(qmodel.get_submodule(name).weight[~mask], weight[~mask]), name


@pytest.mark.parametrize("model_class", [
    ConvNet,
    UntraceableRoot,
])
def test_remove_on_a_deepcopy_stops_freezing(model_class):
    qmodel = copy.deepcopy(compile_model(model_class(), {"mode": "cwpn", "ratio": 0.2, "interval": 4},
                                         input_shape=INPUTS[ConvNet]))
    controller = qmodel.qatgraph_freeze
    controller.remove()
    for _ in range(3):
        qmodel(torch.randn(*INPUTS[ConvNet]))
    assert controller.refreshes == 1
    assert all(layer.module.trainable_rows is None for layer in controller.layers)
