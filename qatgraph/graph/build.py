"""Choosing the frontend that builds the graph ``compile`` quantizes (``policy.tracing.frontend``).

* ``auto`` (default): torch.fx traces the whole model if it can. If it cannot and ``compile``
  got example inputs that are all tensors, the torch.export frontend (:func:`.frontends.export_graph`) builds a
  module-level graph of the whole model (Hugging Face transformers 5 models land here). If that
  fails too, or there are no example inputs to export with, partial torch.fx tracing quantizes
  the traceable submodules and the rest module-wise.
* ``fx``: torch.fx, then partial tracing (the behaviour before the torch.export frontend).
* ``export``: torch.export only (needs example inputs); its failure is a TraceError.

The :class:`~.tracing.TraceReport` says which frontend ran and why the one before it failed.

A model built by torch.export returns its outputs in the structure ``forward`` returned them
(a Hugging Face ``ModelOutput``, a dict, a tuple): the graph computes the flattened tensors and
``forward`` rebuilds the structure (:class:`RestoredOutputs`). What stays different from the
original model (see docs/coverage.md): the graph was built in eval mode (Python branches on
``self.training`` keep their eval values; ``Dropout``/``BatchNorm`` modules still follow
``train()``/``eval()``), ``forward`` takes the tensor inputs the example had (non-tensor
arguments such as ``return_dict`` or ``output_attentions`` were fixed at their example values),
and outputs that were ``None`` in the example are ``None`` always.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import CodeGen

from qatgraph.errors import TraceError, UsageError
from qatgraph.policy import Policy

from .attention_calls import record_attention_calls
from .frontends import OutputStructure, dynamic_shapes_per_input, export_graph, quiet_dynamo
from .tracing import TraceReport, describe_failure, trace_children, trace_module

log = logging.getLogger(__name__)

# Wrappers compile keeps as they are (their ``module`` is traced): exporting would drop the wrapper.
WRAPPERS: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def build_graph(model: nn.Module, policy: Policy, args: tuple | None,
                kwargs: dict[str, Any] | None) -> tuple[nn.Module, TraceReport]:
    """The traced model (``model`` is compile's private copy: children may be replaced in
    place) and its report, by the frontend ``policy.tracing.frontend`` picks."""
    frontend = policy.tracing.frontend
    have_examples = args is not None or bool(kwargs)
    report = TraceReport()
    if frontend == "export":
        if not have_examples:
            raise UsageError("tracing.frontend: export needs example inputs: pass example_inputs to qatgraph.compile "
                             "(a tensor, a tuple of forward's arguments, or a dict of keyword arguments)")
        report.frontend_notes.append("tracing.frontend is 'export'")
        return _exported(model, args, kwargs, report), report
    try:
        graph_module = trace_module(model, policy, "", policy.tracing.concrete_args, report)
        report.traced.append("")
        return graph_module, report
    except Exception as exc:  # torch.fx raises many types; each is reported with its source line
        failure = describe_failure(exc, model, "")
    where = f" at {failure.location}" if failure.location else ""
    fx_note = f"torch.fx cannot trace the whole model ({failure.type_name}){where}: {failure.reason}"
    report.frontend_notes.append(fx_note)
    if frontend == "auto":
        if isinstance(model, WRAPPERS):
            report.frontend_notes.append(f"torch.export not tried: {type(model).__name__} is a wrapper; partial "
                                         "tracing traces the wrapped module and keeps the wrapper")
        elif have_examples and not _all_tensors(args, kwargs):
            report.frontend_notes.append("torch.export not tried: the example inputs hold non-tensor arguments (a "
                                         "list, dict, number or None), which the exported graph would flatten or fix; "
                                         "tracing.frontend: export forces it")
        elif have_examples:
            try:
                with quiet_dynamo():  # a failed attempt is reported in the trace report, not in torch's graph dumps
                    return _exported(model, args, kwargs, report), report
            except Exception as exc:  # any failure of the attempt: partial tracing still quantizes the model
                message = str(exc) if isinstance(exc, TraceError) else f"{type(exc).__name__}: {exc}"
                report.frontend_notes.append(f"torch.export failed too: {message}")
                log.warning("qatgraph: neither torch.fx nor torch.export can trace the whole model (%s)",
                            message.split(". ")[0])
        else:
            report.frontend_notes.append("torch.export not tried: compile got no example_inputs (pass them to let "
                                         "tracing.frontend: auto export the whole model)")
    if not policy.tracing.partial:
        raise TraceError("cannot trace the model: " + "; ".join(report.frontend_notes) +
                         " (partial tracing is off: set tracing.partial: true to quantize the traceable parts)")
    report.untraced.append(failure)  # the trace report lists it with the fix: no need to repeat it as a note
    report.frontend_notes.remove(fx_note)
    log.warning("qatgraph: cannot trace the whole model (%s); tracing its submodules instead", failure.reason)
    calls = record_attention_calls(model, args or (), kwargs) if have_examples else {}
    trace_children(model, "", policy, report, attention_calls=calls)
    return model, report


def _all_tensors(args: tuple | None, kwargs: dict[str, Any] | None) -> bool:
    """Whether forward gets only tensors: the exported graph then takes the same arguments."""
    return all(isinstance(value, torch.Tensor) for value in [*(args or ()), *(kwargs or {}).values()])



def _exported(model: nn.Module, args: tuple | None, kwargs: dict[str, Any] | None,
              report: TraceReport) -> fx.GraphModule:
    args, kwargs = args or (), kwargs or {}
    tensors = [v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor) and v.dim() > 0]
    if tensors and all(t.shape[0] == 1 for t in tensors):  # torch.export would fix a batch of 1
        args = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)
        kwargs = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in kwargs.items()}
        report.frontend_notes.append("exported with the example repeated to a batch of 2 (torch.export fixes "
                                     "dimensions of size 1)")
    graph_module = export_graph(model, args, kwargs, dynamic_shapes=_all_dims_dynamic(model, args, kwargs))
    restore_outputs(graph_module)
    graph_module.meta["qatgraph_prefix"] = ""
    report.traced.append("")
    report.frontend = "torch.export"
    return graph_module


def _all_dims_dynamic(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``Dim.AUTO`` for every dimension of every tensor input: the graph then serves other batch
    sizes, sequence lengths and image sizes than the example's, as the model did (torch.export
    keeps a dimension static only where the model needs it)."""
    return dynamic_shapes_per_input(model, args, kwargs, _auto_dims, "the example inputs")


def _auto_dims(leaf: Any, name: str) -> Any:
    if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
        return None
    if leaf.shape[0] < 2:
        raise TraceError(f"input {name!r} has batch size {leaf.shape[0]}: torch.export fixes dimensions of size 0 "
                         "or 1, so the example inputs need a batch of at least 2 for a graph that serves any batch")
    return {dim: torch.export.Dim.AUTO for dim in range(leaf.dim())}


# ---------------------------------------------------------------------------- output structure
class RestoredOutputs(CodeGen):
    """Code generation whose ``forward`` returns ``self.meta["qatgraph_out_spec"](flat tensors)``:
    the model's output structure (see :class:`.frontends.OutputStructure`; ``meta`` survives
    ``copy.deepcopy`` of a GraphModule, other attributes do not)."""

    def __init__(self, structure: OutputStructure) -> None:
        super().__init__()
        self.structure = structure

    def generate_output(self, output_args: Any, **kwargs: Any) -> str:
        statement = super().generate_output(output_args, **kwargs)
        return "return self.meta['qatgraph_out_spec'](" + statement[len("return "):] + ")"

    def process_outputs(self, outputs: Any) -> Any:
        return self.structure(outputs)


def restore_outputs(graph_module: fx.GraphModule) -> None:
    """Make an exported GraphModule return what the model returned, not the flat tensors."""
    structure = graph_module.meta.get("qatgraph_out_spec")
    if structure is None or structure.spec.is_leaf():
        return
    graph_module.graph._codegen = RestoredOutputs(structure)
    graph_module.recompile()
