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
  ``remove()``, ``torch.compile``, and the ONNX export (identical to the unfrozen model's,
  lint-clean, ONNX Runtime parity).
"""
from __future__ import annotations

import copy
import io

import models_arch
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import qatgraph
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.parity import check_parity
from qatgraph.efqat.functional import masked_call

NEVER = 10**9


# ------------------------------------------------------------------------------------------ models
class CrossAttention(nn.Module):
    """nn.MultiheadAttention on a query and a memory: with ``kdim`` None the packed in-projection is
    read in three row slices (q on x, k and v on memory); with ``kdim`` the q/k/v weights are separate."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, kdim=kdim, vdim=kdim)
        self.out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x, memory, memory, need_weights=False)[0]).mean(1)


class FunctionalOps(nn.Module):
    """A parameter read by each functional op kind: F.conv2d (rows on axis 0), F.conv_transpose2d
    (axis 1; no masked op: frozen whole or not at all), F.linear (axis 0) and x @ w (axis 1 of [K, N])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_w = nn.Parameter(torch.randn(24, 8, 3, 3) * 0.2)
        self.conv_b = nn.Parameter(torch.zeros(24))
        self.up_w = nn.Parameter(torch.randn(24, 16, 2, 2) * 0.2)
        self.fc_w = nn.Parameter(torch.randn(32, 16) * 0.2)
        self.mm_w = nn.Parameter(torch.randn(32, 40) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.conv_w, self.conv_b, padding=1))
        x = F.conv_transpose2d(x, self.up_w, stride=2).flatten(2).transpose(1, 2)
        x = F.gelu(F.linear(x, self.fc_w))
        return (x @ self.mm_w).mean(1)


def _images(batch: int = 2) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)


CASES = {
    "vit_mha_packed": (models_arch.VitMha, _images),
    "mha_packed_slices": (CrossAttention, lambda batch=2: (torch.randn(batch, 5, 32), torch.randn(batch, 7, 32))),
    "mha_separate": (lambda: CrossAttention(kdim=24), lambda batch=2: (torch.randn(batch, 5, 32),
                                                                        torch.randn(batch, 7, 24))),
    "swin_f_linear": (models_arch.SwinLike, _images),
    "functional_ops": (FunctionalOps, lambda batch=2: (torch.randn(batch, 8, 6, 6),)),
}
#: the functional weights each case holds: name -> (rows, axis)
FUNCTIONAL = {
    "vit_mha_packed": {f"layers.{i}.self_attention.in_proj": (192, 0) for i in range(2)},
    "mha_packed_slices": {"attn.in_proj": (96, 0)},
    "mha_separate": {f"attn.{role}_proj": (32, 0) for role in "qkv"},
    "swin_f_linear": {**{f"stage1.{i}.attn.{op}": (rows, 0) for i in range(2)
                         for op, rows in (("qkv", 96), ("proj", 32))},
                      "stage2.0.attn.qkv": (192, 0), "stage2.0.attn.proj": (64, 0)},
    "functional_ops": {"conv_w": (24, 0), "up_w": (16, 1), "fc_w": (32, 0), "mm_w": (40, 1)},
}


# ----------------------------------------------------------------------------------------- helpers
def compile_case(case: str, freeze: dict | None = None, seed: int = 0, **policy) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    build, inputs = CASES[case]
    model, example = build(), inputs()
    activation = {"calibrator": "max", **policy.pop("activation", {})}
    policy = {"preset": "tensorrt", "min_channels": 0, "activation": activation, **policy}
    if freeze is not None:
        policy["freeze"] = {"interval": NEVER, **freeze}
    qmodel = qatgraph.compile(model, policy, example_inputs=example)
    qatgraph.calibrate(qmodel, [example, inputs()], show_progress=False)
    return qmodel.train(), example


def frozen_and_reference(case: str, freeze: dict, **policy) -> tuple[nn.Module, nn.Module, tuple]:
    reference, example = compile_case(case, **copy.deepcopy(policy))
    frozen, _ = compile_case(case, freeze, **policy)
    frozen.load_state_dict(reference.state_dict())
    frozen.qatgraph_freeze.refresh()  # rank the loaded weights
    return frozen, reference, example


def trainable_mask(layer) -> torch.Tensor:
    mask = torch.zeros(layer.num_rows, dtype=torch.bool)
    mask[slice(None) if layer.rows is None else layer.rows.cpu()] = True
    return mask


def row_masks(qmodel: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Parameter name -> (trainable-row mask, row axis) of every weight and learnable weight scale
    the controller manages."""
    names = {id(p): name for name, p in qmodel.named_parameters()}
    masks = {}
    for layer in qmodel.qatgraph_freeze.layers:
        masks[names[id(layer.weight)]] = (trainable_mask(layer), layer.axis)
        scale = layer.quantizer.scale
        if isinstance(scale, nn.Parameter) and scale.numel() == layer.num_rows:
            masks[names[id(scale)]] = (trainable_mask(layer), 0)
    return masks


def functional_layers(qmodel: nn.Module) -> dict:
    return {layer.name: layer for layer in qmodel.qatgraph_freeze.layers if layer.functional_quantizer is not None}


def gradients(qmodel: nn.Module, inputs: tuple, upstream: torch.Tensor, run=None) -> tuple[dict, list]:
    inputs = [x.clone().requires_grad_() for x in inputs]
    qmodel.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both models
    ((qmodel if run is None else run)(*inputs) * upstream).sum().backward()
    return {name: p.grad for name, p in qmodel.named_parameters()}, [x.grad for x in inputs]


def assert_frozen_rows_zeroed(masks: dict, actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        want = expected[name]
        if name in masks:
            mask, axis = masks[name]
            if grad is None:
                assert not mask.any(), f"{name}: a weight with trainable rows got no gradient"
                continue
            assert not grad.movedim(axis, 0)[~mask].any(), f"{name}: frozen rows got a gradient"
            want = want.clone()
            want.movedim(axis, 0)[~mask] = 0
        torch.testing.assert_close(grad, want, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------- discovery
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
OPTIMIZERS = {
    "sgd_momentum_nesterov_decay": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True,
                                                                  weight_decay=0.05),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
}


def frozen_state(qmodel: nn.Module) -> dict:
    return {layer.name: (layer, trainable_mask(layer), layer.weight.detach().clone(),
                         layer.quantizer.scale.detach().clone()) for layer in qmodel.qatgraph_freeze.layers}


def train_steps(qmodel: nn.Module, optimizer, example: tuple, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        qmodel(*example).square().mean().backward()
        optimizer.step()


def assert_frozen_rows_identical(before: dict, require_moves: bool = True) -> None:
    for name, (layer, mask, weight, scale) in before.items():
        now = layer.weight.detach().movedim(layer.axis, 0)
        assert torch.equal(now[~mask], weight.movedim(layer.axis, 0)[~mask]), f"{name}: frozen rows moved"
        if scale.numel() == layer.num_rows:
            assert torch.equal(layer.quantizer.scale[~mask], scale[~mask]), f"{name}: frozen scales moved"
        if require_moves and mask.any():
            moved = (now[mask] != weight.movedim(layer.axis, 0)[mask]).flatten(1).any(1)
            assert moved.all(), f"{name}: trainable rows did not move"


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
    assert rows["layers.0.self_attention.in_proj"] == ("float, weights frozen" if float_layers == "freeze"
                                                       else "float, all rows train (freeze.float_layers)")
    swin, _ = compile_case("swin_f_linear", {"mode": "lwpn", "ratio": 0.0, "float_layers": "freeze"})
    assert not any(".attn." in name for name in swin.qatgraph_freeze.float_layers)


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


@pytest.mark.parametrize("case", ["vit_mha_packed", "mha_packed_slices", "swin_f_linear"])
def test_export_is_the_unfrozen_models_lint_clean_with_parity(case, tmp_path):
    """Default tensorrt policy (tiny layers float: no lint warning), a few training steps first."""
    torch.manual_seed(0)
    build, inputs = CASES[case]
    example = inputs()
    policy = {"preset": "tensorrt", "activation": {"calibrator": "max"}}
    reference = qatgraph.compile(build(), policy, example_inputs=example)
    qatgraph.calibrate(reference, [example], show_progress=False)
    frozen = qatgraph.compile(build(), {**policy, "freeze": {"mode": "cwpn", "ratio": 0.3, "interval": NEVER}},
                              example_inputs=example)
    frozen.load_state_dict(reference.state_dict())
    frozen.train()
    train_steps(frozen, torch.optim.SGD(frozen.parameters(), lr=0.01, momentum=0.9), example, 2)
    reference.load_state_dict(frozen.state_dict())  # the same trained weights and scales
    assert any(layer.rows is not None for layer in functional_layers(frozen).values())
    graphs = {}
    for name, qmodel in (("reference", reference), ("frozen", frozen)):
        path = str(tmp_path / f"{name}.onnx")
        result = export_onnx(qmodel, path, example)
        assert result.errors == [] and result.warnings == [], [(f.rule, f.node) for f in result.findings]
        graphs[name] = onnx.load(path).graph
        if name == "frozen":
            parity = check_parity(qmodel, path, [inputs(3)])
            assert parity.passed, str(parity)
    assert graphs["frozen"].SerializeToString() == graphs["reference"].SerializeToString()


def test_torch_compile_aot_eager_matches_the_eager_frozen_model():
    frozen, _, example = frozen_and_reference("mha_packed_slices", {"mode": "cwpl", "ratio": 0.3})
    upstream = torch.randn(2, 16)
    expected, _ = gradients(frozen, example, upstream)
    try:
        actual, _ = gradients(frozen, example, upstream, torch.compile(frozen, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    for name, grad in actual.items():
        torch.testing.assert_close(grad, expected[name], msg=lambda m, name=name: f"{name}: {m}")
    assert not actual["attn.in_proj_weight"][~trainable_mask(functional_layers(frozen)["attn.in_proj"])].any()


class SharedWeight(nn.Module):
    """``w`` feeds a quantized F.linear and, unquantized, a second product: EfQAT leaves it alone."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 16) * 0.2)
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.linear(x, self.w)) + x * self.w.mean(0)


def test_a_parameter_that_also_feeds_an_unquantized_op_trains_in_full_and_the_summary_says_so():
    CASES["shared"] = (SharedWeight, lambda batch=2: (torch.randn(batch, 6, 16),))
    try:
        frozen, reference, example = frozen_and_reference("shared", {"mode": "cwpl", "ratio": 0.25})
    finally:
        del CASES["shared"]
    controller = frozen.qatgraph_freeze
    assert functional_layers(frozen) == {} and [layer.name for layer in controller.layers] == ["fc"]
    assert controller.unmanaged == {"w": "all rows train: its parameter also feeds an op outside the quantized one"}
    rows = {row.layer: row.frozen for row in qatgraph.summary(frozen, print_table=False).rows}
    assert rows["w"] == controller.unmanaged["w"]
    upstream = torch.randn(2, 6, 16)
    expected, _ = gradients(reference, example, upstream)
    actual, _ = gradients(frozen, example, upstream)
    torch.testing.assert_close(actual["w"], expected["w"])
    assert_frozen_rows_zeroed(row_masks(frozen), actual, expected)


@pytest.mark.slow
def test_dynamo_export_graph_is_the_unfrozen_models(tmp_path):
    """opset 18 (torch.export + onnxscript): nodes, initializers, inputs and outputs identical; only
    the exported program's signature note differs (it lists the Conv/Linear layers' EfQAT buffers)."""
    torch.manual_seed(0)
    build, inputs = CASES["mha_packed_slices"]
    example = inputs()
    policy = {"preset": "tensorrt", "activation": {"calibrator": "max"}}
    reference = qatgraph.compile(build(), policy, example_inputs=example)
    qatgraph.calibrate(reference, [example], show_progress=False)
    frozen = qatgraph.compile(build(), {**policy, "freeze": {"mode": "cwpn", "ratio": 0.3, "interval": NEVER}},
                              example_inputs=example)
    frozen.load_state_dict(reference.state_dict())
    assert functional_layers(frozen)["attn.in_proj"].rows is not None
    graphs = []
    for name, qmodel in (("reference", reference), ("frozen", frozen)):
        path = str(tmp_path / f"{name}.onnx")
        result = export_onnx(qmodel, path, example, opset=18)
        assert result.exporter == "dynamo" and result.errors == [] and result.warnings == []
        graphs.append(onnx.load(path).graph)
    for field in ("node", "initializer", "input", "output", "value_info"):
        assert [item.SerializeToString() for item in getattr(graphs[0], field)] == \
            [item.SerializeToString() for item in getattr(graphs[1], field)], field


def test_refreezing_with_another_mode_rewrites_the_graph_once_and_keeps_gradients_right():
    from qatgraph.passes import freeze as freeze_pass

    frozen, reference, example = frozen_and_reference("mha_packed_slices", {"mode": "cwpn", "ratio": 0.3})
    upstream = torch.randn(2, 16)
    expected, _ = gradients(reference, example, upstream)
    for mode, ratio in (("lwpn", 0.0), ("cwpl", 0.25), ("cwpn", 0.5)):
        freeze_pass.apply(frozen, qatgraph.Policy.from_any({"preset": "tensorrt", "freeze": {
            "mode": mode, "ratio": ratio, "interval": NEVER}}))
        assert sum(node.target is masked_call for node in frozen.graph.nodes) == 3  # the q, k and v slices
        actual, _ = gradients(frozen, example, upstream)
        assert_frozen_rows_zeroed(row_masks(frozen), actual, expected)


def test_cpu_bf16_autocast_keeps_frozen_rows_gradient_free():
    """Under autocast the masked ops cast like F.linear: the trainable rows' gradients are the
    unfrozen model's under the same autocast."""
    frozen, reference, example = frozen_and_reference("mha_packed_slices", {"mode": "cwpn", "ratio": 0.3})
    upstream = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = gradients(reference, example, upstream)
        actual, _ = gradients(frozen, example, upstream)
    assert actual["attn.in_proj_weight"].dtype == torch.float32
    assert_frozen_rows_zeroed(row_masks(frozen), actual, expected)


def test_state_buffer_names_name_real_buffers_for_ddp_to_skip():
    """DDP is told to leave EfQAT's buffers out of its broadcast by qualified name."""
    qmodel, _ = compile_case("mha_packed_slices", {"mode": "cwpn", "ratio": 0.3})
    for layer in qmodel.qatgraph_freeze.layers:
        for name in layer.buffer_names:
            holder, _, buffer = name.rpartition(".")
            assert buffer in qmodel.get_submodule(holder)._buffers, name
    names = functional_layers(qmodel)["attn.in_proj"].buffer_names
    assert {"attn.in_proj_weight_quantizer.trainable_rows_0_32", "attn.in_proj_weight_quantizer.efqat_frozen_rows"} \
        <= set(names)


def test_a_frozen_model_round_trips_through_its_state_dict():
    """A whole pickled compiled model refuses to load (qatgraph/graph/reload.py); its state_dict
    loads into the model compiled again, with the same frozen rows after the same refresh."""
    qmodel, example = compile_case("mha_packed_slices", {"mode": "cwpn", "ratio": 0.3})
    buffer = io.BytesIO()
    torch.save(qmodel, buffer)
    buffer.seek(0)
    with pytest.raises(qatgraph.QatgraphError, match="state_dict"):
        torch.load(buffer, weights_only=False)
    again, _ = compile_case("mha_packed_slices", {"mode": "cwpn", "ratio": 0.3})
    again.load_state_dict(qmodel.state_dict())
    again.qatgraph_freeze.refresh()
    assert torch.equal(trainable_mask(functional_layers(again)["attn.in_proj"]),
                       trainable_mask(functional_layers(qmodel)["attn.in_proj"]))
    assert sum(node.target is masked_call for node in again.graph.nodes) == 3


def test_finetune_recipe_keeps_functional_frozen_rows_identical():
    from qatgraph.train.finetune import finetune

    qmodel, _ = compile_case("swin_f_linear", {"mode": "cwpn", "ratio": 0.3}, weight={"learnable_scale": True})
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    before = frozen_state(qmodel)
    history = finetune(qmodel, loader, F.cross_entropy, epochs=1, base_lr=1.0, show_progress=False)
    assert history.final["train_loss"] == history.final["train_loss"]  # not NaN
    assert_frozen_rows_identical({name: before[name] for name in FUNCTIONAL["swin_f_linear"]}, require_moves=False)
    assert any(not torch.equal(before[name][2], functional_layers(qmodel)[name].weight)
               for name in FUNCTIONAL["swin_f_linear"]), "trainable rows train"


class LayerAlsoReadFunctionally(nn.Module):
    """``fc`` is called as a layer and its weight also read by ``F.linear``: the layer's selection rules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc(x)) + F.linear(x, self.fc.weight))


def test_a_layer_weight_also_read_functionally_follows_the_layer_and_its_frozen_rows_stay():
    CASES["layer_and_functional"] = (LayerAlsoReadFunctionally, lambda batch=2: (torch.randn(batch, 6, 16),))
    try:
        qmodel, example = compile_case("layer_and_functional", {"mode": "cwpl", "ratio": 0.25})
    finally:
        del CASES["layer_and_functional"]
    controller = qmodel.qatgraph_freeze
    assert [layer.name for layer in controller.layers] == ["fc", "head"] and functional_layers(qmodel) == {}
    before = frozen_state(qmodel)
    train_steps(qmodel, OPTIMIZERS["sgd_momentum_nesterov_decay"](qmodel.parameters()), example, 2)
    assert_frozen_rows_identical(before)
