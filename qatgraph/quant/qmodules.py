"""Quantized weighted layers: Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear with a weight quantizer.

The quantized classes subclass the torch classes and are swapped in place of the originals
(``module.__class__ = QuantConv2d``), so parameter names, shapes and ``isinstance`` checks are
unchanged: a checkpoint of the compiled model still carries ``conv.weight`` / ``conv.bias``.
Activation quantizers normally live in the graph (one per tensor, shared by its consumers); an
``input_quantizer`` inside the layer is used only for layers in parts of a model torch.fx
could not trace (module-wise quantization).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qatgraph.policy import QuantSpec

from .quantizer import FakeQuantizer


class QuantWeightMixin:
    """Shared behaviour of quantized weighted layers.

    ``trainable_rows`` (a non-persistent buffer, set by the EfQAT controller in
    qatgraph/efqat/controller.py) is an int64 tensor of the output rows that get a weight gradient;
    the forward then goes through the ``qatgraph::masked_*`` ops, whose backward computes the
    weight gradient of those rows only. ``None`` (the default) is ordinary QAT. Being a buffer, it
    moves with ``.to()`` / ``.cuda()`` like the weight it indexes.
    """

    weight: nn.Parameter
    weight_quantizer: FakeQuantizer
    input_quantizer: FakeQuantizer | None

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x

    def _partial_weight_grad(self) -> bool:
        return self._buffers.get("trainable_rows") is not None and self.training and \
            torch.is_grad_enabled() and self.weight.requires_grad


class _QuantConvMixin(QuantWeightMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._quantize_input(x), self.quantized_weight()
        if not self._partial_weight_grad():
            return self._conv_forward(x, weight, self.bias)
        from qatgraph.ops.partial_grad import masked_conv

        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return masked_conv(x, weight, self.bias, self.trainable_rows, self.stride, padding, self.dilation,
                           self.groups)


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    pass


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    pass


class QuantConv3d(_QuantConvMixin, nn.Conv3d):
    pass


class _QuantConvTransposeMixin(QuantWeightMixin):
    _functional = staticmethod(F.conv_transpose2d)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        num_spatial_dims = self.weight.dim() - 2
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              num_spatial_dims, self.dilation)
        return self._functional(self._quantize_input(x), self.quantized_weight(), self.bias, self.stride,
                                self.padding, output_padding, self.groups, self.dilation)


class QuantConvTranspose1d(_QuantConvTransposeMixin, nn.ConvTranspose1d):
    _functional = staticmethod(F.conv_transpose1d)


class QuantConvTranspose2d(_QuantConvTransposeMixin, nn.ConvTranspose2d):
    _functional = staticmethod(F.conv_transpose2d)


class QuantConvTranspose3d(_QuantConvTransposeMixin, nn.ConvTranspose3d):
    _functional = staticmethod(F.conv_transpose3d)


class QuantLinear(QuantWeightMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._quantize_input(x), self.quantized_weight()
        if not self._partial_weight_grad():
            return F.linear(x, weight, self.bias)
        from qatgraph.ops.partial_grad import masked_linear

        return masked_linear(x, weight, self.bias, self.trainable_rows)


QUANT_CLASSES: dict[type, type] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d, nn.Linear: QuantLinear,
}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def weight_axis(module: nn.Module) -> int:
    """Output-channel axis of the weight: 1 for ConvTranspose (weight is [in, out/groups, ...]), else 0."""
    return 1 if isinstance(module, CONV_TRANSPOSE_TYPES) else 0


_FLOAT_CLASS = {quant: float_class for float_class, quant in QUANT_CLASSES.items()}


def op_kind(module: nn.Module) -> str | None:
    """'conv', 'conv_transpose', 'linear' or None for modules qatgraph does not quantize.

    Exact classes only (or their quantized versions): a user subclass of Conv2d may override
    ``forward`` with something a quantized Conv2d would not reproduce.
    """
    klass = _FLOAT_CLASS.get(type(module), type(module))
    if klass in CONV_TYPES:
        return "conv"
    if klass in CONV_TRANSPOSE_TYPES:
        return "conv_transpose"
    if klass is nn.Linear:
        return "linear"
    return None


def quantize_module(module: nn.Module, weight_spec: QuantSpec, name: str,
                    input_spec: QuantSpec | None = None) -> nn.Module:
    """Turn a Conv/ConvTranspose/Linear into its quantized class in place and return it.

    The weight quantizer is calibrated from the current weight right away, so a compiled model
    has weight scales before any activation calibration.
    """
    quant_class = QUANT_CLASSES[type(module)]
    axis = weight_axis(module)
    weight = module.weight
    quantizer = FakeQuantizer(weight_spec, axis=axis if weight_spec.per_channel else None,
                              num_channels=weight.shape[axis], name=f"{name}.weight_quantizer", is_weight=True)
    quantizer.to(weight.device)
    quantizer.calibrate_from(weight.detach())
    module.__class__ = quant_class
    module.weight_quantizer = quantizer
    module.input_quantizer = None
    module.register_buffer("trainable_rows", None, persistent=False)
    if input_spec is not None:
        module.input_quantizer = FakeQuantizer(input_spec, name=f"{name}.input_quantizer").to(weight.device)
    return module
