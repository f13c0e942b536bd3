"""EfQAT on functional weights: ``nn.MultiheadAttention``'s in-projection (packed self-attention,
packed weight read in three row slices, separate q/k/v weights), Swin-style ``F.linear(x,
self.qkv.weight)``, and ``F.conv2d`` / ``F.conv_transpose2d`` / ``F.linear`` / ``x @ w`` on
parameters of the model.

What is checked, each against an independent expectation:
* gradients — a compiled+frozen model's gradients equal those of the same compiled model without
  freezing, with the frozen rows (on each weight's output axis) zeroed; a weight with no
  trainable row gets no gradient at all (LWPN, ratio 0 included);
* work — backward FLOPs drop by exactly the frozen rows' weight-gradient FLOPs of each op;
* optimizers — frozen rows and their learnable scale entries stay bit-identical through SGD
  (momentum, Nesterov, weight decay) and AdamW steps, trainable rows move;
* summary rows, ``float_layers``, ``state_dict`` keys, calibration, ``.to(float64)``, deepcopy,
  ``remove()``; the ONNX export, ``torch.compile``, shared parameters and the training recipe are in
  test_freeze_functional_integration.py (cases and helpers: freeze_functional_cases.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from freeze_functional_cases import (
    CASES,
    FUNCTIONAL,
    OPTIMIZERS,
    assert_frozen_rows_identical,
    assert_frozen_rows_zeroed,
    compile_case,
    frozen_and_reference,
    frozen_state,
    functional_layers,
    gradients,
    row_masks,
    train_steps,
    trainable_mask,
)
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import qatgraph
from qatgraph.efqat.functional import masked_call


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_functional_weight_is_managed_on_its_output_axis(case):
    qmodel, _ = compile_case(case, {"mode": "cwpl", "ratio": 0.25})
    layers = functional_layers(qmodel)
    assert {name: (layer.num_rows, layer.axis) for name, layer in layers.items()} == FUNCTIONAL[case]
    assert qmodel.qatgraph_freeze.unmanaged == {}
    for name, layer in layers.items():
        # CWPL: ceil(25 %) of each weight's rows, the largest mean |w| over the other axes
        if not layer.partial_ok:
            assert layer.rows is None, f"{name}: no masked op for it, so all its rows train in CWPL"
            continue
        scores = layer.weight.detach().abs().movedim(layer.axis, 0).flatten(1).mean(1)
        expected = torch.topk(scores, -(-layer.num_rows // 4)).indices.sort().values
        assert torch.equal(layer.rows.cpu(), expected), name
    assert {layer.partial_ok for layer in layers.values()} == ({True, False} if case == "functional_ops" else {True})


# --------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode, ratio", [("cwpl", 0.3), ("cwpn", 0.3), ("lwpn", 0.5), ("lwpn", 0.0)])
def test_gradients_equal_full_qat_with_frozen_rows_zeroed(case, mode, ratio):
    frozen, reference, example = frozen_and_reference(case, {"mode": mode, "ratio": ratio})
    layers = functional_layers(frozen)
    counts = [int(trainable_mask(layer).sum()) for layer in layers.values()]
    if ratio == 0.0:
        assert counts == [0] * len(layers)
        assert not any(layer.weight.requires_grad for layer in frozen.qatgraph_freeze.layers)
    elif mode != "lwpn":
        assert any(0 < count < layer.num_rows for count, layer in zip(counts, layers.values())), \
            "some functional weight trains part of its rows"
    upstream = torch.randn(reference(*example).shape)
    expected, expected_input_grads = gradients(reference, example, upstream)
    actual, input_grads = gradients(frozen, example, upstream)
    for got, want in zip(input_grads, expected_input_grads):
        torch.testing.assert_close(got, want)
    assert_frozen_rows_zeroed(row_masks(frozen), actual, expected)


@pytest.mark.parametrize("mode, ratio", [("cwpl", 0.25), ("cwpn", 0.3), ("lwpn", 0.5)])
def test_backward_skips_exactly_the_frozen_rows_weight_gradient_flops(mode, ratio):
    frozen, reference, (x,) = frozen_and_reference("functional_ops", {"mode": mode, "ratio": ratio})
    tokens = 2 * 12 * 12
    dw_flops = {  # each op's weight-gradient FLOPs per row of its weight
        "conv_w": conv_flop_count([2, 8, 6, 6], [24, 8, 3, 3], [2, 24, 6, 6]) // 24,
        "up_w": conv_flop_count([2, 24, 12, 12], [24, 16, 2, 2], [2, 16, 6, 6], transposed=True) // 16,
        "fc_w": 2 * tokens * 16,
        "mm_w": 2 * tokens * 32,
    }
    layers = functional_layers(frozen)
    saved = sum(dw_flops[name] * int((~trainable_mask(layer)).sum()) for name, layer in layers.items())
    assert saved > 0

    def backward_flops(qmodel):
        loss = qmodel(x).square().sum()
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        return counter.get_total_flops()

    assert backward_flops(frozen) == backward_flops(reference) - saved


# -------------------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("case, mode", [("vit_mha_packed", "cwpn"), ("mha_packed_slices", "cwpl"),
                                        ("mha_separate", "cwpn"), ("swin_f_linear", "cwpl"),
                                        ("functional_ops", "cwpn"), ("vit_mha_packed", "lwpn")])
def test_frozen_rows_and_learnable_scales_stay_bit_identical(case, mode, optimizer_name):
    qmodel, example = compile_case(case, {"mode": mode, "ratio": 0.3}, weight={"learnable_scale": True})
    optimizer = OPTIMIZERS[optimizer_name](qmodel.parameters())
    train_steps(qmodel, optimizer, example, 2)
    # a new selection: rows trained so far carry momentum / Adam state that would move them once frozen
    with torch.no_grad():
        for layer in qmodel.qatgraph_freeze.layers:
            factors = torch.rand(layer.num_rows) + 0.5
            layer.weight.movedim(layer.axis, 0).mul_(factors.view(-1, *[1] * (layer.weight.dim() - 1)))
    qmodel.qatgraph_freeze.refresh()
    before = frozen_state(qmodel)
    assert any(0 < mask.sum() < mask.numel() or mode == "lwpn" and not mask.any()
               for name, (_, mask, _, _) in before.items() if name in FUNCTIONAL[case])
    train_steps(qmodel, optimizer, example, 3)
    assert_frozen_rows_identical(before)


def test_float64_model_keeps_frozen_rows_and_masked_gradients():
    qmodel, example = compile_case("mha_packed_slices", {"mode": "cwpn", "ratio": 0.3})
    qmodel.to(torch.float64)
    example = tuple(x.double() for x in example)
    layer = functional_layers(qmodel)["attn.in_proj"]
    assert layer.holder.efqat_weight_snapshot.dtype == torch.float64
    assert layer.holder.trainable_rows.dtype == torch.int64
    grads, _ = gradients(qmodel, example, torch.ones(2, 16, dtype=torch.float64))
    mask = trainable_mask(layer)
    assert grads["attn.in_proj_weight"].dtype == torch.float64
    assert not grads["attn.in_proj_weight"][~mask].any() and grads["attn.in_proj_weight"][mask].any()
    before = frozen_state(qmodel)
    train_steps(qmodel, OPTIMIZERS["sgd_momentum_nesterov_decay"](qmodel.parameters()), example, 2)
    assert_frozen_rows_identical(before)


def test_deepcopy_trains_its_own_frozen_rows_and_leaves_the_original_alone():
    original, example = compile_case("vit_mha_packed", {"mode": "cwpn", "ratio": 0.2})
    qmodel = copy.deepcopy(original)
    copied = functional_layers(qmodel)
    assert all(layer.holder is qmodel.get_submodule(layer.holder_name) for layer in copied.values())
    untouched = {name: p.detach().clone() for name, p in original.named_parameters()}
    before = frozen_state(qmodel)
    train_steps(qmodel, OPTIMIZERS["sgd_momentum_nesterov_decay"](qmodel.parameters()), example, 2)
    assert_frozen_rows_identical(before)
    assert all(torch.equal(p, untouched[name]) for name, p in original.named_parameters())


# -------------------------------------------------------------------------- summary, checkpoints, export
@pytest.mark.parametrize("case", ["mha_packed_slices", "swin_f_linear"])
def test_summary_shows_the_frozen_rows_of_functional_ops(case):
    qmodel, _ = compile_case(case, {"mode": "cwpl", "ratio": 0.25})
    by_quantizer = {layer.holder_name: layer for layer in functional_layers(qmodel).values()}
    decisions = {d.layer: d for d in qmodel.qatgraph_info.layers}
    rows = qatgraph.summary(qmodel, print_table=False).rows
    functional_rows = [row for row in rows if decisions[row.layer].functional_weight_quantizer is not None]
    # every functional row names its weight's state (the three ops on the packed weight share it)
    assert len(functional_rows) == (3 if case == "mha_packed_slices" else 6)
    for row in functional_rows:
        layer = by_quantizer[decisions[row.layer].functional_weight_quantizer]
        assert row.frozen == f"{-(-layer.num_rows // 4)}/{layer.num_rows} rows train", row.layer


@pytest.mark.parametrize("float_layers", ["train", "freeze"])
def test_float_functional_weights_train_or_freeze_with_float_layers(float_layers):
    """A skipped in-projection stays float; a quantized Swin ``qkv`` (an uncalled nn.Linear holding
    the weight) is a managed weight, never a float layer."""
    qmodel, _ = compile_case("vit_mha_packed", {"mode": "lwpn", "ratio": 0.0, "float_layers": float_layers},
                             skip=["layers.0.self_attention.in_proj"])
    controller = qmodel.qatgraph_freeze
    assert "layers.0.self_attention.in_proj" in controller.float_layers
    assert "layers.1.self_attention.in_proj" in functional_layers(qmodel)
    assert qmodel.get_submodule("layers.0.self_attention").in_proj_weight.requires_grad == (float_layers == "train")
    rows = {row.layer: row.frozen for row in qatgraph.summary(qmodel, print_table=False).rows}
    state = "float, weights frozen" if float_layers == "freeze" else "float, all rows train (freeze.float_layers)"
    assert rows["layers.0.self_attention.in_proj"] == state
    swin, _ = compile_case("swin_f_linear", {"mode": "lwpn", "ratio": 0.0, "float_layers": "freeze"})
    assert not any(".attn." in name for name in swin.qatgraph_freeze.float_layers)
    # a float packed in-projection read in three slices: each slice's row names the weight's state
    sliced, _ = compile_case("mha_packed_slices", {"mode": "lwpn", "ratio": 0.0, "float_layers": float_layers},
                             overrides=[{"regex": r"attn_[qkv]_proj", "skip": True}])
    rows = {row.layer: row.frozen for row in qatgraph.summary(sliced, print_table=False).rows}
    assert [rows[f"attn_{role}_proj"] for role in "qkv"] == [state] * 3


def test_state_dict_keys_unchanged_and_calibration_refreshes_functional_scales():
    frozen, reference, example = frozen_and_reference("mha_packed_slices", {"mode": "cwpn", "ratio": 0.3})
    assert list(frozen.state_dict()) == list(reference.state_dict())
    assert not any("efqat" in key or "trainable_rows" in key for key in frozen.state_dict())
    quantizer = functional_layers(frozen)["attn.in_proj"].quantizer
    with torch.no_grad():
        frozen.attn.in_proj_weight[5] *= 4
    before = quantizer.scale.clone()
    qatgraph.calibrate(frozen, [example], show_progress=False)
    assert quantizer.scale[5] > 3 * before[5]


def test_remove_puts_the_original_ops_back_and_every_row_trains():
    frozen, reference, example = frozen_and_reference("mha_packed_slices", {"mode": "cwpn", "ratio": 0.3})
    assert any(node.target is masked_call for node in frozen.graph.nodes)
    frozen.qatgraph_freeze.remove()
    assert not any(node.target is masked_call for node in frozen.graph.nodes)
    upstream = torch.randn(2, 16)
    expected, _ = gradients(reference, example, upstream)
    actual, _ = gradients(frozen, example, upstream)
    for name, grad in actual.items():
        torch.testing.assert_close(grad, expected[name], msg=lambda m, name=name: f"{name}: {m}")
