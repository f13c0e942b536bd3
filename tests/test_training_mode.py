"""``train()``/``eval()`` keep their meaning in a compiled model, whichever mode it was compiled in
(qatgraph/graph/modes.py): torch.fx would otherwise bake ``self.training`` into the graph."""
from __future__ import annotations

import models_arch
import onnx
import pytest
import torch
import torch.nn.functional as F
from models_arch import stochastic_depth
from placement import quantized_edges
from torch import fx, nn

import qatgraph
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.parity import check_parity
from qatgraph.graph.mode_call import TrainingFlagCall
from qatgraph.graph.tracing import trace_module
from qatgraph.policy import Policy

torch.fx.wrap("stochastic_depth")  # as torchvision wraps its own: one call in the graph

pytestmark = pytest.mark.filterwarnings("ignore::qatgraph.QatgraphWarning", "ignore::torch.jit.TracerWarning")


class DropoutHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), 0.5, self.training)


class DropPathBlock(nn.Module):
    """A residual conv block with the fx-wrapped ``stochastic_depth`` called in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = models_arch.conv_bn(32, 32, 3, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(self.conv(x), 0.5, self.training) + x


class StochasticDepthBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = models_arch.conv_bn(32, 32, 3, act=False)
        self.drop = models_arch.StochasticDepth(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x)) + x


class HalvedInTraining(nn.Module):
    """A Python branch on ``self.training`` around a weighted layer: not a flag to pass through."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.training:
            y = y * 0.5
        return y


class Scores(nn.Module):
    """No parameter, but an attention matmul: must stay traced (its matmul is quantized)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = q @ k.transpose(-1, -2)
        if self.training:
            scores = scores * 0.9
        return scores.softmax(-1)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.scores = Scores()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(self.q(x), self.k(x)) @ x


def compiled(model: nn.Module, training: bool, x: torch.Tensor) -> fx.GraphModule:
    qmodel = qatgraph.compile(model.train(training), "tensorrt", example_inputs=(x,))
    qatgraph.calibrate(qmodel, [x], show_progress=False)
    return qmodel


def flag_calls(qmodel: nn.Module) -> list[TrainingFlagCall]:
    return [m for m in qmodel.modules() if isinstance(m, TrainingFlagCall)]


@pytest.mark.parametrize("compiled_training", [True, False])
def test_functional_dropout_follows_train_and_eval(compiled_training: bool) -> None:
    x = torch.randn(64, 16)
    qmodel = compiled(DropoutHead(), compiled_training, x)
    assert len(flag_calls(qmodel)) == 1 and qmodel.trace_report.mode_fixed == []
    qmodel.eval()
    with torch.no_grad():
        first, second = qmodel(x), qmodel(x)
    assert torch.equal(first, second) and (first == 0).float().mean() < 0.1
    qmodel.train()
    with torch.no_grad():
        dropped = (qmodel(x) == 0).float().mean().item()
    assert 0.3 < dropped < 0.7, dropped


@pytest.mark.parametrize("block", [DropPathBlock, StochasticDepthBlock])
@pytest.mark.parametrize("compiled_training", [True, False])
def test_stochastic_depth_follows_train_and_eval(block: type, compiled_training: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 32, 6, 6)
    qmodel = compiled(block(), compiled_training, x)
    if block is StochasticDepthBlock:  # a parameterless module whose trace depends on the mode: a leaf
        assert isinstance(qmodel.get_submodule("drop"), models_arch.StochasticDepth)
        assert any(n.op == "call_module" and n.target == "drop" for n in qmodel.graph.nodes)
    else:
        assert len(flag_calls(qmodel)) == 1
    [add] = [n for n in qmodel.graph.nodes if n.meta.get("qatgraph.residual") is not None]
    assert add.meta["qatgraph.residual"]["skip_arg"] == 1  # the residual rule still sees through it
    assert add.name in quantized_edges(qmodel)["x"]
    qmodel.eval()
    with torch.no_grad():
        assert torch.equal(qmodel(x), qmodel(x))
    qmodel.train()
    with torch.no_grad():
        first, second = qmodel(x), qmodel(x)
    redrawn = sum(not torch.equal(first[i], second[i]) for i in range(len(x)))
    assert redrawn >= 4, redrawn  # each call draws its own per-sample mask (p 0.5: about half differ)


def test_export_of_a_model_compiled_in_training_mode(tmp_path) -> None:
    x = torch.randn(4, 32, 6, 6)
    qmodel = compiled(DropPathBlock(), True, x).eval()
    path = tmp_path / "block.onnx"
    result = export_onnx(qmodel, str(path), x)
    assert result.errors == [] and result.warnings == []
    op_types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not op_types & {"Dropout", "RandomUniformLike", "RandomUniform", "Bernoulli"}, op_types
    assert check_parity(qmodel, path, x).passed


def test_branch_around_a_weighted_layer_is_reported() -> None:
    x = torch.randn(4, 16)
    qmodel = compiled(nn.Sequential(HalvedInTraining(), nn.Linear(16, 4)), True, x)
    report = qmodel.trace_report
    assert report.mode_fixed == ["0"]
    assert "traced in training mode, the code of 0 branches on self.training" in report.describe()
    assert "tracing.leaf_modules" in report.describe()


def test_parameterless_module_with_a_matmul_stays_traced() -> None:
    x = torch.randn(2, 32, 16)
    qmodel = compiled(Attention(), True, x)
    matmuls = [d for d in qmodel.qatgraph_info.layers if d.type_name == "matmul"]
    assert len(matmuls) == 2 and all(d.quantized for d in matmuls), qmodel.qatgraph_info.layers
    assert qmodel.trace_report.mode_fixed == ["scores"]


def test_mode_flags_of_submodules_survive_tracing() -> None:
    """Tracing in the other mode restores each module's own flag (a BatchNorm frozen in eval
    inside a training model stays in eval)."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), DropoutHead()).train()
    model[1].eval()
    flags = [m.training for m in model.modules()]
    trace_module(model, Policy.from_any("tensorrt"))
    assert [m.training for m in model.modules()] == flags


def test_whole_pickled_model_saves_and_refuses_to_load_in_words(tmp_path) -> None:
    """This file has ``from __future__ import annotations`` (string annotations, which torch.fx
    cannot pickle): saving works; loading says how to persist a compiled model instead."""
    x = torch.randn(4, 16)
    qmodel = compiled(DropoutHead(), True, x)
    path = tmp_path / "whole.pt"
    torch.save(qmodel, path)
    with pytest.raises(qatgraph.QatgraphError, match=r"pickled qatgraph-compiled model.*state_dict\(\)"):
        torch.load(path, weights_only=False)
    again = compiled(DropoutHead(), True, x)
    again.load_state_dict(qmodel.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), qmodel.eval()(x))


class ScaledResidual(nn.Module):
    """No parameter, a residual Add and a dropout: the Add must stay in the graph (quantized)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + F.dropout(y, 0.5, self.training)


class ConstantInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * torch.tensor([2.0])


def test_weightless_module_with_a_residual_add_stays_traced() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.join = nn.Linear(32, 32), ScaledResidual()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.join(x, self.fc(x))

    x = torch.randn(8, 32)
    qmodel = compiled(Block(), True, x)
    assert not any(n.op == "call_module" and n.target == "join" for n in qmodel.graph.nodes)
    [add] = [n for n in qmodel.graph.nodes if n.meta.get("qatgraph.residual") is not None]
    assert add.name in quantized_edges(qmodel)["x"]
    assert len(flag_calls(qmodel)) == 1 and qmodel.trace_report.mode_fixed == []


def test_tensor_constants_made_in_forward_are_not_a_mode_difference() -> None:
    model = ConstantInForward().train()
    attributes = set(vars(model))
    trace_module(model, Policy.from_any("tensorrt"))
    assert set(vars(model)) - attributes == {"_tensor_constant0"}  # one constant, from the kept trace
    qmodel = compiled(ConstantInForward(), True, torch.randn(4, 16))
    assert qmodel.trace_report.mode_fixed == []
