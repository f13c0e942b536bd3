"""Helpers for golden placement tests: which tensors of a compiled graph carry quantizers."""
from __future__ import annotations

import torch.fx as fx

from qatgraph.passes.materialize import QUANTIZER_KEY


def quantized_edges(gm: fx.GraphModule) -> dict[str, set[str]]:
    """{producer node name: names of the consumers that read its quantized version}."""
    edges: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        if QUANTIZER_KEY in node.meta:
            producer = node.args[0]
            edges.setdefault(producer.name, set()).update(user.name for user in node.users)
    return edges


def quantizer_targets(gm: fx.GraphModule) -> dict[str, str]:
    """{producer node name: quantizer module path} (shared scales show as equal paths)."""
    return {node.args[0].name: node.meta[QUANTIZER_KEY] for node in gm.graph.nodes if QUANTIZER_KEY in node.meta}
