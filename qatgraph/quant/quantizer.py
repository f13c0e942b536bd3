"""The fake-quantizer module: one per quantized tensor (activations) or weight.

A :class:`FakeQuantizer` holds its scale and zero-point as buffers (a parameter when the scale is
learnable), plus ``enabled`` and ``calibrated`` flags, so everything survives ``state_dict()`` /
``load_state_dict()`` into a freshly compiled model. It has three states:

* collecting (during :func:`qatgraph.calibrate`): passes tensors through and feeds a calibrator;
* enabled: fake-quantizes with a straight-through estimator (gradient 1 inside the range, 0 outside);
* disabled: identity (a layer left in floating point, or a sensitivity probe).

Equivalent implementations of the fake-quant, picked per call (same integers, same gradient):

* eager, CUDA, fp32/bf16/fp16: one fused kernel per direction (:mod:`qatgraph.ops.fake_quant_cuda`:
  Triton by default, ATen's cachemask kernels with ``QATGRAPH_CUDA_FAKE_QUANT=aten``), computed in fp32 registers and
  returned in the input's dtype, with no upcast copy of the activation; learnable scales too;
* eager, CPU, float32: qatgraph's CPU kernel (:mod:`qatgraph.ops.fake_quant_cpu`);
* under ``torch.compile``, per-tensor quantizers: plain tensor arithmetic wrapped in an autograd
  function whose backward reads a saved one-byte mask (``compiled_form="mask"``, exactly ATen's
  gradient), or :func:`fake_quantize_reference` (``compiled_form="clip"``), whose gradient
  Inductor derives from ``minimum``/``maximum`` clips. Both fuse into neighbouring kernels; which
  is cheaper depends on the producer of the tensor (see ``COMPILED_FORMS``);
* everything else (per-channel weights when compiled, learnable scales on the CPU, CPU
  fp16/bf16/fp64 inputs, computed in float32): :func:`fake_quantize_reference`.

Low-precision semantics, the same on every path: ``fake_quantize(x.float()).to(x.dtype)``. The
rounding is ONNX QuantizeLinear's, ``round_half_even(x / scale)`` with an IEEE float32 division (what
ONNX Runtime computes), on every path but the opt-in ``aten`` CUDA backend, which multiplies by
``1 / scale`` as ATen does and so rounds values within an ulp of a tie the other way, and compiled
graphs on CUDA, where Inductor emits Triton's approximate fp32 division unless
``TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from qatgraph.errors import CalibrationError, NotCalibratedError
from qatgraph.ops.fake_quant_cpu import broadcast_qparams, fake_quantize_cpu
from qatgraph.ops.fake_quant_cuda import SUPPORTED_DTYPES as CUDA_DTYPES
from qatgraph.ops.fake_quant_cuda import (
    fake_quantize_cuda,
    fake_quantize_learnable_cuda,
    learnable_kernel_available,
)
from qatgraph.policy import QuantSpec

from .calibrators import Calibrator, make_calibrator
from .state_format import check_stored_format, fill_missing_format, format_of

_MIN_AMAX = 1e-8  # an all-zero tensor still gets a valid (positive) scale

CompiledForm = Literal["mask", "clip"]
#: How a per-tensor quantizer fake-quantizes inside a ``torch.compile``d graph. Measured with
#: benchmarks/qat_step.py's models (compiled forward + backward, FP32 and the forms interleaved in
#: one process, 2 CPU threads, Inductor): every quantizer on "mask" gave MobileNetV2-like
#: 0.93-0.95x FP32 against 1.12x with "clip" everywhere, but ResNet-18-like 1.38x against 1.14x;
#: "clip" on the quantizers fed by a ReLU and "mask" on the rest gave ResNet-18-like 1.14x. A
#: likely reason: in the float model the ReLU's backward reads the output the next convolution
#: saves anyway; after a quantizer that convolution saves the quantized tensor instead, and only
#: the "clip" form lets Inductor rebuild both masks from one saved tensor. So passes/materialize
#: gives "clip" to quantizers whose input comes straight from a ReLU, "mask" to all others.
COMPILED_FORMS: tuple[CompiledForm, ...] = ("mask", "clip")


def scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that map ``[lo, hi]`` onto ``[spec.qmin, spec.qmax]``."""
    lo, hi = lo.float(), hi.float()
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs()).clamp_min(_MIN_AMAX)
        return amax / spec.qmax, torch.zeros_like(amax, dtype=torch.int32)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # zero must be exactly representable
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(_MIN_AMAX / spec.qmax)
    zero_point = torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def _grad_scaled(scale: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value as ``scale``, gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    scaled = scale * factor
    return (scale - scaled).detach() + scaled


def fake_quantize_reference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                            qmin: int, qmax: int, axis: int | None) -> torch.Tensor:
    """Fake-quantize with plain tensor ops: fusable by Inductor, differentiable in ``scale``.

    Gradient w.r.t. ``x`` is the straight-through estimator (1 where the rounded value lies in
    the range, 0 elsewhere, as in the ATen kernels);
    w.r.t. ``scale`` it is LSQ's. Computed in float32 and cast back to ``x.dtype``.
    """
    scale, zero_point = broadcast_qparams(x, scale, zero_point, axis)
    # Same arithmetic as the eager kernels and ONNX QuantizeLinear (divide by the scale, round,
    # then shift by the zero point), so eager float32, bf16 and compiled graphs agree bit for bit,
    # ties included, and with ONNX Runtime (compiled on CUDA: with Inductor's IEEE division, see the
    # module docstring).
    x32 = x.float()
    zero_point = zero_point.to(torch.float32)
    scaled = x32 / scale
    low, high = qmin - zero_point, qmax - zero_point
    # ATen's mask is taken on the *rounded* value: an input up to half a step outside the range
    # still rounds onto it and keeps gradient 1. So clip to the range widened by half a step.
    # Each bound sits one float off the half-way tie, on the side that classifies the tie as ATen
    # does (half to even: -128.5 rounds into [-128, 127], 127.5 out of it), so ties get gradient
    # 1 or 0 exactly; only an input equal to the bound itself gets 0.5 (minimum/maximum split
    # ties). clamp on tie-exact bounds would give ATen's mask everywhere, but Inductor compiles
    # it differently: compiled forward + backward measured 1.22-1.32x FP32 with clamp against
    # 1.11-1.15x with minimum/maximum on ResNet-18-like, and 1.06-1.08x against 1.15-1.18x on
    # MobileNetV2-like (2 CPU threads); ReLU-fed quantizers in ResNet-style networks decided
    # (the others use the "mask" form when compiled, see COMPILED_FORMS). The bounds are
    # scalars or per-channel vectors.
    lower_tie, upper_tie = low - 0.5, high + 0.5
    lower = torch.nextafter(lower_tie, torch.where(torch.round(lower_tie) >= low, lower_tie - 1, lower_tie + 1))
    upper = torch.nextafter(upper_tie, torch.where(torch.round(upper_tie) <= high, upper_tie + 1, upper_tie - 1))
    clipped = torch.minimum(torch.maximum(scaled, lower), upper)
    coded = torch.minimum(torch.maximum(torch.round(clipped), low), high)
    rounded = clipped + (coded - clipped).detach()
    return (rounded * scale).to(x.dtype)


class FakeQuantizer(nn.Module):
    """Simulated quantization of one tensor (per tensor) or one weight (per channel)."""

    def __init__(self, spec: QuantSpec, *, axis: int | None = None, num_channels: int | None = None,
                 name: str = "", is_weight: bool = False, compiled_form: CompiledForm = "mask") -> None:
        super().__init__()
        if spec.per_channel and (axis is None or num_channels is None):
            raise ValueError(f"per-channel quantizer {name!r} needs axis and num_channels")
        if compiled_form not in COMPILED_FORMS:
            raise ValueError(f"quantizer {name!r}: compiled_form must be one of {COMPILED_FORMS}, got {compiled_form!r}")
        #: per-tensor fake-quant form inside ``torch.compile`` (see ``COMPILED_FORMS``); a plain
        #: attribute, set by the compile passes, so Dynamo treats it as a constant
        self.compiled_form: CompiledForm = compiled_form
        self.spec = spec
        self.axis = axis if spec.per_channel else None
        self.name = name
        self.is_weight = is_weight
        shape = (num_channels,) if self.axis is not None else ()
        scale = torch.ones(shape)
        if spec.learnable_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("enabled", torch.tensor(True))
        self.register_buffer("calibrated", torch.tensor(False))
        # Python mirrors of the two flags: forward branches on them without reading a tensor,
        # so torch.compile sees constants (no graph break); kept in sync on every change.
        self._enabled_flag = True
        self._calibrated_flag = False
        self.register_load_state_dict_post_hook(_sync_flags)
        # the saved state carries the format (state_format): refused before copying when it differs
        self._register_load_state_dict_pre_hook(fill_missing_format, with_module=True)
        self.collecting = False
        self.range_frozen = False
        self._calibrator: Calibrator | None = None
        self._batches_seen = 0

    # ---------------------------------------------------------------- properties
    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    @property
    def is_enabled(self) -> bool:
        return self._enabled_flag

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated_flag

    @property
    def tracks_weight_max(self) -> bool:
        """Weight scales from the ``max`` calibrator follow the weights while they train."""
        return self.is_weight and self.spec.calibrator == "max" and not self.spec.learnable_scale and \
            not self.range_frozen

    def freeze_range(self) -> None:
        """Fix the scale from now on (late in QAT): no weight-max tracking, no scale gradient."""
        self.range_frozen = True
        if isinstance(self.scale, nn.Parameter):
            self.scale.requires_grad_(False)

    def amax(self) -> torch.Tensor:
        """The clipping threshold(s) implied by the current scale (symmetric: scale * qmax)."""
        scale = self.scale.detach()
        if self.spec.symmetric:
            return scale * self.qmax
        zero_point = self.zero_point.float()
        return torch.maximum((self.qmin - zero_point).abs(), (self.qmax - zero_point).abs()) * scale

    def enable(self, on: bool = True) -> FakeQuantizer:
        self.enabled.fill_(bool(on))
        self._enabled_flag = bool(on)
        return self

    def disable(self) -> FakeQuantizer:
        return self.enable(False)

    # ---------------------------------------------------------------- calibration
    def start_calibration(self) -> None:
        self._calibrator = make_calibrator(self.spec, axis=self.axis)
        self._batches_seen = 0
        self.collecting = True

    @property
    def calibrator(self) -> Calibrator | None:
        """The calibrator collecting statistics (between start and stop of calibration), else None."""
        return self._calibrator

    def collected_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range the calibrator settled on; raises if this quantizer saw no data."""
        calibrator = self._calibrator
        # the calibrator's count, not _batches_seen: it includes other processes' batches once merged
        if calibrator is None or calibrator.num_batches == 0:
            raise CalibrationError(
                f"quantizer {self.name!r} saw no data during calibration: the layer it feeds never ran. "
                "Check that the calibration batches exercise this part of the model (e.g. a branch taken only "
                "for some inputs), or skip the layer in the policy.")
        try:
            return calibrator.compute_range()
        except CalibrationError as exc:
            raise CalibrationError(f"quantizer {self.name!r}: {exc}") from None

    def stop_calibration(self) -> None:
        self.collecting = False
        self._calibrator = None

    def finish_calibration(self) -> None:
        """Turn the collected statistics into a scale and leave calibration mode."""
        lo, hi = self.collected_range()
        self.stop_calibration()
        self.set_range(lo, hi)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zero_point = scale_zero_point(lo, hi, self.spec)
        with torch.no_grad():
            self.scale.copy_(scale.to(self.scale.device).reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.to(self.zero_point.device).reshape(self.zero_point.shape))
        self.calibrated.fill_(True)
        self._calibrated_flag = True

    def calibrate_from(self, tensor: torch.Tensor) -> None:
        """One-shot calibration from a tensor (weights: they are known at compile time)."""
        self.start_calibration()
        self._collect(tensor)
        self.finish_calibration()

    def _collect(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "Inf"
            raise CalibrationError(
                f"quantizer {self.name!r} received {bad} values in calibration batch {self._batches_seen + 1}: "
                "the calibration data or the layers before this tensor produce non-finite values. Clean the data "
                "(e.g. normalize inputs, drop corrupt samples) or check the model in floating point first.")
        assert self._calibrator is not None
        self._calibrator.collect(x)
        self._batches_seen += 1

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.collecting:
            self._collect(x)
            return x
        if not self._enabled_flag:
            return x
        if self.training and self.tracks_weight_max:
            self._track_weight_max(x)
        elif not self._calibrated_flag:
            raise NotCalibratedError(
                f"quantizer {self.name!r} has no scale yet: run qatgraph.calibrate(model, batches) before "
                "training or evaluating the compiled model (or disable this quantizer).")
        return self._fake_quantize(x)

    def _track_weight_max(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            detached = weight.detach()
            if self.axis is None:
                rows = detached.reshape(1, -1)
            else:
                rows = detached.transpose(0, self.axis).reshape(detached.shape[self.axis], -1)
            if self.spec.symmetric:
                # One reduction and one division per step (this runs for every weight, every step):
                # max |w| per row, as scale_zero_point computes it, written straight into the scale.
                amax = torch.linalg.vector_norm(rows, ord=math.inf, dim=1).float().clamp_min_(_MIN_AMAX)
                torch.div(amax.reshape(self.scale.shape), self.qmax, out=self.scale)
            else:
                lo, hi = rows.amin(dim=1), rows.amax(dim=1)
                scale, zero_point = scale_zero_point(lo, hi, self.spec)
                self.scale.copy_(scale.reshape(self.scale.shape))
                self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
            if not self._calibrated_flag:
                self.calibrated.fill_(True)
                self._calibrated_flag = True

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.scale, self.zero_point
        compiling = torch.compiler.is_compiling()
        if self.spec.learnable_scale:
            numel = x.numel() if self.axis is None else x.numel() // x.shape[self.axis]
            scale = _grad_scaled(scale, 1.0 / math.sqrt(max(numel, 1) * max(self.qmax, 1)))
            if _fused_device(x) and not compiling and x.dtype in CUDA_DTYPES and learnable_kernel_available():
                return fake_quantize_learnable_cuda(x, scale, zero_point, self.qmin, self.qmax, self.axis)
            return fake_quantize_reference(x, scale, zero_point, self.qmin, self.qmax, self.axis)
        if compiling:
            if self.axis is None and self.compiled_form == "mask":
                # The torch-op form of the eager CPU autograd function (saved bool mask, ATen's exact
                # gradient): Dynamo traces its forward and backward, so Inductor fuses them like plain ops.
                return fake_quantize_cpu(x.float(), scale, zero_point, self.qmin, self.qmax, None,
                                         use_kernel=False).to(x.dtype)
            return fake_quantize_reference(x, scale, zero_point, self.qmin, self.qmax, self.axis)
        if _fused_device(x) and x.dtype in CUDA_DTYPES:
            return fake_quantize_cuda(x, scale, zero_point, self.qmin, self.qmax, self.axis)
        if x.device.type == "cpu" and x.dtype == torch.float32:
            return fake_quantize_cpu(x, scale, zero_point, self.qmin, self.qmax, self.axis)
        return fake_quantize_reference(x, scale, zero_point, self.qmin, self.qmax, self.axis)

    def get_extra_state(self) -> dict:
        """Saved with the scale: bits, signedness, symmetry, axis, channels (see ``state_format``)."""
        return format_of(self).to_state()

    def set_extra_state(self, state) -> None:
        check_stored_format(self, state)  # the format itself comes from the policy, never from the state

    def extra_repr(self) -> str:
        spec = self.spec
        kind = "per-channel(axis=%d)" % self.axis if self.axis is not None else "per-tensor"
        sym = "symmetric" if spec.symmetric else "asymmetric"
        state = "enabled" if self.is_enabled else "disabled"
        calibrated = f"amax={self.amax().max().item():.4g}" if self.is_calibrated else "uncalibrated"
        learn = ", learnable" if spec.learnable_scale else ""
        return f"int{spec.bits} {sym} {kind} [{spec.qmin}, {spec.qmax}] {spec.calibrator}{learn}, {state}, {calibrated}"


def _fused_device(x: torch.Tensor) -> bool:
    """Whether eager fake-quant of ``x`` takes the fused CUDA kernels (a function, so the interpreted
    kernel tests can route CPU tensors through them)."""
    return x.is_cuda


def _sync_flags(quantizer: FakeQuantizer, _incompatible_keys) -> None:
    quantizer._enabled_flag = bool(quantizer.enabled)
    quantizer._calibrated_flag = bool(quantizer.calibrated)


def iter_quantizers(model: nn.Module):
    """(qualified name, quantizer) for every distinct FakeQuantizer in ``model``."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer) and id(module) not in seen:
            seen.add(id(module))
            yield name, module
