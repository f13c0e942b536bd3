"""Pass 6 — EfQAT freezing (runs last, on the whole model, only when ``policy.freeze`` is set).

Expects: a materialized QAT model (quantized Conv/Linear modules and functional ops with weight
quantizers), ideally calibrated (importance is computed from the weights, which calibration does
not change).
Guarantees:
* a :class:`~qatgraph.efqat.controller.FreezeController` is attached as ``model.qatgraph_freeze``: each
  quantized Conv1d/2d/3d and Linear, and each parameter quantized functional ops read
  (``F.linear(x, self.qkv.weight)``, a decomposed ``nn.MultiheadAttention``'s in-projection,
  ``F.conv*``, ``x @ self.w``), trains only its selected rows through the ``qatgraph::masked_*``
  ops (CWPL/CWPN; those functional ops are rewritten in their graph to
  :func:`qatgraph.efqat.functional.masked_call`, the original op outside training), or whole
  layers are frozen (LWPN: ``weight.requires_grad = False``, no weight-gradient GEMM at all);
* frozen rows stay bit-identical through any optimizer step; importance is refreshed every
  ``freeze.interval`` training samples;
* parameter names and shapes are unchanged (checkpoints load into the uncompiled model), and the
  ONNX export is the unfrozen model's;
* Conv/Linear layers and functional ops left in floating point train (``freeze.float_layers:
  train``, the summary says so) or have their weights frozen too (``float_layers: freeze``: LWPN
  0 % then trains no weight);
* each layer's current frozen state shows in ``qatgraph.summary`` (column "frozen").
This pass works on the whole model rather than one graph region because CWPN and LWPN rank rows
and layers across the network.
"""
from __future__ import annotations

from torch import nn

from qatgraph.efqat.controller import FreezeController
from qatgraph.policy import Policy


def apply(model: nn.Module, policy: Policy) -> nn.Module:
    if policy.freeze is None:
        return model
    existing = getattr(model, "qatgraph_freeze", None)
    if existing is not None:
        existing.remove()
    model.qatgraph_freeze = FreezeController(model, policy.freeze)
    return model
