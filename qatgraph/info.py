"""What ``compile`` decided, kept on the compiled model as ``model.qatgraph_info``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .errors import QatgraphWarning  # noqa: F401 - its historical home; defined with the errors

if TYPE_CHECKING:
    from qatgraph.graph.annotations import OpAnnotation
    from qatgraph.graph.tracing import TraceReport
    from qatgraph.policy import Policy


@dataclass
class LayerDecision:
    """One weighted layer: quantized or not, and the rule that decided it."""

    layer: str
    kind: str
    type_name: str
    quantized: bool
    reason: str
    eager: bool = False
    input_quantizers: list[str] = field(default_factory=list)
    functional_weight_quantizer: str | None = None  # functional ops: the quantizer next to their weight

    @property
    def weight_quantizer(self) -> str | None:
        if self.functional_weight_quantizer is not None:
            return self.functional_weight_quantizer if self.quantized else None
        return f"{self.layer}.weight_quantizer" if self.quantized and self.kind != "matmul" else None

    @classmethod
    def untraced(cls, op: Any) -> LayerDecision:
        """The float row of a weighted op untraced code runs on a parameter
        (:class:`~qatgraph.graph.eager_ops.EagerWeightedOp`); its weight quantizer path names the
        parameter, as a functional op's does, so the summary finds its EfQAT state."""
        from qatgraph.graph.annotations import weight_quantizer_path

        type_name = "MultiheadAttention" if op.kind == "attention" else op.function
        return cls(op.name, op.kind, type_name, False, op.reason, eager=True,
                   functional_weight_quantizer=weight_quantizer_path(op.parameters[0]))

    @classmethod
    def from_annotation(cls, annotation: OpAnnotation, region: fx.GraphModule, node: fx.Node) -> LayerDecision:
        from qatgraph.graph.annotations import weight_quantizer_path

        prefix = region.meta.get("qatgraph_prefix", "")
        inputs, functional_weight = [], None
        for index, arg in enumerate(node.args):
            if index == annotation.weight_arg and annotation.weight_source is not None:
                path = weight_quantizer_path(annotation.weight_source)
                functional_weight = f"{prefix}.{path}" if prefix else path
            elif isinstance(arg, fx.Node) and "qatgraph.quantizer" in arg.meta:
                target = arg.meta["qatgraph.quantizer"]
                inputs.append(f"{prefix}.{target}" if prefix else target)
        if node.op == "call_module":
            type_name = type(region.get_submodule(str(node.target))).__name__
        else:
            type_name = getattr(node.target, "__name__", str(node.target))
        return cls(annotation.layer, annotation.kind, type_name, annotation.quantized, annotation.reason,
                   input_quantizers=inputs, functional_weight_quantizer=functional_weight)


@dataclass
class CompileInfo:
    policy: Policy
    trace_report: TraceReport
    layers: list[LayerDecision]

    def layer(self, name: str) -> LayerDecision:
        for decision in self.layers:
            if decision.layer == name:
                return decision
        raise KeyError(name)

    @property
    def quantized_layers(self) -> list[str]:
        return [d.layer for d in self.layers if d.quantized]

    @property
    def skipped_layers(self) -> list[str]:
        return [d.layer for d in self.layers if not d.quantized]


QATGRAPH_ATTRIBUTES = ("qatgraph_info", "trace_report", "qatgraph_freeze")


def _deepcopy_keeping_state(self, memo: dict):
    """GraphModule's deepcopy keeps only the graph, submodules and ``meta``: copy ours too."""
    import copy

    result = fx.GraphModule.__deepcopy__(self, memo)
    for attribute in QATGRAPH_ATTRIBUTES:
        if attribute in self.__dict__:
            setattr(result, attribute, copy.deepcopy(self.__dict__[attribute], memo))
    # GraphModule's deepcopy drops forward hooks: give the copied freeze controller its
    # sample-counting hook back, bound to the copy.
    controller = result.__dict__.get("qatgraph_freeze")
    if controller is not None and not getattr(controller, "removed", False):
        bound = any(getattr(hook, "__self__", None) is controller for hook in result._forward_pre_hooks.values())
        if not bound:
            controller.attach(result)
    return result


def keep_state_on_deepcopy(model: nn.Module) -> None:
    """Make ``copy.deepcopy`` of a compiled GraphModule keep qatgraph's attributes. Each
    GraphModule has a class of its own (copies subclass it), so this touches no other model."""
    if isinstance(model, fx.GraphModule):
        type(model).__deepcopy__ = _deepcopy_keeping_state


def compile_info(model: nn.Module) -> CompileInfo:
    from .errors import QatgraphError

    info = getattr(model, "qatgraph_info", None)
    if info is None:
        raise QatgraphError(f"{type(model).__name__} was not produced by qatgraph.compile "
                            "(it has no qatgraph_info); compile it first")
    return info
