"""Exporter-independent clean-up of an exported Q/DQ ONNX model, in place.

Expects a model straight from ``torch.onnx.export`` (TorchScript or dynamo) of the export module
that :mod:`qatgraph.backends.onnx_qdq` builds. Guarantees, after :func:`postprocess`: every
activation ``QuantizeLinear`` is tagged with the qualified name of the quantizer it came from
(model metadata ``qatgraph.activation_quantizers``, read by the parity check to match ONNX and
PyTorch activations by identity rather than by position); no Identity node (the TorchScript
exporter dedups equal initializers through them); INT4/UINT4 zero points are typed initializers;
every weight ``DequantizeLinear`` reads an initializer directly (no Slice or Transpose after it); no dead
node or unused initializer; the inputs' dim 0 is called ``batch`` when the batch is dynamic.
"""
from __future__ import annotations

import ast
import json

import numpy as np
import onnx
from onnx import numpy_helper

BATCH_DIM = "batch"
QUANTIZER_TAGS = "qatgraph.activation_quantizers"  # model metadata: {QuantizeLinear output: quantizer name}


def postprocess(model: onnx.ModelProto, dynamic_batch: bool) -> None:
    """Exporter-independent clean-up, in place: DequantizeLinear must read INT8 initializers
    directly (lint rule), and the batch dimension is called ``batch``."""
    _tag_activation_quantizers(model)  # first: the Identity nodes still carry the deduplicated names
    _bypass_identities(model)
    _merge_duplicate_qdq(model)
    _fold_constant_casts(model)
    _fold_weight_slices(model)
    _fold_weight_transposes(model)
    _drop_dead_nodes(model)
    _drop_unused_initializers(model)
    if dynamic_batch:
        _name_batch_dim(model)


def quantizer_of(node: onnx.NodeProto, initializers: set[str], identity_sources: dict[str, str]) -> str | None:
    """The qualified name of the quantizer module an activation QuantizeLinear came from.

    The dynamo exporter records the module scopes of every node (``pkg.torch.onnx.name_scopes``,
    the quantizer's own scope second to last). The TorchScript exporter names the scale initializer
    after the module's buffer (``<quantizer>.scale``); it deduplicates equal initializers through
    Identity nodes whose outputs keep the original names, so those are looked at before they go."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                return str(scopes[-2])
    scale = node.input[1] if len(node.input) > 1 else ""
    if scale.endswith(".scale") and (scale in initializers or scale in identity_sources):
        return scale[: -len(".scale")]
    return None


def _tag_activation_quantizers(model: onnx.ModelProto) -> None:
    initializers = {init.name for init in model.graph.initializer}
    identity_sources = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Identity"}
    tags = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers:
            name = quantizer_of(node, initializers, identity_sources)
            if name is not None:
                tags[node.output[0]] = name
    if tags:
        entry = model.metadata_props.add()
        entry.key, entry.value = QUANTIZER_TAGS, json.dumps(tags)


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def _bypass_identities(model: onnx.ModelProto) -> None:
    """Remove Identity nodes (the TorchScript exporter dedups equal initializers through them)."""
    graph_outputs = {out.name for out in model.graph.output}
    for node in list(model.graph.node):
        if node.op_type == "Identity" and node.output[0] not in graph_outputs:
            _rename_input(model, node.output[0], node.input[0])
            model.graph.node.remove(node)


def _merge_duplicate_qdq(model: onnx.ModelProto) -> None:
    """One Q/DQ pair per tensor: a QuantizeLinear/DequantizeLinear with the same inputs (tensor,
    scale, zero point) and attributes as an earlier one is dropped and its readers read the
    earlier one's output (one quantizer module called twice on one tensor, e.g. shared by the
    module-wise layers of untraced code)."""
    graph_outputs = {out.name for out in model.graph.output}
    seen: dict[tuple, str] = {}
    for node in list(model.graph.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.output[0] in graph_outputs:
            continue
        key = (node.op_type, tuple(node.input), tuple(a.SerializeToString() for a in node.attribute))
        if key in seen:
            _rename_input(model, node.output[0], seen[key])
            model.graph.node.remove(node)
        else:
            seen[key] = node.output[0]


def _fold_constant_casts(model: onnx.ModelProto) -> None:
    """Cast(initializer) -> a typed initializer (the INT4/UINT4 zero points of opset-21 Q/DQ)."""
    initializers = {init.name: init for init in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type != "Cast" or node.input[0] not in initializers:
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        value = numpy_helper.to_array(initializers[node.input[0]])
        if to not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        tensor = onnx.helper.make_tensor(node.output[0], to, value.shape, value.astype(np.int64).reshape(-1).tolist())
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)


def _constant_value(name: str, initializers: dict, producers: dict) -> np.ndarray | None:
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _fold_weight_slices(model: onnx.ModelProto) -> None:
    """DequantizeLinear(W) -> Slice(constant bounds)  becomes  DequantizeLinear(W sliced).

    A row slice of a packed weight (MultiheadAttention's in-projection for cross-attention) exports
    as Slice(DQ(W)); TensorRT and the linter want the DequantizeLinear to feed the MatMul directly.
    Per-channel scales and zero points are sliced with the weight when the slice runs along their axis.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for index, node in enumerate(list(model.graph.node)):
        dq = producers.get(node.input[0]) if node.op_type == "Slice" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        bounds = [_constant_value(name, initializers, producers) if name else None for name in node.input[1:5]]
        if any(value is None for value in bounds[:2]) or any(value is None and name for value, name in
                                                            zip(bounds[2:], node.input[3:5])):
            continue
        weight = numpy_helper.to_array(initializers[dq.input[0]])
        starts, ends = bounds[0], bounds[1]
        axes = bounds[2] if len(bounds) > 2 and bounds[2] is not None else np.arange(len(starts))
        steps = bounds[3] if len(bounds) > 3 and bounds[3] is not None else np.ones(len(starts), dtype=np.int64)
        selection = [slice(None)] * weight.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            selection[int(axis) % weight.ndim] = slice(int(start), int(end), int(step))
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        inputs = [_add_initializer(model, weight[tuple(selection)], f"{dq.input[0]}_{node.name or index}_sliced")]
        channel_axis = attributes.get("axis", 1) % weight.ndim
        for name in dq.input[1:]:
            value = numpy_helper.to_array(initializers[name]) if name in initializers else None
            if value is not None and value.ndim == 1 and value.size > 1:  # per channel
                inputs.append(_add_initializer(model, value[selection[channel_axis]],
                                               f"{name}_{node.name or index}_sliced"))
            else:
                inputs.append(name)
        new_dq = onnx.helper.make_node("DequantizeLinear", inputs, list(node.output),
                                       name=(dq.name or "DequantizeLinear") + "_sliced_" + str(index), **attributes)
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(position, new_dq)  # the old DequantizeLinear, if now unused, is dropped later


def _add_initializer(model: onnx.ModelProto, value: np.ndarray, name: str) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return name


def _fold_weight_transposes(model: onnx.ModelProto) -> None:
    """DequantizeLinear(W) -> Transpose  becomes  DequantizeLinear(W transposed, remapped axis).

    Linear layers on 3-D inputs export as MatMul(x, Transpose(DQ(W))); TensorRT and the linter
    want the DequantizeLinear to feed the MatMul directly.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for transpose in list(model.graph.node):
        dq = producers.get(transpose.input[0]) if transpose.op_type == "Transpose" else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[dq.input[0]])
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), list(range(weight.ndim))[::-1])
        new_weight = numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), dq.input[0] + "_transposed")
        model.graph.initializer.append(new_weight)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        scale_dims = initializers[dq.input[1]].dims if dq.input[1] in initializers else []
        if len(scale_dims) == 1 and scale_dims[0] > 1:  # per channel: follow the axis through the permutation
            attributes["axis"] = perm.index(attributes.get("axis", 1) % weight.ndim)
        new_dq = onnx.helper.make_node("DequantizeLinear", [new_weight.name, *dq.input[1:]], list(transpose.output),
                                       name=(dq.name or "DequantizeLinear") + "_transposed", **attributes)
        index = list(model.graph.node).index(transpose)
        model.graph.node.remove(transpose)
        model.graph.node.insert(index, new_dq)  # the old DequantizeLinear, now unused, is dropped later


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is used (a DequantizeLinear left behind by a fold)."""
    graph_outputs = {out.name for out in model.graph.output}
    while True:
        used = {name for node in model.graph.node for name in node.input} | graph_outputs
        dead = [node for node in model.graph.node if not any(out in used for out in node.output)]
        if not dead:
            return
        for node in dead:
            model.graph.node.remove(node)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {out.name for out in model.graph.output}
    for init in list(model.graph.initializer):
        if init.name not in used:
            model.graph.initializer.remove(init)


def _name_batch_dim(model: onnx.ModelProto) -> None:
    """Call the inputs' symbolic dim 0 ``batch`` everywhere (a safety net: both exporters are
    asked for that name, but a symbol like ``s0`` may survive in shapes derived from it)."""
    symbols = set()
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            symbols.add(dims[0].dim_param)
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in symbols:
                dim.dim_param = BATCH_DIM
