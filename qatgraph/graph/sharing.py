"""One quantizer per tensor across traced regions and untraced (eager) code.

Inside a traced graph the passes give a tensor read by several quantized consumers one
quantizer. Where partial tracing leaves code eager, each module-wise layer has its own input
quantizer, and a traced region quantizes its inputs itself: Q, K and V ``Linear`` layers reading
the same hidden states, or a traced body and an untraced shortcut conv reading the block's
input, would each quantize the same tensor (TensorRT's rule: one Q/DQ per tensor; the linter's
``tensor-quantized-twice``). :func:`share_input_quantizers` runs the example inputs once, finds
activation quantizers that read the very same tensor object and makes them one module
(registered under each name, so the state_dict keeps every key). The export then emits one
Q/DQ pair per tensor (identical pairs are merged, ``onnx_postprocess``).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qatgraph.quant.quantizer import FakeQuantizer

log = logging.getLogger(__name__)


def _activation_quantizer_slots(model: nn.Module) -> list[tuple[str, nn.Module, str, FakeQuantizer]]:
    """(qualified name, parent, attribute, quantizer) of every activation quantizer, each slot once."""
    slots = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            if isinstance(child, FakeQuantizer) and not child.is_weight:
                slots.append((f"{parent_name}.{child_name}" if parent_name else child_name, parent, child_name, child))
    return slots


@torch.no_grad()
def share_input_quantizers(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Make activation quantizers that read the same tensor in ``model(*args, **kwargs)`` one
    module (same spec required); returns (dropped name, kept name) pairs."""
    slots = _activation_quantizer_slots(model)
    readers: dict[int, list[FakeQuantizer]] = {}
    alive: list[torch.Tensor] = []  # keeps each input alive so that its id is not reused

    def record(quantizer: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            alive.append(inputs[0])
            group = readers.setdefault(id(inputs[0]), [])
            if not any(q is quantizer for q in group):
                group.append(quantizer)  # type: ignore[arg-type]

    unique = {id(q): q for _, _, _, q in slots}
    hooks = [q.register_forward_pre_hook(record) for q in unique.values()]
    every = {id(m): m for m in model.modules() if isinstance(m, FakeQuantizer)}.values()
    enabled = [(q, q.is_enabled) for q in every]
    was_training = model.training
    model.eval()
    try:
        for quantizer in every:
            quantizer.disable()  # not calibrated yet: pass values through, spec comparisons need no scale
        model(*args, **(kwargs or {}))
    finally:
        model.train(was_training)
        for quantizer, on in enabled:
            quantizer.enable(on)
        for hook in hooks:
            hook.remove()
    keeper: dict[int, FakeQuantizer] = {}
    for group in readers.values():
        first = group[0]
        for other in group[1:]:
            if other.spec == first.spec and other.is_enabled == first.is_enabled and id(other) not in keeper:
                keeper[id(other)] = keeper.get(id(first), first)
    names = {id(q): name for name, _, _, q in reversed(slots)}  # the first slot's name of each module
    shared = []
    for name, parent, attribute, quantizer in slots:
        kept = keeper.get(id(quantizer))
        if kept is not None:
            setattr(parent, attribute, kept)
            shared.append((name, names[id(kept)]))
    if shared:
        log.info("qatgraph: %d quantizer(s) share another's tensor: %s", len(shared),
                 ", ".join(f"{a} -> {b}" for a, b in shared))
    return shared
