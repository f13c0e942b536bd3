"""EfQAT for functional weights: ``F.linear(x, self.qkv.weight)``, ``F.conv2d(x, self.w)``,
``x @ self.w`` and ``nn.MultiheadAttention``'s in-projection once ``passes/mha.py`` decomposed it.

The unit is the **parameter**: its output rows (axis 0 of an ``F.linear``/``F.conv*`` weight, axis 1
of an ``F.conv_transpose*`` weight, the last axis of a ``matmul`` operand) are ranked and frozen
like a layer's, whatever number of ops read it. A packed in-projection read as three row slices
(cross-attention: q, k and v on different inputs) is one unit of ``3 * embed`` rows; each slice's
op gets the trainable rows that fall in its slice. A parameter takes part only when every op
that reads it goes through its weight quantizer (passes/materialize.py puts one next to it), either
directly or through a row slice, and those ops agree on the output axis; a parameter that also
feeds something else (a tied embedding, an op qatgraph left alone) trains in full, and the summary
says so.

Each op of a parameter that can be frozen row by row is rewritten in its graph from
``F.linear(x, w, b)`` to ``masked_call("linear", <weight quantizer>, "trainable_rows", x, w, b)``
(the quantizer a ``get_attr`` node, so the call follows ``.to()`` and ``deepcopy``; under a
symbolic trace of the graph's code it stays one call): in
training, with the quantizer's ``trainable_rows`` buffer set, that is ``qatgraph::masked_linear`` (``masked_conv``
for a conv; ``masked_linear(x, w.t())`` for ``x @ w``), whose backward computes the weight
gradient of the trainable rows only; otherwise (eval, no grad, the export's copy, all rows
training) it is the original call. The EfQAT state of a functional weight lives as non-persistent
buffers on its weight quantizer (one module per parameter), so it follows ``.to()`` and
``deepcopy`` and never enters ``state_dict()``. ``F.conv_transpose*``, batched ``bmm`` constants
and ``padding="same"`` convs have no masked op: such a parameter is frozen whole or trains whole
(LWPN), as a ConvTranspose layer is.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import handle_torch_function, has_torch_function

from qatgraph.graph.queries import (
    FUNCTIONAL_WEIGHTED,
    MATMUL_FUNCTIONS,
    MATMUL_METHODS,
    functional_weight_axis,
    parameter_display_name,
)
from qatgraph.ops.partial_grad import masked_conv, masked_linear
from qatgraph.quant.quantizer import FakeQuantizer

from .layers import ROWS

log = logging.getLogger(__name__)

ORIGINAL_KEY = "qatgraph.efqat_original"  # node.meta: (op, target) before the rewrite


FUNCTIONS = {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d, "matmul": torch.matmul}
_NAMES = {function: name for name, function in FUNCTIONS.items()}


def masked_call(name: str, quantizer: nn.Module, rows_name: str, *args, **kwargs):
    """``FUNCTIONS[name](*args, **kwargs)`` (``F.linear``, ``F.conv1d/2d/3d`` or ``torch.matmul``
    with the weight second), computing the weight gradient of the quantizer's trainable rows only
    while training."""
    if has_torch_function(args):  # fx tracing the graph's code: stays one call
        return handle_torch_function(masked_call, args, name, quantizer, rows_name, *args, **kwargs)
    function = FUNCTIONS[name]
    rows = quantizer._buffers.get(rows_name) if quantizer.training and torch.is_grad_enabled() else None
    if rows is None or not args[1].requires_grad:
        return function(*args, **kwargs)
    if function is F.linear:
        x, weight, bias = _bind(args, kwargs, ("input", "weight", "bias"), (None,))
        return masked_linear(x, weight, bias, rows)
    if function in MATMUL_FUNCTIONS:
        return masked_linear(args[0], args[1].t(), None, rows)
    x, weight, bias, stride, padding, dilation, groups = _bind(
        args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1))
    return masked_conv(x, weight, bias, rows, stride, padding, dilation, groups)


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list:
    """``args`` completed by ``kwargs`` or the defaults of the trailing ``names`` (``defaults``)."""
    return list(args) + [kwargs.get(name, default) for name, default in
                         zip(names[len(args):], defaults[len(args) - len(names):])]


@dataclass
class Site:
    """One op reading the parameter: its graph, node and the rows it sees (a slice on the output axis)."""

    graph_module: fx.GraphModule
    node: fx.Node
    function: object
    start: int
    stop: int
    partial_ok: bool
    quantizer_target: str  # the weight quantizer's path in ``graph_module``

    def rows_name(self, num_rows: int) -> str:
        return ROWS if (self.start, self.stop) == (0, num_rows) else f"{ROWS}_{self.start}_{self.stop}"


@dataclass
class FunctionalWeight:
    name: str            # the parameter's qualified name without ``.weight`` / ``_weight`` (the summary's name)
    owner: nn.Module
    owner_name: str
    weight_name: str
    quantizer: FakeQuantizer
    quantizer_name: str  # qualified
    axis: int
    sites: list[Site] = field(default_factory=list)

    @property
    def partial_ok(self) -> bool:
        return all(site.partial_ok for site in self.sites)

    @property
    def num_rows(self) -> int:
        """Rows EfQAT ranks: the parameter's size on ``axis``."""
        return getattr(self.owner, self.weight_name).shape[self.axis]


def _function_of(node: fx.Node) -> object | None:
    if node.op == "call_method" and node.target in MATMUL_METHODS:
        return torch.bmm if node.target == "bmm" else torch.matmul
    if node.op == "call_function" and (node.target in FUNCTIONAL_WEIGHTED or node.target in MATMUL_FUNCTIONS):
        return torch.matmul if node.target is operator.matmul else node.target
    if node.op == "call_function" and node.target is masked_call:  # already rewritten (a refreeze)
        return FUNCTIONS[node.args[0]]
    return None


def _weight_args(node: fx.Node) -> tuple:
    """The op's own arguments (a rewritten node carries three more in front)."""
    return node.args[3:] if node.target is masked_call else node.args


def _output_axis(function, weight: torch.Tensor) -> int:
    """The rows EfQAT ranks: the weight quantizer's axis (:func:`functional_weight_axis`), the last
    axis of a batched matmul constant (quantized per tensor)."""
    axis = functional_weight_axis(FUNCTIONAL_WEIGHTED.get(function, "matmul"), weight)
    return weight.dim() - 1 if axis is None else axis


def _partial_ok(function, node: fx.Node, weight: torch.Tensor) -> bool:
    kind = FUNCTIONAL_WEIGHTED.get(function)
    if kind == "linear":
        return True
    if kind == "conv":
        args = _weight_args(node)
        padding = args[4] if len(args) > 4 else node.kwargs.get("padding", 0)
        return not isinstance(padding, str) and 3 <= weight.dim() <= 5
    return function is torch.matmul and weight.dim() == 2  # x @ w == F.linear(x, w.t())


def find(model: nn.Module, taken: set[int]) -> tuple[list[FunctionalWeight], dict[str, str]]:
    """Quantized functional weights of ``model`` EfQAT can manage, and the reason for each it cannot
    (by name). ``taken``: ids of parameters already managed as a layer's weight."""
    module_names = {id(module): name for name, module in model.named_modules()}
    found: dict[int, FunctionalWeight] = {}
    refused: dict[int, tuple[str, str]] = {}
    for region in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        getters: dict[str, list[fx.Node]] = {}
        for node in region.graph.nodes:
            if node.op == "get_attr":
                getters.setdefault(str(node.target), []).append(node)
        for node in region.graph.nodes:
            if node.op != "call_module" or not node.args or getattr(node.args[0], "op", None) != "get_attr":
                continue
            quantizer = region.get_submodule(str(node.target))
            if not isinstance(quantizer, FakeQuantizer) or not quantizer.is_weight:
                continue
            getter = node.args[0]
            owner_path, _, weight_name = str(getter.target).rpartition(".")
            owner = region.get_submodule(owner_path) if owner_path else region
            weight = getattr(owner, weight_name, None)
            if not isinstance(weight, nn.Parameter) or id(weight) in taken or id(owner) not in module_names:
                continue
            owner_name = module_names[id(owner)]
            name = parameter_display_name(owner_name, weight_name)
            readers = {user for other in getters.get(str(getter.target), ()) for user in other.users}
            problem = None if readers == {node} else "its parameter also feeds an op outside the quantized one"
            sites = []
            for user in node.users if problem is None else ():
                site, problem = _site(region, node, user, weight)
                if problem:
                    break
                sites.append(site)
            if problem is None and (not sites or not weight.requires_grad):
                continue  # a dead quantizer call, or a parameter the user froze
            entry = found.get(id(weight))
            if problem is None and entry is not None and entry.quantizer is not quantizer:
                problem = "its parameter has two weight quantizers"
            if problem is None and entry is not None and \
                    entry.axis != _output_axis(sites[0].function, weight):
                problem = "ops reading its parameter disagree on the output axis"
            if problem is not None:
                refused[id(weight)] = (name, problem)
                continue
            axes = {_output_axis(site.function, weight) for site in sites}
            if len(axes) != 1:
                refused[id(weight)] = (name, "ops reading its parameter disagree on the output axis")
                continue
            if entry is None:
                entry = found[id(weight)] = FunctionalWeight(name, owner, owner_name, weight_name, quantizer,
                                                             module_names.get(id(quantizer), ""), axes.pop())
            entry.sites.extend(sites)
    for key in refused:
        found.pop(key, None)
    reasons = {name: f"all rows train: {problem}" for name, problem in refused.values()}
    for name, reason in reasons.items():
        log.info("qatgraph EfQAT: functional weight %s %s", name, reason)
    return list(found.values()), reasons


def float_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that functional weighted ops read unquantized (left in floating point), by name."""
    module_names = {id(module): name for name, module in model.named_modules()}
    weights = {}
    for region in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        for node in region.graph.nodes:
            function = _function_of(node)
            args = _weight_args(node) if function is not None else ()
            source = args[1] if len(args) > 1 else None
            if isinstance(source, fx.Node) and source.op == "call_function" and source.target is operator.getitem:
                source = source.args[0]
            if not isinstance(source, fx.Node) or source.op != "get_attr":
                continue
            owner_path, _, weight_name = str(source.target).rpartition(".")
            owner = region.get_submodule(owner_path) if owner_path else region
            weight = getattr(owner, weight_name, None)
            if isinstance(weight, nn.Parameter) and id(owner) in module_names:
                weights[parameter_display_name(module_names[id(owner)], weight_name)] = weight
    return weights


def display_name_of_quantizer(quantizer_path: str) -> str:
    """The summary's name of the parameter whose weight quantizer would sit at ``quantizer_path``
    (:func:`~qatgraph.graph.annotations.weight_quantizer_path`), quantized or not."""
    owner, _, local = quantizer_path.rpartition(".")
    return parameter_display_name(owner, "weight" if local == "weight_quantizer" else local.removesuffix("_quantizer"))


def _site(region: fx.GraphModule, quantized: fx.Node, user: fx.Node, weight: torch.Tensor) \
        -> tuple[Site | None, str | None]:
    start, stop, consumer = None, None, user
    if user.op == "call_function" and user.target is operator.getitem and user.args[0] is quantized and \
            isinstance(user.args[1], slice) and len(user.users) == 1:
        begin, end, step = user.args[1].indices(weight.shape[0])
        if step != 1:
            return None, "its parameter is read through a strided slice"
        start, stop, consumer = begin, end, next(iter(user.users))
    function = _function_of(consumer)
    via = user if start is not None else quantized
    args = _weight_args(consumer) if function is not None else ()
    if function is None or len(args) < 2 or args[1] is not via or via in args[:1] or \
            via in consumer.kwargs.values() or (function is torch.bmm and weight.dim() < 3):
        return None, f"its quantized weight feeds {consumer.name}, which EfQAT does not mask"
    axis = _output_axis(function, weight)
    if start is None or axis != 0:  # a slice on another axis leaves the output rows whole
        start, stop = 0, weight.shape[axis]
    return Site(region, consumer, function, start, stop, _partial_ok(function, consumer, weight),
                str(quantized.target)), None


def rewrite(functional: FunctionalWeight) -> None:
    """Route every op of a partially freezable parameter through :func:`masked_call`."""
    num_rows = functional.num_rows
    regions = {}
    for site in functional.sites:
        node, region = site.node, site.graph_module
        if node.target is masked_call:
            continue
        with region.graph.inserting_before(node):
            handle = region.graph.get_attr(site.quantizer_target)
        node.meta[ORIGINAL_KEY] = (node.op, node.target)
        node.args = (_NAMES[site.function], handle, site.rows_name(num_rows), *node.args)
        node.op, node.target = "call_function", masked_call
        regions[id(region)] = region
    for region in regions.values():
        region.graph.lint()
        region.recompile()


def unrewrite(model: nn.Module) -> None:
    """Put back the original ops of every graph of ``model`` (EfQAT removed)."""
    for region in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        touched = False
        for node in list(region.graph.nodes):
            if node.op != "call_function" or node.target is not masked_call:
                continue
            name, handle, _rows, *args = node.args
            op, target = node.meta.pop(ORIGINAL_KEY, ("call_function", FUNCTIONS[name]))
            node.op, node.target, node.args = op, target, tuple(args)
            if not handle.users:
                region.graph.erase_node(handle)
            touched = True
        if touched:
            region.graph.lint()
            region.recompile()
