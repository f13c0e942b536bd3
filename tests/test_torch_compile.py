"""``torch.compile`` support of compiled QAT models.

What it checks:
- Dynamo captures a QAT ResNet-like and MobileNetV2-like model as exactly one graph with no graph
  break, in train and eval mode, with ``max``-tracked and with learnable scales, and the graph
  really contains a fake-quant (at least one ``round``) per enabled quantizer;
- ``torch.compile(..., backend="aot_eager")`` reproduces an eager training step: outputs, the
  gradients of weights and learnable scales, and the buffers the forward mutates (weight scales
  tracked from the weights, BatchNorm running statistics);
- Python-level quantizer state changed after compiling (``disable()``, ``train()/eval()``) is
  honoured by the compiled model (guards, not stale graphs);
- both compiled fake-quant forms (``compiled_form`` "mask" and "clip") give ATen's gradient at the
  range edges, the "mask" form bit for bit everywhere (output and gradient, ties included, bf16 kept);
  ``qatgraph.compile`` gives ReLU-fed quantizers "clip" and the others "mask";
- (slow) Inductor's eval forward of a residual block agrees with eager within 1e-3 of the output's
  magnitude, and a training step with both forms agrees with eager.

The eager float32 path uses qatgraph's CPU kernel while the compiled path uses the "mask"
autograd function or ``fake_quantize_reference``: the equality tests on the ``max`` policy are the ones that catch a
difference between the two, e.g. in the straight-through gradient at the edge of the range.
Small blocks keep the fast tests in seconds; the full zoo networks run in the slow variants.
"""
from __future__ import annotations

import copy

import models
import pytest
import torch
from onnx_rounding import quantize_linear
from torch import nn

import qatgraph
from qatgraph import iter_quantizers

LEARNABLE_POLICY = {"preset": "tensorrt", "activation": {"learnable_scale": True},
                    "weight": {"learnable_scale": True}}
POLICIES = {"max": "tensorrt", "learnable": LEARNABLE_POLICY}

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def qat_model(factory, input_shape: tuple[int, ...], policy) -> tuple[nn.Module, torch.Tensor]:
    """A calibrated QAT model and a test input that is not one of its calibration batches."""
    model = models.randomize_batchnorm(factory())
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(input_shape, generator=generator) for _ in range(2)]
    qmodel = qatgraph.compile(model, policy, example_inputs=(calibration[0],))
    qatgraph.calibrate(qmodel, calibration, show_progress=False)
    return qmodel, torch.randn(input_shape, generator=generator)


def count_rounds(graph_module: torch.fx.GraphModule) -> int:
    """Roundings in the graph and in its nested graphs (an autograd function's forward body)."""
    return sum(1 for module in graph_module.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes
               if node.op == "call_function" and node.target in (torch.round, torch.Tensor.round))


# ----------------------------------------------------------------------------- one graph, no breaks
def _explain_case(model: str, mode: str, policy: str, slow: bool):
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(model, mode, policy, marks=marks, id=f"{model}-{mode}-{policy}")


@pytest.mark.parametrize("model_name, mode, policy_name", [
    _explain_case("resnet18", "train", "max", slow=False),
    _explain_case("mobilenetv2", "eval", "max", slow=False),
    _explain_case("mobilenetv2", "train", "learnable", slow=False),
    _explain_case("resnet18", "eval", "max", slow=True),
    _explain_case("mobilenetv2", "train", "max", slow=True),
    _explain_case("resnet18", "train", "learnable", slow=True),
])
def test_dynamo_captures_one_graph_without_breaks(model_name: str, mode: str, policy_name: str) -> None:
    factory, shape = models.ZOO[model_name]
    qmodel, x = qat_model(factory, shape, POLICIES[policy_name])
    qmodel.train(mode == "train")
    explanation = torch._dynamo.explain(qmodel)(x)
    reasons = [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1, reasons
    enabled = sum(1 for _, quantizer in iter_quantizers(qmodel) if quantizer.is_enabled)
    # At least one rounding per enabled quantizer: none was bypassed while tracing.
    assert enabled > 0 and count_rounds(explanation.graphs[0]) >= enabled


# ----------------------------------------------------------------------------- aot_eager == eager
def training_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    # A loss whose gradient differs per element, so a wrong mask anywhere shows up in the weights.
    (out * torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach()


def assert_same_training_step(eager_model: nn.Module, x: torch.Tensor) -> list[str]:
    """One step eagerly and one on a compiled deep copy; returns the names of the compared parameters."""
    twin = copy.deepcopy(eager_model)
    eager_out = training_step(eager_model, x)
    compiled_out = training_step(torch.compile(twin, backend="aot_eager"), x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    eager_params, twin_params = dict(eager_model.named_parameters()), dict(twin.named_parameters())
    for name, parameter in eager_params.items():
        expected, actual = parameter.grad, twin_params[name].grad
        assert expected is not None and actual is not None, f"{name}: no gradient"
        # Relative to the largest gradient of the tensor: float reassociation only, no masked element.
        tolerance = 1e-4 * expected.abs().max().item() + 1e-9
        torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance, msg=lambda m, name=name: f"{name}: {m}")
    twin_buffers = dict(twin.named_buffers())
    for name, buffer in eager_model.named_buffers():
        torch.testing.assert_close(twin_buffers[name], buffer, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    return list(eager_params)


def _block_case(block: str, policy: str):
    return pytest.param(block, policy, id=f"{block}-{policy}")


@pytest.mark.parametrize("block, policy_name", [
    _block_case("basic_downsample", "learnable"),
    _block_case("inverted_residual_strided", "learnable"),
    _block_case("basic_downsample", "max"),
])
def test_aot_eager_training_step_equals_eager(block: str, policy_name: str) -> None:
    factory, shape = models.BLOCKS[block]
    qmodel, x = qat_model(factory, shape, POLICIES[policy_name])
    # Perturb the weights so the tracked weight scales must change during the step, in both models.
    with torch.no_grad():
        for parameter in qmodel.parameters():
            parameter.mul_(1.1)
    qmodel.train()
    compared = assert_same_training_step(qmodel, x)
    assert any(name.endswith("quantizer.scale") for name in compared) == (policy_name == "learnable")


@pytest.mark.slow
def test_aot_eager_training_step_equals_eager_resnet() -> None:
    qmodel, x = qat_model(models.resnet18_like, (4, 3, 32, 32), LEARNABLE_POLICY)
    qmodel.train()
    assert_same_training_step(qmodel, x)


@pytest.mark.parametrize("per_channel, form", [(False, "mask"), (False, "clip"), (True, "clip")],
                         ids=["per_tensor_mask", "per_tensor_clip", "per_channel"])
def test_compiled_quantizer_gradient_equals_eager_at_range_edges(per_channel: bool, form: str) -> None:
    scale = 0.125  # a power of two: codes * scale / scale is exact, so the half-way ties below are real ties
    spec = qatgraph.QuantSpec(bits=8, granularity="per_channel" if per_channel else "per_tensor")
    quantizer = qatgraph.FakeQuantizer(spec, axis=0 if per_channel else None, num_channels=2, name="edge",
                                       compiled_form=form)
    hi = torch.full((2,) if per_channel else (), 127 * scale)
    quantizer.set_range(-hi, hi)  # symmetric: codes [-128, 127]
    # In codes: on the boundaries (where max calibration puts the largest value), within half a step
    # outside them (ATen rounds these into the range: gradient 1), the half-way tie 127.5 that rounds
    # (to even) outside, clearly outside, inside.
    codes = torch.tensor([[127.0, 127.3, -128.0, -128.4, 127.5, 131.0, 5.2],
                          [-127.0, 127.49, -128.49, -130.0, 130.0, 0.0, 9.0]])
    x_eager = (codes * scale).requires_grad_(True)
    x_compiled = x_eager.detach().clone().requires_grad_(True)
    quantizer(x_eager).sum().backward()
    torch.compile(quantizer, backend="aot_eager")(x_compiled).sum().backward()
    assert x_eager.grad[0, :5].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # ATen's mask, the oracle
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_compiled_mask_form_rounds_as_onnx_bit_for_bit(symmetric: bool) -> None:
    """The "mask" form under torch.compile: ONNX QuantizeLinear's output bits (tests/onnx_rounding.py)
    and ATen's straight-through gradient at every input,
    exact half-way ties and the one-float neighbours of the widened bounds included (where the
    "clip" form splits the gradient)."""
    generator = torch.Generator().manual_seed(5)
    spec = qatgraph.QuantSpec(bits=8, symmetric=symmetric)
    quantizer = qatgraph.FakeQuantizer(spec, name="mask", compiled_form="mask")
    quantizer.set_range(torch.tensor(-1.3), torch.tensor(1.9))
    scale, zero_point = quantizer.scale.detach(), quantizer.zero_point
    low, high = spec.qmin - int(zero_point), spec.qmax - int(zero_point)
    ties = torch.arange(low - 3, high + 4).float() + 0.5
    codes = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                       torch.tensor([low - 0.5, high + 0.5]), torch.randn(500, generator=generator) * 100])
    x = codes * scale
    x_ours = x.clone().requires_grad_(True)
    expected, mask = quantize_linear(x, scale, zero_point, spec.qmin, spec.qmax)
    actual = torch.compile(quantizer, backend="aot_eager", fullgraph=True)(x_ours)
    assert torch.equal(actual, expected)
    grad = torch.randn(x.shape, generator=generator)
    actual.backward(grad)
    assert torch.equal(x_ours.grad, grad * mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_inductor_on_cuda_rounds_as_onnx_with_ieee_division() -> None:
    """Inductor lowers an fp32 division to Triton's approximate one unless
    ``eager_numerics.division_rounding`` (``TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1``) is on; with
    it, compiled CUDA fake-quant gives ONNX QuantizeLinear's bits, near-ties included (README)."""
    from torch._inductor import config as inductor_config

    spec = qatgraph.QuantSpec(bits=8)
    quantizer = qatgraph.FakeQuantizer(spec, name="cuda", compiled_form="mask")
    quantizer.set_range(torch.tensor(-1.3), torch.tensor(1.9))
    scale = quantizer.scale.detach()
    ties = torch.arange(-130, 130).float() + 0.5
    codes = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                       torch.randn(100_000, generator=torch.Generator().manual_seed(3)) * 60])
    x = codes * scale
    expected, _ = quantize_linear(x, scale, quantizer.zero_point, spec.qmin, spec.qmax)
    if not hasattr(getattr(inductor_config, "eager_numerics", None), "division_rounding"):
        pytest.skip(f"torch {torch.__version__}'s Inductor has no eager_numerics.division_rounding option")
    with inductor_config.patch({"eager_numerics.division_rounding": True}):
        actual = torch.compile(quantizer.cuda(), backend="inductor", fullgraph=True)(x.cuda())
    assert torch.equal(actual.cpu(), expected), f"{(actual.cpu() != expected).sum()} of {x.numel()} differ"


def test_compiled_mask_form_keeps_low_precision_dtype() -> None:
    quantizer = qatgraph.FakeQuantizer(qatgraph.QuantSpec(bits=8), name="bf16", compiled_form="mask")
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(quantizer, backend="aot_eager", fullgraph=True)(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    with torch.no_grad():
        eager = quantizer(x)
    assert torch.equal(out.detach(), eager)


class _ReluAndRelu6(nn.Module):
    """Both compiled forms in one graph: ReLU-fed quantizers ("clip", module and function) and a
    ReLU6-fed one ("mask")."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        self.conv2, self.bn2, self.relu6 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()
        self.conv3, self.conv4 = nn.Conv2d(32, 32, 1), nn.Conv2d(32, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # conv1 (3 input channels) stays float in the preset
        x = self.relu6(self.bn2(self.conv2(x)))
        return self.conv4(torch.nn.functional.relu(self.conv3(x)))


def test_materialize_gives_relu_fed_quantizers_the_clip_form() -> None:
    qmodel = qatgraph.compile(_ReluAndRelu6(), "tensorrt", example_inputs=(torch.randn(2, 3, 8, 8),))
    forms = {name: quantizer.compiled_form for name, quantizer in iter_quantizers(qmodel) if not quantizer.is_weight}
    assert forms == {"quantizers.relu": "clip", "quantizers.relu6": "mask", "quantizers.relu_1": "clip"}, forms
    resnet = qatgraph.compile(models.resnet18_like(), "tensorrt", example_inputs=(torch.randn(2, 3, 32, 32),))
    for name, quantizer in iter_quantizers(resnet):
        if not quantizer.is_weight:
            assert quantizer.compiled_form == ("clip" if "relu" in name else "mask"), name


@pytest.mark.slow
def test_inductor_training_step_matches_eager_with_both_forms() -> None:
    qmodel, x = qat_model(_ReluAndRelu6, (4, 3, 8, 8), "tensorrt")
    qmodel.train()
    twin = copy.deepcopy(qmodel)
    eager_out = training_step(qmodel, x)
    compiled_out = training_step(torch.compile(twin), x)
    scale = eager_out.abs().max().item()
    assert (compiled_out - eager_out).abs().max().item() <= 1e-3 * scale
    for (name, eager_param), (_, compiled_param) in zip(qmodel.named_parameters(), twin.named_parameters()):
        # Inductor may move a value across a rounding tie (one code): compare relative to the gradient's size.
        difference = (compiled_param.grad - eager_param.grad).abs().max().item()
        assert difference <= 2e-2 * eager_param.grad.abs().max().item() + 1e-6, name


# ----------------------------------------------------------------------------- guards on Python state
def test_compiled_model_follows_quantizer_and_mode_changes() -> None:
    factory, shape = models.BLOCKS["basic_downsample"]
    qmodel, x = qat_model(factory, shape, "tensorrt")
    qmodel.eval()
    compiled = torch.compile(qmodel, backend="aot_eager")
    with torch.no_grad():
        quantized = qmodel(x)
        torch.testing.assert_close(compiled(x), quantized, rtol=1e-5, atol=1e-6)
        for _, quantizer in iter_quantizers(qmodel):
            quantizer.disable()
        floating = qmodel(x)
        assert not torch.allclose(floating, quantized, rtol=1e-3, atol=1e-3)  # the switch must matter
        torch.testing.assert_close(compiled(x), floating, rtol=1e-5, atol=1e-6)
        for _, quantizer in iter_quantizers(qmodel):
            quantizer.enable()
        torch.testing.assert_close(compiled(x), quantized, rtol=1e-5, atol=1e-6)
        qmodel.train()  # batch statistics instead of running ones
        train_mode = compiled(x)
        assert not torch.allclose(train_mode, quantized, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- inductor
@pytest.mark.slow
def test_inductor_eval_forward_matches_eager() -> None:
    factory, shape = models.BLOCKS["basic_downsample"]  # a small graph: Inductor compiles it in seconds
    qmodel, x = qat_model(factory, shape, "tensorrt")
    qmodel.eval()
    with torch.no_grad():
        expected = qmodel(x)
        actual = torch.compile(qmodel)(x)
    # Inductor may reassociate the float arithmetic before a rounding, which can move a value
    # across a rounding tie by one code: tolerate that, relative to the output's magnitude.
    difference = (actual - expected).abs().max().item()
    assert difference <= 1e-3 * expected.abs().max().item(), difference
