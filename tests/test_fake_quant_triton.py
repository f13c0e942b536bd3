"""Tests for the fused CUDA fake-quant (qatgraph/kernels/fake_quant_triton.py, qatgraph/ops/fake_quant_cuda.py).

On CPU the Triton kernels run under the interpreter: the ``check_*`` functions below run in a child
pytest with ``TRITON_INTERPRET=1`` (tests/interpreted.py says why a child process). They drive the autograd functions on
CPU tensors and compare with :func:`qatgraph.quant.quantizer.fake_quantize_reference` (the fp32
formula, ONNX QuantizeLinear's ``round(x / s)``, cast back to the input dtype): outputs bit for bit,
straight-through masks exactly (tests/onnx_rounding.py), LSQ gradients to float rounding. Run them by hand with

    TRITON_INTERPRET=1 python -m pytest tests/test_fake_quant_triton.py -o python_functions=check_

The ``test_*`` CUDA tests run the compiled kernels (and ATen's, the other backend, which rounds
``x * (1 / s)`` as ATen's CPU kernels do) on a GPU. The kernels compiled for Hopper without a GPU:
tests/test_fake_quant_triton_hopper.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from interpreted import require_interpreter, run_checks_in_child  # noqa: E402
from onnx_rounding import quantize_linear  # noqa: E402

from qatgraph.quant.quantizer import fake_quantize_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = {  # (qmin, qmax, zero point): int8 symmetric, uint8 asymmetric, int4
    "int8": (-128, 127, 0), "uint8": (0, 255, 37), "int4": (-8, 7, 0), "int8_weight": (-127, 127, 0)}


def test_kernel_checks_pass_under_interpreter():
    run_checks_in_child(__file__, minimum=40)


@pytest.fixture(scope="module")
def ops():
    """qatgraph.ops.fake_quant_cuda with interpreted kernels (only inside the child process)."""
    require_interpreter()
    from qatgraph.kernels import fake_quant_triton
    from qatgraph.ops import fake_quant_cuda

    assert fake_quant_triton.INTERPRETED, "triton was imported before TRITON_INTERPRET=1 was set"
    return fake_quant_cuda


def sample(shape, dtype, scale: float, zero_point: int, qmin: int, qmax: int, seed: int,
           ties: bool = True) -> torch.Tensor:
    """Random values over and beyond the range, plus (``ties``) exact rounding ties and range bounds."""
    generator = torch.Generator().manual_seed(seed)
    amax = (qmax - qmin) * scale
    x = (torch.rand(shape, generator=generator) * 2.6 - 1.3) * amax
    if not ties:
        return x.to(dtype)
    flat = x.view(-1)
    count = min(flat.numel() // 4, 64)
    codes = torch.arange(qmin - 2, qmin - 2 + count, dtype=torch.float32) - zero_point
    flat[:count] = (codes + 0.5) * scale  # ties x/s = k + 1/2 (exact when representable)
    flat[count:2 * count] = codes * scale
    return x.to(dtype)


def reference_and_grads(x, scale, zero_point, qmin, qmax, axis, grad):
    leaf = x.detach().clone().requires_grad_()
    out = fake_quantize_reference(leaf, scale, zero_point, qmin, qmax, axis)
    out.backward(grad)
    return out.detach(), leaf.grad


def onnx_mask(x, scale, zero_point, qmin, qmax, axis):
    """The straight-through mask of the fp32 values: 1 where ONNX's rounded value lies in the range."""
    return quantize_linear(x.float(), scale, zero_point, qmin, qmax, axis)[1]


def aten(x, scale, zero_point, qmin, qmax, axis):
    """ATen's CPU fake-quant of the fp32 values (its ``x * (1 / s)`` rounding), in x's dtype."""
    x = x.float()
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


def aten_mask(x, scale, zero_point, qmin, qmax, axis):
    """ATen's straight-through mask of the fp32 values (CPU kernels)."""
    leaf = x.detach().float().clone().requires_grad_()
    if axis is None:
        out = torch.fake_quantize_per_tensor_affine(leaf, scale, zero_point, qmin, qmax)
    else:
        out = torch.fake_quantize_per_channel_affine(leaf, scale, zero_point, axis, qmin, qmax)
    out.sum().backward()
    return leaf.grad != 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4099,)], ids=["4d", "odd_1d"])
def check_per_tensor_output_bits_and_mask(ops, dtype, fmt, shape):
    qmin, qmax, zero_point = FORMATS[fmt]
    scale, zp = torch.tensor(0.0173), torch.tensor(zero_point, dtype=torch.int32)
    x = sample(shape, dtype, 0.0173, zero_point, qmin, qmax, seed=len(shape) + qmax)
    leaf = x.clone().requires_grad_()
    out = ops.FakeQuantizeTriton.apply(leaf, scale, zp, qmin, qmax, None)
    assert out.dtype == dtype and out.shape == x.shape
    reference = fake_quantize_reference(x, scale, zp, qmin, qmax, None)
    assert torch.equal(out, reference), f"{(out != reference).sum()} elements differ"
    grad = torch.randn(shape).to(dtype)
    out.backward(grad)
    mask = onnx_mask(x, scale, zp, qmin, qmax, None)
    assert torch.equal(leaf.grad, torch.where(mask, grad, torch.zeros_like(grad)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [0, 1])
def check_per_channel_output_bits_and_mask(ops, dtype, axis):
    qmin, qmax = -127, 127
    shape = (6, 5, 3, 3)
    scale = torch.rand(shape[axis], generator=torch.Generator().manual_seed(axis)) * 0.05 + 0.005
    zp = torch.zeros(shape[axis], dtype=torch.int32)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.4).to(dtype)
    leaf = x.clone().requires_grad_()
    out = ops.FakeQuantizeTriton.apply(leaf, scale, zp, qmin, qmax, axis)
    assert torch.equal(out, fake_quantize_reference(x, scale, zp, qmin, qmax, axis))
    grad = torch.randn(shape).to(dtype)
    out.backward(grad)
    mask = onnx_mask(x, scale, zp, qmin, qmax, axis)
    assert torch.equal(leaf.grad, torch.where(mask, grad, torch.zeros_like(grad)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def check_channels_last_keeps_layout_and_gradient_of_another_layout(ops, dtype):
    x = sample((2, 8, 5, 6), torch.float32, 0.02, 0, -128, 127, seed=5).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, zp = torch.tensor(0.02), torch.tensor(0, dtype=torch.int32)
    out = ops.FakeQuantizeTriton.apply(x, scale, zp, -128, 127, None)
    assert out.is_contiguous(memory_format=torch.channels_last)
    reference, reference_grad = reference_and_grads(x, scale, zp, -128, 127, None, torch.ones(x.shape, dtype=dtype))
    assert torch.equal(out, reference)
    out.backward(torch.ones((), dtype=dtype).expand(x.shape))  # a stride-0 gradient, another layout
    assert torch.equal(x.grad, onnx_mask(x, scale, zp, -128, 127, None).to(dtype))


def check_non_dense_input_is_quantized_like_its_dense_copy(ops):
    base = torch.randn(6, 10)
    x = base[:, ::2]  # not dense
    scale, zp = torch.tensor(0.01), torch.tensor(0, dtype=torch.int32)
    out = ops.FakeQuantizeTriton.apply(x, scale, zp, -128, 127, None)
    assert torch.equal(out, fake_quantize_reference(x, scale, zp, -128, 127, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def check_nan_stays_nan_with_zero_gradient_and_inf_clamps(ops, dtype):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, -5.0]).to(dtype).requires_grad_()
    scale, zp = torch.tensor(0.01), torch.tensor(0, dtype=torch.int32)
    out = ops.FakeQuantizeTriton.apply(x, scale, zp, -128, 127, None)
    assert torch.isnan(out[0]) and out[1].item() == pytest.approx(1.27, rel=1e-2)
    assert out[2].item() == pytest.approx(-1.28, rel=1e-2) and out[4].item() == pytest.approx(-1.28, rel=1e-2)
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]


def check_no_mask_without_gradient(ops):
    x = torch.randn(100)
    scale, zp = torch.tensor(0.01), torch.tensor(0, dtype=torch.int32)
    out, mask = ops._kernels().fake_quant_forward(x, scale, zp, -128, 127, None, False)
    assert mask is None and torch.equal(out, fake_quantize_reference(x, scale, zp, -128, 127, None))
    with torch.no_grad():
        assert torch.equal(ops.FakeQuantizeTriton.apply(x, scale, zp, -128, 127, None), out)


def check_empty_tensor(ops):
    x = torch.empty(0, 4, requires_grad=True)
    out = ops.FakeQuantizeTriton.apply(x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), -128, 127, None)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [None, 0, 1], ids=["tensor", "axis0", "axis1"])
@pytest.mark.parametrize("fmt", ["int8", "uint8", "int4"])
def check_learnable_scale_gradients_match_the_reference(ops, dtype, axis, fmt):
    qmin, qmax, zero_point = FORMATS[fmt]
    shape = (4, 6, 5, 7)
    channels = 1 if axis is None else shape[axis]
    generator = torch.Generator().manual_seed(qmax + (axis or 0))
    base = torch.rand(channels, generator=generator) * 0.02 + 0.01
    # No constructed ties here: at x/s = qmax + 1/2 the reference's minimum() splits the gradient (0.5),
    # while the kernels follow ATen's mask rule (checked with ties above).
    x = sample(shape, torch.float32, float(base.mean()), zero_point, qmin, qmax, seed=qmax, ties=False).to(dtype)
    grad = torch.randn(shape, generator=generator).to(dtype)
    zp = torch.full((channels,), zero_point, dtype=torch.int32)
    scale_shape = () if axis is None else (channels,)
    zp = zp.reshape(scale_shape)

    def run(function):
        leaf, scale = x.clone().requires_grad_(), base.reshape(scale_shape).clone().requires_grad_()
        out = function(leaf, scale)
        out.backward(grad)
        return out.detach(), leaf.grad, scale.grad

    out, grad_x, grad_scale = run(lambda leaf, scale: ops.FakeQuantizeLearnableTriton.apply(
        leaf, scale, zp, qmin, qmax, axis))
    ref_out, ref_grad_x, ref_grad_scale = run(lambda leaf, scale: fake_quantize_reference(
        leaf, scale, zp, qmin, qmax, axis))
    assert torch.equal(out, ref_out)
    # the reference's x-gradient is scale * (1 / scale) * dy, one rounding off the exact dy
    torch.testing.assert_close(grad_x.float(), ref_grad_x.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_scale, ref_grad_scale, rtol=2e-5, atol=1e-4)


def check_backend_env_switch(ops, monkeypatch):
    from qatgraph.errors import QatgraphError

    monkeypatch.setattr(ops, "_FORCED", ops._UNSET)
    monkeypatch.setenv("QATGRAPH_CUDA_FAKE_QUANT", "aten")
    assert ops.backend_for(torch.bfloat16) == "aten"
    ops.force_backend(None)
    assert ops.backend_for(torch.bfloat16) == ops.PREFERRED[torch.bfloat16]
    monkeypatch.setattr(ops, "_FORCED", ops._UNSET)
    monkeypatch.setenv("QATGRAPH_CUDA_FAKE_QUANT", "nonsense")
    with pytest.raises(QatgraphError, match="QATGRAPH_CUDA_FAKE_QUANT='nonsense'"):
        ops.backend_for(torch.float32)


# ---------------------------------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["triton", "aten"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [None, 0, 1], ids=["tensor", "axis0", "axis1"])
@pytest.mark.parametrize("fmt", ["int8", "uint8"])
def test_cuda_fake_quant_matches_the_fp32_formula_bit_for_bit(backend, dtype, axis, fmt):
    from qatgraph.ops.fake_quant_cuda import fake_quantize_cuda

    qmin, qmax, zero_point = FORMATS[fmt]
    if backend == "aten" and axis is not None and zero_point != 0:
        pytest.skip("ATen's per-channel kernel rounds x/s + zero_point (not round(x/s) + zero_point); "
                    "qatgraph's per-channel weights are symmetric")
    shape = (8, 16, 33, 17)
    channels = 1 if axis is None else shape[axis]
    generator = torch.Generator().manual_seed(qmax)
    scale = (torch.rand(channels, generator=generator) * 0.02 + 0.01).reshape(() if axis is None else (channels,))
    zp = torch.full_like(scale, zero_point, dtype=torch.int32)
    x = sample(shape, dtype, float(scale.mean()), zero_point, qmin, qmax, seed=7)
    grad = torch.randn(shape, generator=generator).to(dtype)
    leaf = x.cuda().requires_grad_()
    out = fake_quantize_cuda(leaf, scale.cuda(), zp.cuda(), qmin, qmax, axis, backend=backend)
    out.backward(grad.cuda())
    if backend == "triton":  # ONNX QuantizeLinear's rounding, as on the CPU
        reference = fake_quantize_reference(x, scale, zp, qmin, qmax, axis)
        mask = onnx_mask(x, scale, zp, qmin, qmax, axis)
    else:  # ATen's kernels round x * (1 / s) on either device
        reference = aten(x, scale, zp, qmin, qmax, axis).to(dtype)
        mask = aten_mask(x, scale, zp, qmin, qmax, axis)
    assert out.dtype == dtype
    assert torch.equal(out.cpu(), reference), f"{(out.cpu() != reference).sum()} of {x.numel()} differ"
    assert torch.equal(leaf.grad.cpu(), torch.where(mask, grad, torch.zeros_like(grad)))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("axis", [None, 0], ids=["tensor", "axis0"])
def test_cuda_learnable_fake_quant_matches_the_reference(dtype, axis):
    from qatgraph.ops.fake_quant_cuda import fake_quantize_learnable_cuda

    shape = (16, 32, 20, 20)
    channels = 1 if axis is None else shape[axis]
    scale_shape = () if axis is None else (channels,)
    base = (torch.rand(channels) * 0.02 + 0.01).reshape(scale_shape)
    zp = torch.zeros(scale_shape, dtype=torch.int32)
    x = sample(shape, dtype, float(base.mean()), 0, -128, 127, seed=11, ties=False)
    grad = torch.randn(shape).to(dtype)

    def run(function, device):
        leaf = x.to(device).requires_grad_()
        scale = base.to(device).requires_grad_()
        out = function(leaf, scale, zp.to(device))
        out.backward(grad.to(device))
        return out.detach().cpu(), leaf.grad.cpu(), scale.grad.cpu()

    out, grad_x, grad_scale = run(lambda leaf, scale, z: fake_quantize_learnable_cuda(leaf, scale, z, -128, 127, axis),
                                  "cuda")
    ref_out, ref_grad_x, ref_grad_scale = run(
        lambda leaf, scale, z: fake_quantize_reference(leaf, scale, z, -128, 127, axis), "cpu")
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(grad_x.float(), ref_grad_x.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_scale, ref_grad_scale, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@cuda
def test_quantized_model_under_bf16_autocast_makes_no_fp32_copy_of_activations():
    import qatgraph

    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(8, 16, 32, 32)
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(x,))
    qatgraph.calibrate(qmodel, [x], show_progress=False)
    qmodel = qmodel.cuda().train()
    x = x.cuda()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = qmodel(x)
            loss = out.square().mean()
        loss.backward()
    activation_elements = 8 * 32 * 32 * 32
    copies = [e for e in profiler.events() if e.name == "aten::_to_copy" and e.input_shapes and
              e.input_shapes[0] and torch.Size(e.input_shapes[0]).numel() >= activation_elements]
    assert copies == [], f"dtype copies of activations: {[(e.input_shapes, e.name) for e in copies]}"
    assert out.dtype == torch.bfloat16


# ------------------------------------------------------------- a whole model, interpreted kernels
class _SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "lsq"])
def check_quantized_model_through_the_fused_kernels_trains_like_the_cpu_path(ops, monkeypatch, learnable):
    """A compiled model whose every fake-quant goes through the (interpreted) fused kernels gives the
    CPU path's outputs and gradients: module shapes, per-channel weights, LSQ included."""
    import copy

    import qatgraph
    from qatgraph.quant import quantizer as quantizer_module

    policy = {"preset": "tensorrt", "min_channels": 0}
    if learnable:
        policy.update(weight={"learnable_scale": True}, activation={"learnable_scale": True})
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qmodel = qatgraph.compile(_SmallNet(), policy, example_inputs=(x,))
    qatgraph.calibrate(qmodel, [x], show_progress=False)
    fused = copy.deepcopy(qmodel).train()
    qmodel.train()

    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {name: p.grad for name, p in model.named_parameters()}

    expected, expected_grads = run(qmodel)
    calls = []
    real = ops.FakeQuantizeLearnableTriton if learnable else ops.FakeQuantizeTriton
    monkeypatch.setattr(real, "apply", lambda *args, _apply=real.apply: calls.append(1) or _apply(*args))
    monkeypatch.setattr(quantizer_module, "_fused_device", lambda tensor: True)
    ops.force_backend("triton")
    try:
        actual, actual_grads = run(fused)
    finally:
        ops.force_backend(None)
    assert len(calls) >= 6, "every quantizer (3 weights, at least 3 activations) went through the kernels"
    assert torch.equal(actual, expected) if not learnable else torch.allclose(actual, expected, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
