"""Tests for tracing (qatgraph/graph/tracing.py) through ``qatgraph.compile``.

Models that torch.fx cannot trace whole must still be quantized: the traceable children are
traced (partial tracing) and the rest falls back to module-wise quantization, with a
``trace_report`` that names each untraced module, the user's source line (file:line and the
code) and a fix to try. Covers: data-dependent control flow in the root, an untraceable root
and child with a plain Conv2d child, ``tracing.partial: false``, a model with nothing to
quantize, ``**kwargs`` and ``torch._assert`` forwards, an ``nn.DataParallel`` wrapper, a
detection-head-like loop over a list of feature maps, ``tracing.leaf_modules`` (class name,
dotted path, qualified name) and ``tracing.concrete_args``. Every compiled model is calibrated
and run.
"""
from __future__ import annotations

import inspect

import models
import pytest
import torch
from torch import fx, nn

import qatgraph
from qatgraph import TraceError, iter_quantizers
from qatgraph.quant.qmodules import QuantConv2d

pytestmark = pytest.mark.filterwarnings("ignore::qatgraph.QatgraphWarning")


def source_location(function, code: str) -> tuple[str, str]:
    """(``file:line``, stripped code) of the line of ``function`` that contains ``code``."""
    lines, start = inspect.getsourcelines(function)
    offset = next(i for i, line in enumerate(lines) if code in line)
    return f"{inspect.getsourcefile(function)}:{start + offset}", lines[offset].strip()


def quantizer_names(model: nn.Module) -> set[str]:
    return {name for name, _ in iter_quantizers(model)}


def assert_close_to_float(compiled: nn.Module, original: nn.Module, *args: object) -> None:
    """The calibrated QAT model (eval) stays within a few quantization steps of the float model."""
    expected = original.eval()(*args)
    actual = compiled.eval()(*args)
    for e, a in zip(expected if isinstance(expected, (list, tuple)) else [expected],
                    actual if isinstance(actual, (list, tuple)) else [actual]):
        assert e.shape == a.shape and torch.isfinite(a).all()
        assert (a - e).abs().max() <= 0.1 * e.abs().max()


# --------------------------------------------------------------------------- control flow in the root
class BranchOnValues(nn.Module):
    """Root branches on tensor values; its two ResNet blocks trace fine on their own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = models.BasicBlock(16, 16)
        self.b = models.BasicBlock(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_control_flow_in_root_traces_children() -> None:
    model = models.randomize_batchnorm(BranchOnValues()).eval()
    compiled = qatgraph.compile(model, "tensorrt")
    report = compiled.trace_report
    assert report.traced == ["a", "b"] and not report.fully_traced and report.eager_layers == []
    assert isinstance(compiled.a, fx.GraphModule) and isinstance(compiled.b, fx.GraphModule)
    [untraced] = report.untraced
    location, code = source_location(BranchOnValues.forward, "if x.sum() > 0")
    assert (untraced.name, untraced.type_name) == ("", "BranchOnValues")
    assert untraced.location == f"{location} `{code}`"
    assert "control flow" in untraced.reason
    assert "concrete_args" in untraced.fix and "leaf_modules: ['BranchOnValues']" in untraced.fix
    assert location in report.describe() and "partially traced: a, b" in report.describe()
    # Both blocks are quantized inside their own graphs, with parameter names unchanged.
    for block in ("a", "b"):
        assert {f"{block}.conv1.weight_quantizer", f"{block}.conv2.weight_quantizer",
                f"{block}.quantizers.x"} <= quantizer_names(compiled)
        assert isinstance(compiled.get_submodule(f"{block}.conv1"), QuantConv2d)
        assert compiled.qatgraph_info.layer(f"{block}.conv1").quantized
    assert set(compiled.state_dict()) >= set(model.state_dict())
    positive, negative = torch.rand(2, 16, 8, 8) + 0.1, -torch.rand(2, 16, 8, 8) - 0.1
    qatgraph.calibrate(compiled, [positive, negative])  # each branch sees a batch
    assert_close_to_float(compiled, model, positive)
    assert_close_to_float(compiled, model, negative)


def test_partial_false_raises_trace_error_with_module_and_line() -> None:
    with pytest.raises(TraceError) as info:
        qatgraph.compile(BranchOnValues(), {"preset": "tensorrt", "tracing": {"partial": False}})
    message = str(info.value)
    location, code = source_location(BranchOnValues.forward, "if x.sum() > 0")
    assert "BranchOnValues" in message and location in message and code in message
    assert "tracing.partial: true" in message


# --------------------------------------------------------------------------- module-wise fallback
class UntraceableInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(32, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[0])):  # int() of a traced value
            x = x * 1.0
        return self.proj(x)


class UntraceableOuter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.inner = UntraceableInner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 100:
            x = x / 2
        return self.inner(torch.relu(self.conv(x)))


def test_untraceable_root_and_child_fall_back_to_module_wise() -> None:
    model = UntraceableOuter()
    compiled = qatgraph.compile(model, "tensorrt")
    report = compiled.trace_report
    assert report.traced == []
    assert [u.name for u in report.untraced] == ["", "inner"]
    assert report.untraced[1].location.startswith(source_location(UntraceableInner.forward, "int(x.shape[0])")[0])
    assert report.eager_layers == ["conv", "inner.proj"]
    for name in report.eager_layers:
        layer = compiled.get_submodule(name)
        assert isinstance(layer, QuantConv2d) and layer.input_quantizer is not None
        decision = compiled.qatgraph_info.layer(name)
        assert decision.quantized and decision.eager and decision.input_quantizers == [f"{name}.input_quantizer"]
    x = torch.randn(2, 16, 8, 8)
    qatgraph.calibrate(compiled, [x])
    assert compiled.conv.input_quantizer.is_calibrated and compiled.inner.proj.input_quantizer.is_calibrated
    assert_close_to_float(compiled, model, x)


class NothingToQuantize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.norm(x)
        return x


def test_nothing_traceable_and_no_weighted_layer_raises() -> None:
    with pytest.raises(TraceError) as info:
        qatgraph.compile(NothingToQuantize(), "tensorrt")
    message = str(info.value)
    assert "no Conv/Linear layer to quantize module-wise" in message
    assert "NothingToQuantize" in message and source_location(NothingToQuantize.forward, "if x.sum()")[0] in message


# --------------------------------------------------------------------------- forwards fx handles
class KwargsForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = models.BasicBlock(16, 16)

    def forward(self, x: torch.Tensor, **kwargs: float) -> torch.Tensor:
        return self.block(x) * kwargs.get("gain", 1.0)


class AssertForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = models.BasicBlock(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 4, "expected an NCHW batch")
        return self.block(x)


def test_kwargs_forward_compiles_and_runs() -> None:
    model = KwargsForward()
    compiled = qatgraph.compile(model, "tensorrt")
    assert "block.conv1.weight_quantizer" in quantizer_names(compiled)
    x = torch.randn(2, 16, 8, 8)
    qatgraph.calibrate(compiled, [x])
    assert_close_to_float(compiled, model, x)
    compiled.eval()
    assert torch.allclose(compiled(x, gain=2.0), 2.0 * compiled(x))


def test_torch_assert_forward_compiles_runs_and_still_asserts() -> None:
    model = AssertForward()
    compiled = qatgraph.compile(model, "tensorrt")
    assert "block.conv2.weight_quantizer" in quantizer_names(compiled)
    x = torch.randn(2, 16, 8, 8)
    qatgraph.calibrate(compiled, [x])
    assert_close_to_float(compiled, model, x)
    with pytest.raises(Exception, match="expected an NCHW batch"):
        compiled(torch.randn(16, 8, 8))


def test_data_parallel_wrapper_compiles_and_runs() -> None:
    # Without GPUs, DataParallel.forward just calls the wrapped module.
    block = models.BasicBlock(16, 16)
    wrapped = nn.DataParallel(block)
    compiled = qatgraph.compile(wrapped, "tensorrt")
    assert {"module.conv1.weight_quantizer", "module.conv2.weight_quantizer"} <= quantizer_names(compiled)
    assert "module" in compiled.trace_report.traced
    assert isinstance(compiled.get_submodule("module.conv1"), QuantConv2d)
    assert set(compiled.state_dict()) >= set(wrapped.state_dict())  # still module.* keys
    x = torch.randn(2, 16, 8, 8)
    qatgraph.calibrate(compiled, [x])
    assert_close_to_float(compiled, block, x)


# --------------------------------------------------------------------------- loops over feature maps
class DetectionHead(nn.Module):
    """One conv tower per pyramid level, applied in a Python loop over the feature maps."""

    def __init__(self, levels: int = 3) -> None:
        super().__init__()
        self.towers = nn.ModuleList([nn.Sequential(models.ConvBNAct(16, 32), models.ConvBNAct(32, 32))
                                     for _ in range(levels)])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for level, feature in enumerate(features):
            outputs.append(self.towers[level](feature))
        return outputs


def feature_pyramid() -> list[torch.Tensor]:
    return [torch.randn(2, 16, size, size) for size in (16, 8, 4)]


def test_loop_over_feature_maps_gets_the_loop_fix() -> None:
    compiled = qatgraph.compile(DetectionHead(), "tensorrt")
    [root] = [u for u in compiled.trace_report.untraced if u.name == ""]
    location, code = source_location(DetectionHead.forward, "for level, feature in enumerate(features)")
    assert root.location == f"{location} `{code}`"
    assert "cannot be iterated" in root.reason
    # The forward loops; it does not branch on values, so the branch advice would mislead.
    assert "loops over a traced value" in root.fix and "branches on tensor values" not in root.fix
    assert "leaf_modules: ['DetectionHead']" in root.fix


def test_loop_over_feature_maps_traces_the_towers() -> None:
    model = models.randomize_batchnorm(DetectionHead()).eval()
    compiled = qatgraph.compile(model, "tensorrt")
    report = compiled.trace_report
    # nn.ModuleList has no forward of its own: partial tracing must look inside it.
    assert report.traced == ["towers.0", "towers.1", "towers.2"]
    assert report.eager_layers == []
    for level in range(3):
        assert isinstance(compiled.get_submodule(f"towers.{level}"), fx.GraphModule)
        assert any(name.startswith(f"towers.{level}.quantizers.") for name in quantizer_names(compiled))
    features = feature_pyramid()
    qatgraph.calibrate(compiled, [(features,)])
    assert_close_to_float(compiled, model, features)


def test_loop_over_feature_maps_compiles_and_runs() -> None:
    model = models.randomize_batchnorm(DetectionHead()).eval()
    compiled = qatgraph.compile(model, "tensorrt")
    for level in range(3):
        for index in range(2):
            assert isinstance(compiled.get_submodule(f"towers.{level}.{index}.0"), QuantConv2d)
    features = feature_pyramid()
    qatgraph.calibrate(compiled, [(features,)])
    assert_close_to_float(compiled, model, features)


# --------------------------------------------------------------------------- leaf modules
@pytest.mark.parametrize("leaf", ["BasicBlock", "model_blocks.BasicBlock"])
def test_leaf_modules_by_class_name(leaf: str) -> None:
    model = BranchOnValues()
    compiled = qatgraph.compile(model, {"preset": "tensorrt", "tracing": {"leaf_modules": [leaf]}})
    report = compiled.trace_report
    assert report.traced == [] and type(compiled.a) is models.BasicBlock and type(compiled.b) is models.BasicBlock
    assert report.eager_layers == ["a.conv1", "a.conv2", "b.conv1", "b.conv2"]
    x = torch.rand(2, 16, 8, 8)
    qatgraph.calibrate(compiled, [x, -x])
    assert_close_to_float(compiled, model, x)


def test_leaf_modules_by_qualified_name() -> None:
    compiled = qatgraph.compile(BranchOnValues(), {"preset": "tensorrt", "tracing": {"leaf_modules": ["a"]}})
    report = compiled.trace_report
    assert report.traced == ["b"] and type(compiled.a) is models.BasicBlock
    assert isinstance(compiled.b, fx.GraphModule)
    assert report.eager_layers == ["a.conv1", "a.conv2"]


def test_leaf_module_stays_a_call_in_a_fully_traced_graph() -> None:
    compiled = qatgraph.compile(models.resnet18_like(), {"preset": "tensorrt",
                                                         "tracing": {"leaf_modules": ["layer1.0"]}})
    assert compiled.trace_report.fully_traced
    assert type(compiled.get_submodule("layer1.0")) is models.BasicBlock
    targets = {str(node.target) for node in compiled.graph.nodes if node.op == "call_module"}
    assert "layer1.0" in targets and "layer1.0.conv1" not in targets and "layer1.1.conv1" in targets


def test_leaf_module_layers_are_quantized_module_wise_in_a_fully_traced_graph() -> None:
    # The trace report's fix promises "its Conv/Linear are then quantized module-wise"; that must
    # hold when the rest of the model traced, not only under partial tracing.
    model = models.resnet18_like()
    compiled = qatgraph.compile(model, {"preset": "tensorrt", "tracing": {"leaf_modules": ["layer1.0"]}})
    for name in ("layer1.0.conv1", "layer1.0.conv2"):
        layer = compiled.get_submodule(name)
        assert isinstance(layer, QuantConv2d) and layer.input_quantizer is not None
        assert compiled.qatgraph_info.layer(name).eager
    assert compiled.trace_report.eager_layers == ["layer1.0.conv1", "layer1.0.conv2"]
    qatgraph.calibrate(compiled, [torch.randn(2, 3, 32, 32)])
    compiled.eval()(torch.randn(2, 3, 32, 32))


# --------------------------------------------------------------------------- concrete_args
class FlagForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = models.ConvBNAct(16, 32)
        self.b = models.ConvBNAct(16, 32)

    def forward(self, x: torch.Tensor, use_a: bool = True) -> torch.Tensor:
        if use_a:
            return self.a(x)
        return self.b(x)


def test_concrete_args_make_a_branch_static() -> None:
    partial = qatgraph.compile(FlagForward(), "tensorrt")
    assert partial.trace_report.traced == ["a", "b"]
    assert partial.trace_report.untraced[0].location.endswith("`if use_a:`")
    model = models.randomize_batchnorm(FlagForward()).eval()
    compiled = qatgraph.compile(model, {"preset": "tensorrt", "tracing": {"concrete_args": {"use_a": True}}})
    assert compiled.trace_report.fully_traced and compiled.trace_report.untraced == []
    assert isinstance(compiled.get_submodule("a.0"), QuantConv2d)
    assert compiled.qatgraph_info.quantized_layers == ["a.0"]
    x = torch.randn(2, 16, 8, 8)
    qatgraph.calibrate(compiled, [x])
    assert_close_to_float(compiled, model, x)
