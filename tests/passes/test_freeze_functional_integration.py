"""EfQAT on functional weights, with the rest of qatgraph: the ONNX export (identical to the
unfrozen model's, lint-clean, ONNX Runtime parity), ``torch.compile``, parameters shared with other
ops or layers, re-freezing, CPU bf16 autocast, DDP buffer names, ``state_dict`` round trips and the
fine-tuning recipe (cases and helpers: freeze_functional_cases.py)."""
from __future__ import annotations

import io

import onnx
import pytest
import torch
import torch.nn.functional as F
from freeze_functional_cases import (
    CASES,
    FUNCTIONAL,
    NEVER,
    OPTIMIZERS,
    assert_frozen_rows_identical,
    assert_frozen_rows_zeroed,
    calibrated_pair,
    compile_case,
    frozen_and_reference,
    frozen_state,
    functional_layers,
    gradients,
    row_masks,
    train_steps,
    trainable_mask,
)
from torch import nn

import qatgraph
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.parity import check_parity
from qatgraph.efqat.functional import masked_call


@pytest.mark.parametrize("case", ["vit_mha_packed", "mha_packed_slices", "swin_f_linear"])
def test_export_is_the_unfrozen_models_lint_clean_with_parity(case, tmp_path):
    """Default tensorrt policy (tiny layers float: no lint warning), a few training steps first."""
    reference, frozen, example, inputs = calibrated_pair(case)
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
    reference, frozen, example, _ = calibrated_pair("mha_packed_slices")
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
