"""``tracing.frontend``: plain ``qatgraph.compile`` builds the graph with torch.export when torch.fx
cannot trace the whole model (issue 13 item 3), and says so; ``fx`` and ``export`` force one.

The Hugging Face test is a ``transformers.BertModel`` from a config (no download) through plain
``qatgraph.compile`` with the ``tensorrt`` preset: compile -> calibrate -> export -> lint clean ->
ONNX Runtime parity, with the weighted ops of the graph counted against the summary.
"""
from __future__ import annotations

import models_extra
import onnx
import pytest
import torch
from torch import fx, nn

import qatgraph
from qatgraph import PolicyError, TraceError, UsageError
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.parity import check_parity
from qatgraph.quant.qmodules import op_kind

pytestmark = pytest.mark.filterwarnings("ignore::qatgraph.QatgraphWarning", "ignore::torch.jit.TracerWarning",
                                       "ignore:Exporting aten.*index operator:UserWarning")


class ShapeCheck(nn.Module):
    """torch.fx cannot trace the shape check; torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError("odd width")
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class ValueBranch(ShapeCheck):
    """Neither torch.fx nor torch.export can trace a branch on a tensor's value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if y.sum() > 0:
            y = y * 2
        return self.fc(y.mean((2, 3)))


def policy(frontend: str) -> dict:
    return {"preset": "tensorrt", "tracing": {"frontend": frontend}}


def test_unknown_frontend_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match=r"tracing.frontend = 'exprot'.*auto, fx, export.*did you mean 'export'"):
        qatgraph.Policy.from_any({"preset": "tensorrt", "tracing": {"frontend": "exprot"}})


def test_auto_exports_what_fx_cannot_trace_and_says_why() -> None:
    x = torch.randn(2, 16, 8, 8)
    qmodel = qatgraph.compile(ShapeCheck(), "tensorrt", example_inputs=(x,))
    report = qmodel.trace_report
    assert report.fully_traced and report.frontend == "torch.export" and isinstance(qmodel, fx.GraphModule)
    assert "torch.fx cannot trace the whole model (ShapeCheck)" in report.describe()
    assert "if x.shape[-1] % 2" in report.describe()
    assert "traced the whole model with torch.export" in qatgraph.summary(qmodel, print_table=False).trace
    assert all(d.quantized and not d.eager for d in qmodel.qatgraph_info.layers)
    qatgraph.calibrate(qmodel, [torch.randn(4, 16, 8, 8)], show_progress=False)
    assert qmodel(torch.randn(3, 16, 12, 12)).shape == (3, 16)  # other batch and image sizes still run


def test_fx_frontend_and_no_example_inputs_trace_partially() -> None:
    x = torch.randn(2, 16, 8, 8)
    forced = qatgraph.compile(ShapeCheck(), policy("fx"), example_inputs=(x,))
    assert forced.trace_report.frontend == "torch.fx" and not forced.trace_report.fully_traced
    blind = qatgraph.compile(ShapeCheck(), "tensorrt")
    assert not blind.trace_report.fully_traced
    assert "torch.export not tried: compile got no example_inputs" in blind.trace_report.describe()


def test_auto_falls_back_to_partial_tracing_when_export_fails_too() -> None:
    qmodel = qatgraph.compile(ValueBranch(), "tensorrt", example_inputs=(torch.randn(2, 16, 8, 8),))
    report = qmodel.trace_report
    assert not report.fully_traced and report.frontend == "torch.fx"
    assert "torch.export failed too" in report.describe() and "y.sum() > 0" in report.describe()
    assert {d.layer for d in qmodel.qatgraph_info.layers if d.eager} == {"conv", "fc"}


def test_export_frontend_needs_example_inputs_and_reports_its_failure() -> None:
    with pytest.raises(UsageError, match="tracing.frontend: export needs example inputs"):
        qatgraph.compile(ShapeCheck(), policy("export"))
    with pytest.raises(TraceError, match="torch.export could not export ValueBranch"):
        qatgraph.compile(ValueBranch(), policy("export"), example_inputs=(torch.randn(2, 16, 8, 8),))
    traceable = qatgraph.compile(nn.Sequential(nn.Conv2d(16, 32, 3)), policy("export"),
                                 example_inputs=(torch.randn(2, 16, 8, 8),))
    assert traceable.trace_report.frontend == "torch.export"
    assert "tracing.frontend is 'export'" in traceable.trace_report.describe()


def test_batch_of_one_is_exported_as_a_batch_of_two() -> None:
    qmodel = qatgraph.compile(ShapeCheck(), "tensorrt", example_inputs=(torch.randn(1, 16, 8, 8),))
    assert qmodel.trace_report.frontend == "torch.export"
    assert "repeated to a batch of 2" in qmodel.trace_report.describe()
    qatgraph.calibrate(qmodel, [torch.randn(1, 16, 8, 8)], show_progress=False)
    assert qmodel(torch.randn(1, 16, 8, 8)).shape == (1, 16) and qmodel(torch.randn(5, 16, 8, 8)).shape == (5, 16)


# ---------------------------------------------------------------------------- Hugging Face BertModel
def bert_model() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=models_extra.VOCAB_SIZE, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    return BertModel(config).eval()


def token_dict(batch: int, seed: int, seq: int = models_extra.SEQUENCE_LENGTH) -> dict[str, torch.Tensor]:
    return dict(zip(("input_ids", "attention_mask"), models_extra.token_batch(batch, seq, seed)))


def graph_weighted_ops(qmodel: fx.GraphModule) -> set[str]:
    """Weighted ops in the compiled graph: Conv/Linear module calls and matmul/bmm between activations."""
    names = set()
    for node in qmodel.graph.nodes:
        if node.op == "call_module" and op_kind(qmodel.get_submodule(node.target)) is not None:
            names.add(str(node.target))
        elif node.op == "call_function" and node.target in (torch.matmul, torch.bmm):
            names.add(node.name)
    return names


def test_hf_bert_model_through_plain_compile(tmp_path) -> None:
    model = bert_model()
    example = token_dict(2, 0)
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=example)
    report = qmodel.trace_report
    assert report.fully_traced and report.frontend == "torch.export"
    assert "torch.fx cannot trace the whole model (BertModel)" in report.describe()

    batches = [token_dict(4, seed) for seed in (1, 2)]
    qatgraph.calibrate(qmodel, batches, show_progress=False)
    summary = qatgraph.summary(qmodel, print_table=False)
    # 2 layers x (Q, K, V, attention output, intermediate, output) + pooler = 13 Linear, 2 x 2 attention matmuls
    assert len(summary.rows) == len(graph_weighted_ops(qmodel)) == 17
    assert len(summary.quantized) == 17
    assert sum(row.layer.startswith("scaled_dot_product_attention") for row in summary.rows) == 4

    # The model's output structure comes back: a ModelOutput with both fields, any sequence length.
    other = token_dict(3, 5, seq=12)
    out, reference = qmodel(**other), model(**other)
    assert type(out) is type(reference) and list(out.keys()) == ["last_hidden_state", "pooler_output"]
    assert out.last_hidden_state.shape == (3, 12, 64)
    cosine = torch.cosine_similarity(out.last_hidden_state.flatten(1), reference.last_hidden_state.flatten(1))
    assert cosine.min() > 0.9, cosine

    path = str(tmp_path / "bert.onnx")
    result = export_onnx(qmodel, path, (example["input_ids"], example["attention_mask"]))
    assert result.errors == [] and result.warnings == [], [(f.rule, f.node) for f in result.findings]
    assert len(onnx.load(path).graph.output) == 2
    parity = check_parity(qmodel, path, [tuple(token_dict(3, seed).values()) for seed in (3, 4)])
    assert parity.passed, parity


class InPlaceResidual(ShapeCheck):
    """``out += shortcut`` (a downsample-style block); torch.export keeps it as ``aten.add_``."""

    def __init__(self, view_write: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(32)
        self.shortcut = nn.Conv2d(16, 32, 1)
        self.view_write = view_write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError("odd width")
        out = self.bn(self.conv(x))
        out += self.shortcut(x)
        if self.view_write:
            view = out.view(-1)
            view += 1.0  # a write through a view: must stay in place
        return self.fc(torch.relu(out).mean((2, 3)))


def test_exported_in_place_residual_add_gets_the_residual_rule(tmp_path) -> None:
    x = torch.randn(2, 16, 8, 8)
    qmodel = qatgraph.compile(InPlaceResidual().eval(), "tensorrt", example_inputs=(x,))
    assert qmodel.trace_report.frontend == "torch.export"
    targets = [node.target for node in qmodel.graph.nodes if node.op == "call_function"]
    assert torch.ops.aten.add_.Tensor not in targets
    [residual] = [node for node in qmodel.graph.nodes if node.target is torch.add]
    assert residual.meta.get("qatgraph.residual") is not None
    qatgraph.calibrate(qmodel, [torch.randn(4, 16, 8, 8)], show_progress=False)
    path = str(tmp_path / "m.onnx")
    result = export_onnx(qmodel, path, x)
    assert result.errors == [] and result.warnings == [], [(f.rule, f.node) for f in result.findings]
    assert check_parity(qmodel, path, [torch.randn(3, 16, 8, 8)]).passed


def test_exported_write_through_a_view_stays_in_place() -> None:
    model = InPlaceResidual(view_write=True).eval()
    x = torch.randn(2, 16, 8, 8)
    qmodel = qatgraph.compile(model, {"preset": "tensorrt", "quantize": []}, example_inputs=(x,))
    targets = [node.target for node in qmodel.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.aten.add_.Tensor) == 1 and torch.add in targets
    torch.testing.assert_close(qmodel(x), model(x))


class ListInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(16, 32, 3, padding=1) for _ in range(2)])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(feature) for conv, feature in zip(self.convs, features)]


def test_auto_keeps_the_signature_of_a_forward_taking_a_list() -> None:
    features = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
    qmodel = qatgraph.compile(ListInput(), "tensorrt", example_inputs=(features,))
    assert qmodel.trace_report.frontend == "torch.fx"
    assert "torch.export not tried: the example inputs hold non-tensor arguments" in qmodel.trace_report.describe()
    qatgraph.calibrate(qmodel, [(features,)], show_progress=False)
    assert [o.shape[1] for o in qmodel(features)] == [32, 32]
