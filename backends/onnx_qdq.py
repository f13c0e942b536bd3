"""Turn a calibrated QAT model into an export-ready module whose quantizers become ONNX Q/DQ.

Used by :func:`qatgraph.backends.onnx.export_onnx`. Expects a model from ``qatgraph.compile``
(graph regions are GraphModules carrying ``meta["qatgraph_prefix"]``; weighted layers carry a
``weight_quantizer``) whose enabled quantizers are calibrated.

:func:`prepare_for_export` works on a deep copy in eval mode and guarantees:

* BatchNorm is folded into its Conv/ConvTranspose/Linear in every graph region, exactly: the
  per-channel weight scales are rescaled (``qatgraph.graph.folding``), so ``bn: train`` models export
  the same integers as ``bn: fold`` ones (up to float-rounding ties, ~1e-5 of the weights);
* every enabled activation :class:`FakeQuantizer` becomes :class:`QuantizeDequantize`, a call of
  the custom op ``qatgraph_onnx::quantize_dequantize`` that the ONNX translations below turn into
  exactly one ``QuantizeLinear -> DequantizeLinear`` pair (scale float32, zero point int8 for
  signed / uint8 for unsigned specs, INT4/UINT4 at opset >= 21); learnable scales are frozen
  into constants; disabled quantizers become ``nn.Identity`` and vanish from the graph;
* every quantized weight is replaced by its integers, read back from the quantizer's own
  fake-quant output (so they are the values PyTorch trains with, narrow range [-127, 127]
  included), stored as an int8 (uint8 for asymmetric specs) buffer under the original name and
  dequantized by ``qatgraph_onnx::dequantize`` -> one ``DequantizeLinear`` on an INT8
  initializer; no float weight or weight ``QuantizeLinear`` reaches the ONNX file.

The custom ops run in PyTorch too (the export module computes what the QAT model computes), have
fake implementations for ``torch.export``, an onnxscript translation for the dynamo exporter and
a symbolic for the TorchScript exporter.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.fx as fx
from onnx import TensorProto
from torch import nn

from qatgraph.errors import ExportError, listing
from qatgraph.graph.folding import fold_eager_batchnorm, fold_graph_batchnorm
from qatgraph.quant.quantizer import (
    FakeQuantizer,
    fake_quantize_reference,
    iter_quantizers,
)

log = logging.getLogger(__name__)

# (qmin, qmax) -> ONNX element type of a Q/DQ pair that saturates to exactly that range.
ACTIVATION_STORAGE = {(-128, 127): TensorProto.INT8, (0, 255): TensorProto.UINT8,
                      (-8, 7): TensorProto.INT4, (0, 15): TensorProto.UINT4}
INT4_MIN_OPSET = 21  # first opset whose QuantizeLinear/DequantizeLinear accept INT4/UINT4


# ---------------------------------------------------------------------------- custom ops
# An axis < 0 means per tensor: export modules normalize per-channel axes to >= 0 first.
@torch.library.custom_op("qatgraph_onnx::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                        qmin: int, qmax: int) -> torch.Tensor:
    """Fake-quantize ``x`` (ONNX: QuantizeLinear -> DequantizeLinear): ``round(x / scale)``, the
    rounding of QuantizeLinear and of FakeQuantizer (not ATen's ``x * (1 / scale)``)."""
    zero_point = zero_point.to(torch.int32)
    return fake_quantize_reference(x, scale.float(), zero_point, qmin, qmax, axis if axis >= 0 else None)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("qatgraph_onnx::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32 (ONNX: DequantizeLinear)."""
    shape = [1] * q.dim()
    if axis >= 0:
        shape[axis] = -1
    return (q.float() - zero_point.float().reshape(shape)) * scale.float().reshape(shape)


@dequantize.register_fake
def _(q, scale, zero_point, axis):
    return q.new_empty(q.shape, dtype=torch.float32)


def dynamo_translations(opset: int) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` at ``opset``."""
    import onnxscript  # only the dynamo exporter needs it (and it is slow to import)

    op = getattr(onnxscript, f"opset{opset}")

    def typed_zero_point(zero_point, qmin: int, qmax: int):
        storage = ACTIVATION_STORAGE.get((qmin, qmax))
        if storage in (TensorProto.INT4, TensorProto.UINT4):  # torch has no int4 buffers
            return op.Cast(zero_point, to=storage)
        return zero_point

    def quantize_dequantize_onnx(x, scale, zero_point, axis: int, qmin: int, qmax: int):
        axis_attr = {"axis": axis} if axis >= 0 else {}
        zero_point = typed_zero_point(zero_point, qmin, qmax)
        quantized = op.QuantizeLinear(x, scale, zero_point, **axis_attr)
        return op.DequantizeLinear(quantized, scale, zero_point, **axis_attr)

    def dequantize_onnx(q, scale, zero_point, axis: int):
        return op.DequantizeLinear(q, scale, zero_point, **({"axis": axis} if axis >= 0 else {}))

    return {torch.ops.qatgraph_onnx.quantize_dequantize.default: quantize_dequantize_onnx,
            torch.ops.qatgraph_onnx.dequantize.default: dequantize_onnx}


_SYMBOLICS_REGISTERED = False


def register_torchscript_symbolics() -> None:
    """Teach the TorchScript exporter the two custom ops (once per process)."""
    global _SYMBOLICS_REGISTERED
    if _SYMBOLICS_REGISTERED:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v", "v", "v", "i", "i", "i")
    def quantize_dequantize_symbolic(g, x, scale, zero_point, axis, qmin, qmax):
        axis_attr = {"axis_i": axis} if axis >= 0 else {}
        quantized = g.op("QuantizeLinear", x, scale, zero_point, **axis_attr)
        return g.op("DequantizeLinear", quantized, scale, zero_point, **axis_attr)

    @parse_args("v", "v", "v", "i")
    def dequantize_symbolic(g, q, scale, zero_point, axis):
        return g.op("DequantizeLinear", q, scale, zero_point, **({"axis_i": axis} if axis >= 0 else {}))

    register_custom_op_symbolic("qatgraph_onnx::quantize_dequantize", quantize_dequantize_symbolic, 13)
    register_custom_op_symbolic("qatgraph_onnx::dequantize", dequantize_symbolic, 13)
    _SYMBOLICS_REGISTERED = True


# ---------------------------------------------------------------------------- export modules
def _frozen_params(quantizer: FakeQuantizer, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32 constant, learnable or not) and zero point in the storage dtype."""
    zero_point = quantizer.zero_point.detach()
    outside = (zero_point < quantizer.qmin) | (zero_point > quantizer.qmax)
    if bool(outside.any()):  # an int8/uint8 cast would wrap it silently (131 -> -125)
        raise ExportError(f"quantizer {quantizer.name!r} has zero point(s) {sorted(set(zero_point[outside].tolist()))[:4]} "
                          f"outside its integer range [{quantizer.qmin}, {quantizer.qmax}]: its state does not fit its "
                          "format (was a state of another policy loaded into it?). Recalibrate the model "
                          "(qatgraph.calibrate) or load a state saved with this model's policy.")
    scale = quantizer.scale.detach().clone().float()
    zero_point = quantizer.zero_point.detach().clone().to(torch.int8 if signed else torch.uint8)
    return scale, zero_point


class QuantizeDequantize(nn.Module):
    """Export stand-in for an enabled activation quantizer: one QuantizeLinear -> DequantizeLinear."""

    def __init__(self, quantizer: FakeQuantizer) -> None:
        super().__init__()
        scale, zero_point = _frozen_params(quantizer, signed=quantizer.qmin < 0)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.axis, self.qmin, self.qmax = quantizer.axis, quantizer.qmin, quantizer.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim() if self.axis is not None else -1
        return torch.ops.qatgraph_onnx.quantize_dequantize(x, self.scale, self.zero_point, axis, self.qmin, self.qmax)


class DequantizeWeight(nn.Module):
    """Export stand-in for a weight quantizer: dequantizes the layer's integer ``weight`` buffer."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.axis = axis

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        axis = self.axis % weight.dim() if self.axis is not None else -1
        return torch.ops.qatgraph_onnx.dequantize(weight, self.scale, self.zero_point, axis)


@torch.no_grad()
def integer_weight(layer: nn.Module, quantizer: FakeQuantizer, name: str = "weight") -> torch.Tensor:
    """The layer's quantized weight as integers in ``[qmin, qmax]`` (int8, or uint8 if unsigned)."""
    if quantizer.qmin < -128 or quantizer.qmax > 255 or (quantizer.qmin < 0 and quantizer.qmax > 127):
        raise ExportError(f"weight quantizer {quantizer.name!r} has range [{quantizer.qmin}, {quantizer.qmax}], "
                          "which fits neither int8 nor uint8; ONNX Q/DQ weights need bits <= 8")
    weight = getattr(layer, name).detach().float()
    shape = [1] * weight.dim()
    if quantizer.axis is not None:
        shape[quantizer.axis] = -1
    scale = quantizer.scale.detach().float().reshape(shape)
    zero_point = quantizer.zero_point.detach().float().reshape(shape)
    # Divide the quantizer's own output (exact multiples of the scale) rather than the raw
    # weight: the integers are then the ones PyTorch computes with, whatever its rounding path.
    fake_quantized = quantizer(weight).float()
    integers = torch.clamp(torch.round(fake_quantized / scale) + zero_point, quantizer.qmin, quantizer.qmax)
    return integers.to(torch.int8 if quantizer.qmin < 0 else torch.uint8)


def _swap_weight(layer: nn.Module, quantizer: FakeQuantizer, name: str = "weight") -> None:
    integers = integer_weight(layer, quantizer, name)
    scale, zero_point = _frozen_params(quantizer, signed=quantizer.qmin < 0)
    delattr(layer, name)  # the float parameter must not reach the ONNX file
    layer.register_buffer(name, integers)
    setattr(layer, "weight_quantizer" if name == "weight" else f"{name}_quantizer",
            DequantizeWeight(scale, zero_point, quantizer.axis))


def functional_weight_quantizers(module: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    """(tensor name, quantizer) of the functional-op weights held by ``module`` (passes/materialize.py
    registers ``<name>_quantizer`` next to a parameter or buffer ``<name>`` that F.linear/matmul read)."""
    found = []
    for child_name, child in module.named_children():
        tensor = child_name[:-len("_quantizer")] if child_name.endswith("_quantizer") else None
        if tensor and tensor not in ("weight", "input") and isinstance(child, FakeQuantizer) and child.is_weight and \
                isinstance(getattr(module, tensor, None), torch.Tensor):
            found.append((tensor, child))
    return found


def check_activation_range(name: str, quantizer: FakeQuantizer, opset: int) -> None:
    """Raise unless a Q/DQ pair at ``opset`` saturates to exactly the quantizer's range."""
    spec_range = (quantizer.qmin, quantizer.qmax)
    storage = ACTIVATION_STORAGE.get(spec_range)
    if storage in (TensorProto.INT8, TensorProto.UINT8):
        return
    where = f"activation quantizer {quantizer.name or name!r} ({quantizer.spec.bits}-bit, range {list(spec_range)})"
    if storage is not None and opset >= INT4_MIN_OPSET:
        return
    if storage is not None:
        raise ExportError(f"{where}: ONNX QuantizeLinear has INT4/UINT4 outputs only from opset {INT4_MIN_OPSET}; "
                          f"at opset {opset} it would saturate to the 8-bit range and not match training. Export "
                          f"with opset={INT4_MIN_OPSET} (dynamo exporter, ONNX Runtime >= 1.20) or use 8-bit "
                          "activations for this layer in the policy.")
    raise ExportError(f"{where}: ONNX has no integer type with this range (QuantizeLinear saturates to the full "
                      "INT8 [-128, 127] / UINT8 [0, 255] range, or INT4/UINT4 from opset 21), so the exported model "
                      "would not compute what was trained. Use full-range 8-bit activations (narrow_range: false), "
                      "or 4-bit at opset >= 21; weights of any width <= 8 export fine.")


# ---------------------------------------------------------------------------- preparation
def graph_regions(model: nn.Module) -> list[fx.GraphModule]:
    """Every traced region of a compiled model (the root itself when it is one graph)."""
    return [m for m in model.modules() if isinstance(m, fx.GraphModule) and "qatgraph_prefix" in m.meta]


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold BN into the preceding weighted layer in every graph region; returns folded BN names."""
    return [name for region in graph_regions(model) for name in fold_graph_batchnorm(region, snap_to_codes=True)]


def check_calibrated(model: nn.Module) -> None:
    missing = [q.name or name for name, q in iter_quantizers(model) if q.is_enabled and not q.is_calibrated]
    if missing:
        raise ExportError(f"cannot export: {len(missing)} enabled quantizer(s) have no scale yet ({listing(missing)}): "
                          "run qatgraph.calibrate first (qatgraph.calibrate(model, batches)), or disable them.")


def prepare_for_export(qmodel: nn.Module, opset: int, args: tuple | None = None) -> tuple[nn.Module, list[str]]:
    """(export module, folded BN names): a deep copy in eval mode with BN folded and quantizers swapped.

    With the example ``args``, BNs that follow a weighted layer in untraced (eager) code are
    folded too (:func:`~qatgraph.graph.folding.fold_eager_batchnorm`)."""
    check_calibrated(qmodel)
    model = copy.deepcopy(qmodel).eval()
    folded = fold_batchnorm(model)
    if args is not None:
        folded += fold_eager_batchnorm(model, args, snap_to_codes=True)
    counts = {"weights": 0, "activations": 0, "disabled": 0}
    for layer in list(model.modules()):
        quantizer = getattr(layer, "weight_quantizer", None)
        if isinstance(quantizer, FakeQuantizer):
            if quantizer.is_enabled:
                _swap_weight(layer, quantizer)
            else:
                layer.weight_quantizer = nn.Identity()
            counts["weights" if quantizer.is_enabled else "disabled"] += 1
        for tensor, quantizer in functional_weight_quantizers(layer):
            if quantizer.is_enabled:
                _swap_weight(layer, quantizer, tensor)
            else:
                setattr(layer, f"{tensor}_quantizer", nn.Identity())
            counts["weights" if quantizer.is_enabled else "disabled"] += 1
    stand_ins: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, FakeQuantizer):
                continue
            if child.is_enabled:
                check_activation_range(child_name, child, opset)
            if id(child) not in stand_ins:  # a quantizer shared by several slots stays one module
                stand_ins[id(child)] = QuantizeDequantize(child) if child.is_enabled else nn.Identity()
                counts["activations" if child.is_enabled else "disabled"] += 1
            setattr(parent, child_name, stand_ins[id(child)])
    log.debug("qatgraph export: %(weights)d INT8 weights, %(activations)d activation Q/DQ, %(disabled)d disabled "
              "quantizers removed", counts)
    return model, folded
