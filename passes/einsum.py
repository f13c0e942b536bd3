"""Pass 0b — rewrite two-operand ``torch.einsum`` GEMMs as ``matmul`` so annotate quantizes them.

``torch.einsum("bhqd,bhkd->bhqk", q, k)`` is a batched GEMM that ONNX exports as ``Einsum``, which
TensorRT's Q/DQ fusion does not treat as a MatMul; annotate would not see it either. This pass
rewrites every einsum whose equation is a plain GEMM::

    a.permute(batch + m + k) @ b.permute(batch + k + n)  ->  permute to the output order

Expects: a traced GraphModule before annotate.
Guarantees: each rewritten einsum has exactly one contracted index, at most one free index per
operand (m, n; a missing one becomes a size-1 axis; the first operand may have several when there
is no batch index: ``bld,fd->blf``), batch indices present in both operands and
the output with equal sizes, no repeated index within an operand and no ``...``; the function is
unchanged (to float summation order). Other einsums stay as they are and annotate lists them in
the summary, float, with the reason. New nodes are named ``<einsum node>_<role>``, the matmul
``<einsum node>_matmul``.
"""
from __future__ import annotations

import torch
from torch import fx

from qatgraph.policy import Policy


def run(gm: fx.GraphModule, policy: Policy | None = None) -> fx.GraphModule:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.einsum or node.kwargs:
            continue
        plan = gemm_plan(node)
        if plan is not None:
            _rewrite(gm.graph, node, *plan)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def gemm_plan(node: fx.Node) -> tuple[str, str, str, fx.Node, fx.Node] | None:
    """(a subscripts, b subscripts, output subscripts, a, b) when the einsum is a plain GEMM."""
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        equation, operands = node.args[0], list(node.args[1])
    else:
        equation, operands = node.args[0], list(node.args[1:])
    if not isinstance(equation, str) or len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands):
        return None
    equation = equation.replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    inputs, output = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if any(len(set(s)) != len(s) for s in (a, b, output)) or set(output) - set(a) - set(b):
        return None
    contracted = (set(a) & set(b)) - set(output)
    free_a, free_b = set(a) - set(b), set(b) - set(a)
    batch = set(a) & set(b) & set(output)
    # Several free indices of the first operand are fine without batch indices: matmul treats the
    # leading ones as batch dimensions of a 2-D right operand (``bld,fd->blf``: a Linear).
    if len(contracted) != 1 or (len(free_a) > 1 and batch) or len(free_b) > 1 or (free_a | free_b) - set(output):
        return None
    return a, b, output, operands[0], operands[1]


def _rewrite(graph: fx.Graph, node: fx.Node, a: str, b: str, output: str, left: fx.Node, right: fx.Node) -> None:
    (k,) = (set(a) & set(b)) - set(output)
    batch = [i for i in output if i in a and i in b]
    m, n = [i for i in a if i not in b], [i for i in b if i not in a]

    def emit(target, args, role, op="call_method"):
        with graph.inserting_before(node):
            return graph.create_node(op, target, args, {}, name=f"{node.name}_{role}")

    def arrange(tensor: fx.Node, subscripts: str, order: list[str], role: str) -> fx.Node:
        permutation = [subscripts.index(i) for i in order if i in subscripts]
        if permutation != list(range(len(subscripts))):
            tensor = emit("permute", (tensor, *permutation), role)
        return tensor

    left = arrange(left, a, batch + m + [k], "a")
    if not m:
        left = emit("unsqueeze", (left, -2), "a_row")
    right = arrange(right, b, batch + [k] + n, "b")
    if not n:
        right = emit("unsqueeze", (right, -1), "b_column")
    product = emit(torch.matmul, (left, right), "matmul", op="call_function")
    produced = batch + (m or ["_m"]) + (n or ["_n"])
    if not n:
        product = emit("squeeze", (product, -1), "squeeze_n")
        produced.remove("_n")
    if not m:
        product = emit("squeeze", (product, -2 if n else -1), "squeeze_m")
        produced.remove("_m")
    permutation = [produced.index(i) for i in output]
    if permutation != list(range(len(produced))):
        product = emit("permute", (product, *permutation), "out")
    node.replace_all_uses_with(product)
    graph.erase_node(node)
