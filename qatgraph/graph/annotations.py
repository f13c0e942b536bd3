"""Quantization annotations: the language every pass speaks.

Passes decide *what* is quantized by writing node metadata; only ``passes/materialize.py``
turns annotations into quantizer modules. Two kinds:

* :class:`OpAnnotation` on a weighted-op node (``node.meta["qatgraph.op"]``): is the layer
  quantized, with which specs, and the rule that decided it.
* :class:`TensorAnnotation` on the node producing a tensor (``node.meta["qatgraph.tensor"]``):
  the tensor gets one quantizer, applied to the listed consumer edges only (TensorRT rule 5:
  one Q/DQ per tensor, shared by its consumers). ``group`` names tensors that must share one
  scale (Concat inputs and output).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from qatgraph.policy import QuantSpec

OP_KEY = "qatgraph.op"
TENSOR_KEY = "qatgraph.tensor"
RESIDUAL_KEY = "qatgraph.residual"


@dataclass
class OpAnnotation:
    kind: str
    layer: str
    quantized: bool
    reason: str
    weight_spec: QuantSpec | None = None
    activation_spec: QuantSpec | None = None
    activation_args: tuple[int, ...] = ()
    # Functional ops (F.linear(x, self.w), x @ self.w): the get_attr target of the weight, its
    # output-channel axis (None: per tensor) and the argument it feeds.
    weight_source: str | None = None
    weight_axis: int | None = None
    weight_arg: int | None = None


@dataclass
class Edge:
    consumer: str  # consumer node name
    arg_index: int
    reason: str


@dataclass
class TensorAnnotation:
    spec: QuantSpec
    edges: list[Edge] = field(default_factory=list)
    group: str | None = None  # producers with the same group share one quantizer

    @property
    def reasons(self) -> list[str]:
        return [edge.reason for edge in self.edges]


def weight_quantizer_path(weight_source: str) -> str:
    """Where the weight quantizer of a functional op on ``weight_source`` (a get_attr target)
    lives: next to the tensor, ``weight_quantizer`` for one named ``weight``, else ``<name>_quantizer``."""
    owner, _, name = weight_source.rpartition(".")
    local = "weight_quantizer" if name == "weight" else f"{name}_quantizer"
    return f"{owner}.{local}" if owner else local


def op_annotation(node: fx.Node) -> OpAnnotation | None:
    return node.meta.get(OP_KEY)


def tensor_annotation(node: fx.Node) -> TensorAnnotation | None:
    return node.meta.get(TENSOR_KEY)


def quantize_edge(producer: fx.Node, consumer: fx.Node, arg_index: int, spec: QuantSpec, reason: str) -> None:
    """Request that ``consumer.args[arg_index]`` (produced by ``producer``) be fake-quantized.

    The first spec requested for a tensor wins: a tensor has exactly one quantizer.
    """
    annotation = producer.meta.get(TENSOR_KEY)
    if annotation is None:
        annotation = producer.meta[TENSOR_KEY] = TensorAnnotation(spec=spec)
    if not any(e.consumer == consumer.name and e.arg_index == arg_index for e in annotation.edges):
        annotation.edges.append(Edge(consumer.name, arg_index, reason))


def unquantize_consumer(graph: fx.Graph, consumer: fx.Node) -> None:
    """Remove every edge into ``consumer`` (its inputs go back to floating point)."""
    for producer in consumer.all_input_nodes:
        annotation = producer.meta.get(TENSOR_KEY)
        if annotation is None:
            continue
        annotation.edges = [e for e in annotation.edges if e.consumer != consumer.name]
        if not annotation.edges:
            del producer.meta[TENSOR_KEY]


def is_edge_quantized(producer: fx.Node, consumer: fx.Node, arg_index: int) -> bool:
    annotation = producer.meta.get(TENSOR_KEY)
    return annotation is not None and any(
        e.consumer == consumer.name and e.arg_index == arg_index for e in annotation.edges)
