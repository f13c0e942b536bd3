"""Pass 3 — skip layers: per-layer ``skip`` overrides and the skip list (e.g. from sensitivity).

Expects: annotated graph (passes/annotate.py).
Guarantees: every quantized op whose layer the policy skips becomes unquantized, with the rule
recorded as the reason, and its input edges are removed — unless another quantized consumer
still needs the same tensor quantized (that consumer keeps its edge). A skipped layer is simply
an annotation removed; nothing else changes.
"""
from __future__ import annotations

import torch.fx as fx

from qatgraph.graph.annotations import op_annotation, unquantize_consumer
from qatgraph.graph.queries import node_module
from qatgraph.passes.annotate import functional_type
from qatgraph.policy import Policy


def run(gm: fx.GraphModule, policy: Policy) -> fx.GraphModule:
    for node in gm.graph.nodes:
        annotation = op_annotation(node)
        if annotation is None or not annotation.quantized:
            continue
        module = node_module(gm, node)
        resolved = policy.resolve(annotation.layer, type(module) if module is not None else functional_type(node))
        if resolved.skip_rule is None:
            continue
        annotation.quantized = False
        annotation.reason = f"skipped by {resolved.skip_rule}" if resolved.skip_rule == "skip list" else \
            f"skipped by override {resolved.skip_rule}"
        unquantize_consumer(gm.graph, node)
    return gm
