"""Tracing with torch.fx, with partial tracing when the whole model cannot be traced.

:func:`trace_module` traces a module with the policy's leaf modules and ``concrete_args``. When
the whole model cannot be traced (by torch.fx, nor by torch.export: qatgraph/graph/build.py
decides) and ``policy.tracing.partial`` is on, :func:`trace_children` traces the largest
submodules that can be traced (each becomes a ``GraphModule`` in place of the original child,
keeping its parameter names; a traced ``nn.Sequential`` still indexes, iterates and has a
``len()``) and leaves the rest eager. Every failure is recorded with the module, the source line
torch.fx stopped at, and the fix to try, in a :class:`TraceReport`.
"""
from __future__ import annotations

import logging
import os
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qatgraph.policy import Policy
from qatgraph.quant.qmodules import op_kind

from .attention_calls import attention_graph, convertible
from .modes import follow_training_flags, keeps_mode_as_leaf, trace_both_modes

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__)
_QATGRAPH_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class UntracedModule:
    """A module torch.fx could not trace, and why."""

    name: str
    type_name: str
    reason: str
    location: str
    fix: str

    def describe(self) -> str:
        where = f" at {self.location}" if self.location else ""
        return f"{self.name or '<root>'} ({self.type_name}){where}: {self.reason}. Fix: {self.fix}"


@dataclass
class TraceReport:
    """What was traced, what stayed eager and why."""

    traced: list[str] = field(default_factory=list)
    untraced: list[UntracedModule] = field(default_factory=list)
    eager_layers: list[str] = field(default_factory=list)
    frontend: str = "torch.fx"  # or "torch.export" (qatgraph/graph/build.py)
    frontend_notes: list[str] = field(default_factory=list)  # why the frontends before it were not used
    shared_quantizers: list[tuple[str, str]] = field(default_factory=list)  # (name, the quantizer it uses)
    eager_adds: list[str] = field(default_factory=list)  # source lines of residual Adds in untraced code
    eager_folded: list[str] = field(default_factory=list)  # BNs in untraced code folded at compile (bn: fold)
    eager_weighted: list = field(default_factory=list)  # EagerWeightedOp: float weighted ops of untraced code
    mode_fixed: list[str] = field(default_factory=list)  # modules whose graph keeps the mode of compile
    mode_note: str = ""  # "traced in training mode" / "traced in eval mode"
    untraced_pending: bool = False  # untraced code not yet run: sharing/folding wait for the first calibration batch

    @property
    def fully_traced(self) -> bool:
        return self.traced == [""]

    def describe(self) -> str:
        notes = "".join(f"\n  {note}" for note in self.frontend_notes + self._mode_notes())
        if self.fully_traced:
            return f"traced the whole model with {self.frontend}" + notes
        lines = ["partially traced: " + (", ".join(n or "<root>" for n in self.traced) or "nothing")]
        lines += ["  untraced " + u.describe() for u in self.untraced]
        if self.eager_layers:
            lines.append("  quantized module-wise (eager): " + ", ".join(self.eager_layers))
        if self.shared_quantizers:
            lines.append("  one quantizer per tensor: " + ", ".join(f"{a} is {b}" for a, b in self.shared_quantizers))
        if self.eager_folded:
            lines.append("  BatchNorm folded in untraced code (bn: fold): " + ", ".join(self.eager_folded))
        if self.eager_weighted:
            lines.append("  float weighted ops in untraced code (no graph to put Q/DQ in; make that forward traceable): "
                         + "; ".join(f"{op.name} ({op.function}) at {op.where}" for op in self.eager_weighted))
        if self.untraced_pending:
            lines.append("  untraced code not run yet (compile got no example_inputs): one quantizer per tensor, the "
                         "BatchNorm fold (bn: fold) and the residual-Add check happen at the first batch of "
                         "qatgraph.calibrate")
        if self.eager_adds:
            lines.append("  residual rule not applied to Adds in untraced code (their skip input stays in float, no "
                         "INT8 Add fusion; make that forward traceable to get it): " + "; ".join(self.eager_adds))
        return "\n".join(lines) + notes

    def _mode_notes(self) -> list[str]:
        if not self.mode_fixed:
            return []
        return [f"{self.mode_note}, the code of {', '.join(self.mode_fixed)} branches on self.training beyond a "
                "flag qatgraph can pass through: it keeps that mode after train()/eval() (compile in the mode you "
                "train in, or name the module in tracing.leaf_modules)"]


class QatTracer(fx.Tracer):
    """torch.fx tracer whose leaf modules also include the policy's ``tracing.leaf_modules``
    (class names, dotted class paths or qualified module names)."""

    def __init__(self, leaf_modules: list[str] | tuple[str, ...] = (), prefix: str = "",
                 mode_leaves: dict[int, bool] | None = None) -> None:
        super().__init__()
        self.extra_leaves = set(leaf_modules)
        self.prefix = prefix
        self.mode_leaves = {} if mode_leaves is None else mode_leaves  # id(module) -> keeps_mode_as_leaf

    def _keeps_mode(self, module: nn.Module) -> bool:
        key = id(module)
        if key not in self.mode_leaves:
            self.mode_leaves[key] = False  # while it is being decided (a module reached again inside itself)
            self.mode_leaves[key] = keeps_mode_as_leaf(
                module, lambda m: QatTracer(sorted(self.extra_leaves), "", self.mode_leaves).trace(m))
        return self.mode_leaves[key]

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return self.named_leaf(module, qualified_name) or super().is_leaf_module(module, qualified_name) or \
            self._keeps_mode(module)

    def named_leaf(self, module: nn.Module, qualified_name: str) -> bool:
        """Whether the policy's ``tracing.leaf_modules`` names the module or its class."""
        full_name = f"{self.prefix}.{qualified_name}" if self.prefix and qualified_name else qualified_name or self.prefix
        klass = type(module)
        return full_name in self.extra_leaves or klass.__name__ in self.extra_leaves or \
            f"{klass.__module__}.{klass.__qualname__}" in self.extra_leaves


def trace_module(module: nn.Module, policy: Policy, prefix: str = "",
                 concrete_args: dict[str, Any] | None = None, report: TraceReport | None = None,
                 mode_leaves: dict[int, bool] | None = None) -> fx.GraphModule:
    """``module`` traced (in its own mode and the other one: qatgraph/graph/modes.py), with calls
    on a training flag following ``train()``/``eval()``; what still keeps the mode of the trace is
    listed in ``report.mode_fixed``. ``mode_leaves`` caches which weightless modules stay calls
    (:func:`.modes.keeps_mode_as_leaf`) across the calls of one compile."""
    mode_leaves = {} if mode_leaves is None else mode_leaves
    tracer = QatTracer(policy.tracing.leaf_modules, prefix, mode_leaves)
    graph, other = trace_both_modes(module, lambda: tracer.trace(module, concrete_args=concrete_args or None))
    if isinstance(module, nn.Sequential):
        graph_module: fx.GraphModule = SequentialGraphModule(tracer.root, graph, module.__class__.__name__)
        graph_module.meta["qatgraph_sequence"] = list(module._modules)
    else:
        graph_module = fx.GraphModule(tracer.root, graph, module.__class__.__name__)
    graph_module.meta["qatgraph_prefix"] = prefix
    _drop_string_annotations(graph_module)
    fixed = follow_training_flags(graph_module, other, module.training)
    if fixed and report is not None:
        mode = "training" if module.training else "eval"
        report.mode_fixed += [f"{prefix}.{name}" if prefix and name != "<root>" else (prefix or name)
                              for name in fixed]
        report.mode_note = f"traced in {mode} mode"
    return graph_module


def _drop_string_annotations(graph_module: fx.GraphModule) -> None:
    """Annotations written under ``from __future__ import annotations`` are strings; torch.fx
    would put them in the generated code's globals, where pickling the module
    (``torch.save(qmodel)``, multiprocessing) fails. They only annotate the generated ``forward``."""
    changed = False
    for node in graph_module.graph.nodes:
        if isinstance(node.type, str):
            node.type, changed = None, True
    if changed:
        graph_module.recompile()


def trace_children(module: nn.Module, prefix: str, policy: Policy, report: TraceReport,
                   mode_leaves: dict[int, bool] | None = None, attention_calls: dict[str, Any] | None = None,
                   attention_graphs: dict[int, fx.GraphModule] | None = None) -> None:
    """Replace each traceable child of ``module`` (recursively) by its GraphModule; an
    ``nn.MultiheadAttention`` the example run called one way (``attention_calls``, by qualified
    name: :mod:`.attention_calls`) by a graph of that call, one per module (``attention_graphs``)."""
    mode_leaves = {} if mode_leaves is None else mode_leaves
    attention_calls = {} if attention_calls is None else attention_calls
    attention_graphs = {} if attention_graphs is None else attention_graphs
    tracer_for_leaves = QatTracer(policy.tracing.leaf_modules, prefix, mode_leaves)
    for child_name, child in list(module.named_children()):
        name = f"{prefix}.{child_name}" if prefix else child_name
        if not _has_quantizable(child):
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and child_name not in policy.tracing.leaf_modules:
            trace_children(child, name, policy, report, mode_leaves, attention_calls, attention_graphs)  # no forward
            continue
        if isinstance(child, nn.MultiheadAttention) and not tracer_for_leaves.named_leaf(child, child_name) and \
                (id(child) in attention_graphs or convertible(child, attention_calls.get(name))):
            if id(child) not in attention_graphs:  # a module two parents hold: one graph, held by both
                attention_graphs[id(child)] = attention_graph(child, name, attention_calls[name])
                report.traced.append(name)
            setattr(module, child_name, attention_graphs[id(child)])
            continue
        if tracer_for_leaves.is_leaf_module(child, child_name):
            continue
        try:
            traced = trace_module(child, policy, name, report=report, mode_leaves=mode_leaves)
        except Exception as exc:
            report.untraced.append(describe_failure(exc, child, name))
            trace_children(child, name, policy, report, mode_leaves, attention_calls, attention_graphs)
            continue
        setattr(module, child_name, traced)
        report.traced.append(name)


_SEQUENCE_ITEMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SequentialGraphModule(fx.GraphModule):
    """The GraphModule of a traced ``nn.Sequential``: it still indexes, iterates and has a
    ``len()`` like the container it replaces (the parent's untraced forward may do
    ``self.body[0](x)``, ``self.body[-1].out_channels`` or ``for layer in self.body``).

    Item ``i`` is the part of the graph that child ``i`` became, quantizers included (a
    :class:`SequenceItem` built from the current graph, so it always runs what the whole graph
    runs); chaining the items computes the whole graph. Attributes the item does not have are
    read from the original child (``.weight``, ``.out_channels``). The items are built once and
    reused (an untraced forward may index or iterate the container every step) until the graph
    is recompiled or a parameter or buffer is replaced (``.to()``, ``load_state_dict(assign=True)``)."""

    def __getitem__(self, index: int | slice) -> nn.Module:
        names = self.meta["qatgraph_sequence"]
        if isinstance(index, slice):
            return nn.Sequential(*[self._item(i) for i in range(len(names))[index]])
        if not -len(names) <= index < len(names):
            raise IndexError(f"index {index} is out of range for a Sequential of {len(names)} modules")
        return self._item(index % len(names))

    def __len__(self) -> int:
        return len(self.meta["qatgraph_sequence"])

    def __iter__(self):  # noqa: ANN204 - an iterator of modules
        return iter(self._items())

    def _item(self, index: int) -> nn.Module:
        return self._items()[index]

    def _items(self) -> list[nn.Module]:
        key = (self.code, *(id(t) for t in self.parameters()), *(id(t) for t in self.buffers()))
        cache = _SEQUENCE_ITEMS.get(self)  # outside the module: not copied, pickled or saved with it
        if cache is None or cache[0] != key:
            segments = _segments(self.graph, self.meta["qatgraph_sequence"])
            cache = (key, [self._build_item(i, segments) for i in range(len(segments))])
            _SEQUENCE_ITEMS[self] = cache
        return cache[1]

    def _build_item(self, index: int, segments: list[list[fx.Node]]) -> nn.Module:
        names = self.meta["qatgraph_sequence"]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        value = graph.placeholder("input")
        earlier = [segment[-1] for segment in segments[:index] if segment]  # a segment BN folding emptied has none
        previous = earlier[-1] if earlier else next(n for n in self.graph.nodes if n.op == "placeholder")
        env[previous] = value
        for node in segments[index]:
            for arg in node.all_input_nodes:
                if arg not in env and arg.op == "get_attr":
                    env[arg] = graph.node_copy(arg)
                elif arg not in env:
                    raise TypeError(f"module {names[index]!r} of this traced Sequential reads a value of another "
                                    "module; call the Sequential as a whole")
            env[node] = graph.node_copy(node, env.__getitem__)
        graph.output(env[segments[index][-1]] if segments[index] else value)
        original = self.get_submodule(names[index]) if hasattr(self, names[index]) else None
        return SequenceItem(self, graph, original, f"{type(self).__name__}_{names[index]}")


class SequenceItem(fx.GraphModule):
    """One item of a :class:`SequentialGraphModule` (shares its modules and parameters)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, original: nn.Module | None, class_name: str) -> None:
        super().__init__(root, graph, class_name)
        object.__setattr__(self, "_qatgraph_original", original)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_qatgraph_original")
            if original is None:
                raise
            return getattr(original, name)


def _segments(graph: fx.Graph, names: list[str]) -> list[list[fx.Node]]:
    """The graph's nodes by the Sequential child they came from; a node no child owns (an
    inserted quantizer) goes with the next child's nodes, the ones after the last child with it."""
    position = {name: i for i, name in enumerate(names)}
    segments: list[list[fx.Node]] = [[] for _ in names]
    pending: list[fx.Node] = []
    current = 0
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        owner = next((position[path.split(".")[0]] for path, _ in stack.values()
                      if isinstance(path, str) and path.split(".")[0] in position), None)
        if owner is None:
            pending.append(node)
            continue
        current = max(current, owner)
        segments[current] += pending + [node]
        pending = []
    segments[current] += pending
    return segments


def _has_quantizable(module: nn.Module) -> bool:
    """A Conv/Linear layer, or an nn.MultiheadAttention (whose GEMMs the mha pass exposes)."""
    return any(op_kind(m) is not None or isinstance(m, nn.MultiheadAttention) for m in module.modules())


def describe_failure(exc: BaseException, module: nn.Module, name: str) -> UntracedModule:
    """Turn a torch.fx exception into the module, the user's source line and a suggested fix."""
    location = ""
    frames = traceback.extract_tb(exc.__traceback__)
    user_frames = [f for f in frames if not f.filename.startswith((_TORCH_DIR, _QATGRAPH_DIR))]
    if user_frames:
        frame = user_frames[-1]
        code = (frame.line or "").strip()
        location = f"{frame.filename}:{frame.lineno}" + (f" `{code}`" if code else "")
    message = str(exc).split("\n")[0] or type(exc).__name__
    return UntracedModule(name=name, type_name=type(module).__name__, reason=message,
                          location=location, fix=_suggest_fix(message, type(module).__name__))


def _suggest_fix(message: str, type_name: str) -> str:
    leaf = f"mark it a leaf (policy tracing.leaf_modules: ['{type_name}']; its Conv/Linear are then quantized module-wise)"
    if "iterated" in message or "*args" in message:  # before "control flow": this message mentions both
        return ("the forward loops over a traced value (e.g. a list of feature maps or a tensor's length); pass "
                "the length as a Python constant (tracing.concrete_args) or " + leaf)
    if "co_varnames" in message:  # a decorator's (*args, **kwargs) wrapper hides forward's signature
        return ("forward is wrapped by a decorator taking (*args, **kwargs) (e.g. Hugging Face's @can_return_tuple), "
                "which torch.fx cannot call with placeholders; build the graph with "
                "qatgraph.graph.frontends.export_graph (torch.export) and compile that, or " + leaf)
    if "control flow" in message:
        return ("the forward branches on tensor values; make the branch static with policy tracing.concrete_args, "
                "compute it with torch.where, or " + leaf)
    if "len(" in message or "object of type 'Proxy'" in message:
        return "the forward calls len() on a traced value; use a constant shape or " + leaf
    return leaf
