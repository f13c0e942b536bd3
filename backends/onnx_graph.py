"""Read-only index of an ONNX graph for the Q/DQ linter (``qatgraph.backends.onnx_lint``).

Expects: an ``onnx.ModelProto`` (any opset). Only the main graph is indexed; subgraphs of
If/Loop/Scan and model-local functions are not walked (exported QAT models have none).

Guarantees: one pass over the nodes builds the producer and consumer maps; constants
(initializers and ``Constant`` nodes) are resolved lazily, so huge weight initializers are
never converted to numpy unless asked for (the linter only reads their shapes and dtypes).
Nothing in the model is modified. :func:`load_onnx` reads a file with a one-paragraph error when
it is missing or not an ONNX model (every backend reads files through it).
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from qatgraph.errors import ExportError

# Ops whose inputs TensorRT wants quantized (design rule 1), with the input slots that carry
# activations/weights. The bias (Conv/ConvTranspose input 2, Gemm input C) is never quantized.
WEIGHTED_OPS: dict[str, tuple[int, ...]] = {
    "Conv": (0, 1),
    "ConvTranspose": (0, 1),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
}

DEFAULT_DOMAINS = ("", "ai.onnx")


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file, with a one-paragraph :class:`ExportError` when it is missing or unreadable."""
    if os.path.isdir(path):
        raise ExportError(f"{os.fspath(path)!r} is a directory; give the .onnx file inside it")
    if not os.path.isfile(path):
        raise ExportError(f"ONNX file {os.fspath(path)!r} does not exist; export the model first "
                          "(qatgraph.export_onnx or `qatgraph export`)")
    try:
        return onnx.load(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: all mean "not an ONNX file"
        raise ExportError(f"{os.fspath(path)!r} is not a readable ONNX model ({type(exc).__name__}: "
                          f"{str(exc).strip()[:200] or 'cannot parse'}); is it complete? Export it again.") from None


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or ``op_type#index`` (its position in ``graph.node``) when unnamed."""
    return node.name or f"{node.op_type}#{index}"


def attribute(node: onnx.NodeProto, name: str, default=None):
    """Value of attribute ``name`` of ``node`` (ints, floats, strings, lists), or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _constant_node_array(node: onnx.NodeProto) -> np.ndarray | onnx.TensorProto | None:
    """The value of a ``Constant`` node: a TensorProto for ``value``, numpy for the short forms."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value / string forms: never scales or zero points


def format_values(values: np.ndarray | None) -> str:
    """Short human-readable rendering of a scale or zero point for lint messages."""
    if values is None:
        return "<not a constant>"
    flat = np.asarray(values).reshape(-1)
    if flat.size == 1:
        return f"{flat[0]:.6g}" if flat.dtype.kind == "f" else str(flat[0])
    head = ", ".join(f"{v:.4g}" if flat.dtype.kind == "f" else str(v) for v in flat[:4])
    return f"[{head}{', ...' if flat.size > 4 else ''}] ({flat.size} values)"


@dataclass
class ConstantTable:
    """Initializers and Constant-node outputs by tensor name, converted to numpy on demand."""

    sources: dict[str, onnx.TensorProto | np.ndarray] = field(default_factory=dict)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def array(self, name: str) -> np.ndarray | None:
        """The constant's value, or ``None`` if ``name`` is not a constant (or cannot be read)."""
        if name not in self.sources:
            return None
        if name not in self._arrays:
            source = self.sources[name]
            try:
                value = source if isinstance(source, np.ndarray) else numpy_helper.to_array(source)
            except Exception:  # external data that was not loaded, exotic dtypes: cannot check
                return None
            self._arrays[name] = value
        return self._arrays[name]

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The constant's shape without converting its data (cheap for big weights)."""
        source = self.sources.get(name)
        if source is None:
            return None
        if isinstance(source, np.ndarray):
            return tuple(source.shape)
        return tuple(int(d) for d in source.dims)

    def dtype(self, name: str) -> int | None:
        """The constant's ``onnx.TensorProto`` element type (e.g. ``TensorProto.INT8``)."""
        source = self.sources.get(name)
        if source is None:
            return None
        if isinstance(source, np.ndarray):
            return onnx.helper.np_dtype_to_tensor_dtype(source.dtype)
        return int(source.data_type)


@dataclass
class GraphIndex:
    """Producer/consumer maps and constants of one ONNX graph."""

    model: onnx.ModelProto
    nodes: list[onnx.NodeProto]
    labels: list[str]
    producer: dict[str, int]  # tensor name -> index of the node that writes it
    consumers: dict[str, list[tuple[int, int]]]  # tensor name -> [(node index, input slot)]
    constants: ConstantTable
    graph_outputs: set[str]
    positions: dict[int, int]  # id(node) -> index; NodeProtos compare by value, not identity

    @classmethod
    def build(cls, model: onnx.ModelProto) -> "GraphIndex":
        graph = model.graph
        nodes = list(graph.node)
        constants = ConstantTable({init.name: init for init in graph.initializer})
        producer: dict[str, int] = {}
        consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for index, node in enumerate(nodes):
            for slot, name in enumerate(node.input):
                if name:
                    consumers[name].append((index, slot))
            for name in node.output:
                if name:
                    producer[name] = index
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
                value = _constant_node_array(node)
                if value is not None:
                    constants.sources[node.output[0]] = value
        labels = [node_label(node, i) for i, node in enumerate(nodes)]
        return cls(model, nodes, labels, producer, dict(consumers), constants,
                   {out.name for out in graph.output}, {id(n): i for i, n in enumerate(nodes)})

    # --- navigation -------------------------------------------------------------------------
    def producer_of(self, tensor: str) -> onnx.NodeProto | None:
        index = self.producer.get(tensor)
        return None if index is None else self.nodes[index]

    def consumers_of(self, tensor: str) -> list[onnx.NodeProto]:
        return [self.nodes[i] for i, _ in self.consumers.get(tensor, [])]

    def label(self, node: onnx.NodeProto) -> str:
        return self.labels[self.positions[id(node)]]

    def produced_by(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        """The producer of ``tensor`` if it is an ``op_type`` node, else ``None``."""
        node = self.producer_of(tensor)
        return node if node is not None and node.op_type == op_type else None

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def default_opset(self) -> int | None:
        versions = [o.version for o in self.model.opset_import if o.domain in DEFAULT_DOMAINS]
        return max(versions) if versions else None

    # --- quantization helpers -------------------------------------------------------------
    def qdq_param(self, node: onnx.NodeProto, slot: int) -> np.ndarray | None:
        """Constant value of a Q/DQ scale (slot 1) or zero point (slot 2), if resolvable."""
        if len(node.input) <= slot or not node.input[slot]:
            return None
        return self.constants.array(node.input[slot])

    def same_qdq_param(self, a: onnx.NodeProto, b: onnx.NodeProto, slot: int) -> bool:
        """True if Q/DQ nodes ``a`` and ``b`` provably share the scale (slot 1) or zero point
        (slot 2): the same tensor name, or equal constant values."""
        name_a = a.input[slot] if len(a.input) > slot else ""
        name_b = b.input[slot] if len(b.input) > slot else ""
        if name_a == name_b:
            return True
        value_a, value_b = self.qdq_param(a, slot), self.qdq_param(b, slot)
        if value_a is None or value_b is None or value_a.size != value_b.size:
            return False
        return bool(np.array_equal(value_a.reshape(-1), value_b.reshape(-1)))

    def dq_source_constant(self, dq: onnx.NodeProto) -> str | None:
        """Name of the constant a DequantizeLinear ultimately reads: its own input if constant
        (an INT8 initializer), or the float constant behind a QuantizeLinear feeding it."""
        source = dq.input[0]
        if self.is_constant(source):
            return source
        quant = self.produced_by(source, "QuantizeLinear")
        if quant is not None and self.is_constant(quant.input[0]):
            return quant.input[0]
        return None

    def is_weight_qdq(self, node: onnx.NodeProto) -> bool:
        """True for a Q or DQ on a constant (a weight), False for one on an activation."""
        if node.op_type == "QuantizeLinear":
            return self.is_constant(node.input[0])
        return self.dq_source_constant(node) is not None

    def weighted_chain_head(self, tensor: str) -> onnx.NodeProto | None:
        """The weighted op (Conv/Gemm/MatMul/ConvTranspose) writing ``tensor`` directly or
        through one BatchNormalization (an unfolded BN still fuses into the conv)."""
        node = self.producer_of(tensor)
        if node is not None and node.op_type == "BatchNormalization":
            node = self.producer_of(node.input[0])
        if node is not None and node.op_type in WEIGHTED_OPS:
            return node
        return None
