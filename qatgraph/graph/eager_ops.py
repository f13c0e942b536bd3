"""Weighted ops that untraced (eager) code runs on the model's own parameters.

Partial tracing quantizes the Conv/Linear *modules* of untraced code module-wise, but an op
written in that code on a parameter — ``F.linear(x, self.w)``, ``x @ self.proj``,
``torch.einsum(..., self.w)``, an ``nn.MultiheadAttention`` the untraced forward calls that
:mod:`.attention_calls` could not make a graph of (no example inputs, called several ways, named a
leaf), a user subclass of ``nn.Linear`` whose own forward calls ``F.linear`` — has no graph node to annotate.
It stays in floating point. :func:`eager_weighted_ops` finds such ops on one run of the model
(compile's ``example_inputs``, or the first calibration batch) so that each gets a float row in
``qatgraph.summary`` with its source line and the fix, and EfQAT counts its parameters among the
float layers (``freeze.float_layers``) instead of letting them train unseen.

An op is reported when it reads a parameter of the model with two or more dimensions that is not
the weight of a Conv/Linear module qatgraph quantizes module-wise (those have their own rows),
directly or through a tensor computed from parameters alone (``self.w.t()``, ``self.w[:n]``,
``self.w.to(torch.half)``), and the innermost user frame calling it is not a traced graph's code.
"""
from __future__ import annotations

import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qatgraph.quant.qmodules import op_kind
from qatgraph.quant.quantizer import FakeQuantizer

from .queries import FUNCTIONAL_WEIGHTED, OTHER_GEMM_FUNCTIONS, parameter_display_name

_KINDS: dict[Any, str] = {**FUNCTIONAL_WEIGHTED, torch.matmul: "matmul", torch.bmm: "matmul",
                          torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
                          torch.Tensor.__rmatmul__: "matmul", torch.Tensor.bmm: "matmul",
                          **{function: "matmul" for function in OTHER_GEMM_FUNCTIONS},
                          F.multi_head_attention_forward: "attention"}
_SKIPPED_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class EagerWeightedOp:
    """A weighted op of untraced code on a parameter (the first call seen reading it)."""

    name: str              # the summary's row: the parameter's name, or the attention module's
    kind: str              # linear / conv / conv_transpose / matmul / attention
    function: str          # F.linear, matmul, multi_head_attention_forward, ...
    where: str             # file:line `code` of the call in the user's forward
    parameters: list[str] = field(default_factory=list)  # qualified names of the weights it reads

    @property
    def reason(self) -> str:
        if self.kind == "attention":
            return (f"float: nn.MultiheadAttention called from untraced code at {self.where} stays one module "
                    "(its projections and attention GEMMs are quantized only in a traced graph); make that "
                    "forward traceable")
        return (f"float: {self.function} on a parameter in untraced code at {self.where} (only a traced graph "
                "gets Q/DQ on functional weights); make that forward traceable")


class _Watcher(torch.overrides.TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        self.covered = {id(m.weight) for m in model.modules()
                        if op_kind(m) is not None and isinstance(getattr(m, "weight", None), torch.Tensor)}
        self.attention_owner = {id(p): name for name, m in model.named_modules()
                                if isinstance(m, nn.MultiheadAttention) for p in m.parameters()}
        # tensors computed from parameters alone (``self.w.t()``, ``self.w[:n]``, ``self.w.to(dtype)``):
        # id -> (the tensor, kept alive so that its id is not reused; the parameters it comes from)
        self.derived: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self.found: dict[str, EagerWeightedOp] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        values = list(args) + list((kwargs or {}).values())
        result = func(*args, **(kwargs or {}))
        kind = _KINDS.get(func)
        if kind is not None:
            self._record(func, kind, values)
        else:
            self._derive(values, result)
        return result

    def _roots(self, value: object) -> tuple[torch.Tensor, ...] | None:
        """The parameters ``value`` is (or was computed from alone), None for anything else."""
        if isinstance(value, nn.Parameter) and id(value) in self.names:
            return (value,)
        entry = self.derived.get(id(value)) if isinstance(value, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is value else None

    def _derive(self, values: list, result: object) -> None:
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        roots = [self._roots(t) for t in tensors]
        if not tensors or any(r is None for r in roots):
            return  # an activation takes part: not a weight computation
        parameters = tuple({id(p): p for group in roots for p in group}.values())  # type: ignore[union-attr]
        for output in (result if isinstance(result, (tuple, list)) else (result,)):
            if isinstance(output, torch.Tensor):
                self.derived[id(output)] = (output, parameters)

    def _record(self, func: Any, kind: str, values: list) -> None:
        weights = [p for value in values for p in (self._roots(value) or ())
                   if p.dim() >= 2 and id(p) not in self.covered]
        if not weights:
            return
        where = user_line()
        if where is None:  # inside a traced graph: the graph passes see it
            return
        parameters = list(dict.fromkeys(self.names[id(w)] for w in weights))
        owner = next((self.attention_owner[id(w)] for w in weights if id(w) in self.attention_owner), None)
        if kind == "attention" and owner is not None:
            name = owner  # the row of the module (in_proj_weight or q/k/v_proj_weight and out_proj.weight)
        else:
            module_name, _, local = parameters[0].rpartition(".")
            name = parameter_display_name(module_name, local)
        function = getattr(func, "__name__", str(func))
        if func in FUNCTIONAL_WEIGHTED or func is F.multi_head_attention_forward:
            function = f"F.{function}"
        self.found.setdefault(name, EagerWeightedOp(name, kind, function, where, parameters))


@contextmanager
def float_run(model: nn.Module):  # noqa: ANN202 - a context manager
    """Eval mode, no grad, every quantizer passing values through (none is calibrated yet)."""
    every = list({id(m): m for m in model.modules() if isinstance(m, FakeQuantizer)}.values())
    enabled = [(q, q.is_enabled) for q in every]
    was_training = model.training
    model.eval()
    try:
        for quantizer in every:
            quantizer.disable()
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        for quantizer, on in enabled:
            quantizer.enable(on)


def user_line() -> str | None:
    """``file:line `code``` of the innermost user frame, None inside a traced graph's code."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith("<eval_with_key"):
            return None
        if not frame.filename.startswith(_SKIPPED_DIRS):
            return f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
    return None


def eager_weighted_ops(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> list[EagerWeightedOp]:
    """Run ``model`` once (quantizers off, eval, no grad) and return the weighted ops its
    untraced code runs on parameters, one per row name (the first call's source line)."""
    watcher = _Watcher(model)
    with float_run(model), watcher:
        model(*args, **(kwargs or {}))
    return list(watcher.found.values())
