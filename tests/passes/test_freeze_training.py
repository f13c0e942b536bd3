"""The EfQAT freeze pass end to end: compile with ``freeze: {mode, ratio, interval}``, then train.

What is checked, each against an independent expectation:
* gradients — a compiled+frozen model's gradients equal those of the same compiled model without
  freezing, with the frozen rows zeroed (conv groups/stride/dilation/padding modes, depthwise,
  Conv1d, Linear on 2-D and 3-D inputs); input, bias, BN and scale gradients unchanged;
* optimizers — frozen rows and their learnable scale entries stay bit-identical through SGD
  (momentum, Nesterov, weight decay), Adam and AdamW, while trainable rows move;
* refresh counting, state_dict compatibility, summary, torch.compile, CPU bf16 autocast, finetune,
  deepcopy.
Which rows train and the backward FLOPs: test_freeze_selection.py; models and helpers: freeze_cases.py.
The op itself (qatgraph::masked_*) is tested in tests/test_partial_grad.py.
"""
from __future__ import annotations

import copy
import math
import re

import models
import pytest
import torch
import torch.nn.functional as F
from freeze_cases import (
    INPUTS,
    LEARNABLE_SCALES,
    OPTIMIZERS,
    ConvNet,
    TokenNet,
    assert_frozen_rows_zeroed,
    compile_model,
    exact_ceil,
    frozen_and_reference,
    frozen_state,
    gradients,
    refreeze,
    train_steps,
    trainable_mask,
)

import qatgraph
from qatgraph.train.finetune import finetune


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


class UntraceableRoot(models.UntraceableRoot):
    inner_class = ConvNet


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
