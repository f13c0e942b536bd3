"""Pass 1 — Conv/ConvTranspose/Linear + BatchNorm (+ ReLU) fusion.

Expects: a traced GraphModule, no quantizers yet.
Guarantees:
* ``policy.bn == "fold"``: every BN that is the sole consumer of a Conv/ConvTranspose/Linear
  output (Linear only with a 2-D output) is folded into that layer and removed; the function
  of the model in eval mode is unchanged (to float rounding).
* ``policy.bn == "train"``: nothing changes; each foldable pair is recorded on the layer's node
  (``node.meta["qatgraph.bn"]``) so exporters fold it later, exactly (see qatgraph/graph/folding.py).
ReLU needs no fusion: TensorRT fuses it, and simulating the fusion in training is what its
explicit-quantization guide says not to do.
"""
from __future__ import annotations

import torch.fx as fx

from qatgraph.graph.folding import fold_graph_batchnorm, foldable_pairs
from qatgraph.policy import Policy

BN_KEY = "qatgraph.bn"


def run(gm: fx.GraphModule, policy: Policy) -> fx.GraphModule:
    if policy.bn == "fold":
        gm.meta["qatgraph_folded_bn"] = fold_graph_batchnorm(gm)
        return gm
    for layer_node, bn_node in foldable_pairs(gm):
        layer_node.meta[BN_KEY] = str(bn_node.target)
    return gm
