"""One quantizer per tensor across traced regions and untraced (eager) code; residual Adds
that untraced code hides from the graph passes.

Inside a traced graph the passes give a tensor read by several quantized consumers one
quantizer. Where partial tracing leaves code eager, each module-wise layer has its own input
quantizer, and a traced region quantizes its inputs itself: Q, K and V ``Linear`` layers reading
the same hidden states, or a traced body and an untraced shortcut conv reading the block's
input, would each quantize the same tensor (TensorRT's rule: one Q/DQ per tensor; the linter's
``tensor-quantized-twice``). :func:`share_input_quantizers` runs the example inputs once, finds
activation quantizers that read the very same tensor object and makes them one module
(registered under each name, so the state_dict keeps every key). The export then emits one
Q/DQ pair per tensor (identical pairs are merged, ``onnx_postprocess``).

The residual rule (quantize the skip input of an Add that follows a weighted op, so TensorRT
fuses the Add into it in INT8) is a graph rewrite: an Add written in untraced Python cannot get
a quantizer. :func:`eager_residual_adds` finds such Adds on the example run so that the trace
report (and ``qatgraph.summary``) names their source lines and the fix (make that forward
traceable) instead of leaving them to a lint warning.

Both need one run of the model. :func:`analyse_untraced` does them (and the fold of BatchNorms
in untraced code, ``bn: fold``) on compile's ``example_inputs``; without them, on the first batch
of ``qatgraph.calibrate`` (``TraceReport.untraced_pending``), before any range is collected.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn

from qatgraph.quant.qmodules import op_kind
from qatgraph.quant.quantizer import FakeQuantizer

from .eager_ops import eager_weighted_ops, float_run, user_line
from .folding import fold_eager_batchnorm
from .queries import BATCHNORM_TYPES

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
    try:
        with float_run(model):
            model(*args, **(kwargs or {}))
    finally:
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


def analyse_untraced(model: nn.Module, report: Any, fold: bool, args: tuple,
                     kwargs: dict[str, Any] | None = None) -> None:
    """Run the untraced code on ``args``/``kwargs`` (one forward per analysis): the residual Adds
    and float weighted ops it hides, one quantizer per tensor and (``fold``) its Conv-BN folds,
    recorded on the ``TraceReport`` ``report``. The read-only analyses run first; the two that
    change the model extend the report as each succeeds, so a failure leaves the report true
    and a second call only adds what the first did not do."""
    report.eager_adds = eager_residual_adds(model, args, kwargs)
    report.eager_weighted = eager_weighted_ops(model, args, kwargs)
    report.shared_quantizers += share_input_quantizers(model, args, kwargs)
    if fold:  # as the fuse pass does in the graphs
        with float_run(model):
            report.eager_folded += fold_eager_batchnorm(model, args, kwargs)
    report.untraced_pending = False


# ---------------------------------------------------------------------------- residual Adds in eager code
_ADDS = {"add", "add_", "__add__", "__radd__", "__iadd__"}


class _AddWatcher(torch.overrides.TorchFunctionMode):
    def __init__(self, produced: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.produced = produced
        self.found: dict[str, None] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if getattr(func, "__name__", "") in _ADDS and len(args) >= 2:
            a, b = args[0], args[1]
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
                    a.is_floating_point() and a.dim() >= 2 and (id(a) in self.produced or id(b) in self.produced):
                where = user_line()
                if where is not None:
                    self.found.setdefault(where)
        return func(*args, **(kwargs or {}))


def eager_residual_adds(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> list[str]:
    """Where untraced code adds a weighted op's (or a traced region's) output to a tensor of
    its shape: residual Adds no graph pass sees, so their skip input stays in float."""
    produced: dict[int, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            produced[id(output)] = output

    watched = [m for m in model.modules() if op_kind(m) is not None or isinstance(m, BATCHNORM_TYPES) or
               (isinstance(m, fx.GraphModule) and "qatgraph_prefix" in m.meta)]
    hooks = [m.register_forward_hook(keep) for m in watched]
    watcher = _AddWatcher(produced)
    try:
        with float_run(model), watcher:
            model(*args, **(kwargs or {}))
    finally:
        for hook in hooks:
            hook.remove()
    return list(watcher.found)
