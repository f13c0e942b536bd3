"""Pass 0 — decompose ``scaled_dot_product_attention`` into the ops TensorRT quantizes.

``F.scaled_dot_product_attention`` is one opaque node, so annotate would see no matmul in it
and both attention GEMMs would stay in floating point. This pass rewrites every SDPA call
(``torch.nn.functional.scaled_dot_product_attention`` or the ATen op
``torch.ops.aten.scaled_dot_product_attention.default`` that ``torch.export`` graphs carry)
into the pattern TensorRT's multi-head-attention fusion expects::

    qk = matmul(query, key.transpose(-2, -1))     # quantized inputs (rule 1)
    scaled = qk * scale                           # scale=None -> 1/sqrt(query.size(-1))
    masked = scaled + attention_bias(...)         # only with attn_mask or is_causal
    probs = softmax(masked, -1)
    probs = dropout(probs, p, training=True)      # only when dropout_p is not the constant 0
    pv = matmul(probs, value)                     # quantized inputs (rule 1)

Expects: a traced GraphModule (any stage before annotate). ``node.meta["tensor_meta"]`` on the
SDPA inputs is optional; when present, the new nodes get shape metadata too (so annotate's
tiny-GEMM rule sees K and N of both matmuls) and the default scale becomes a constant.

Guarantees:
* the function is unchanged: same formula as SDPA's reference implementation, for every
  ``attn_mask`` (bool: True = attend; float: added), ``is_causal`` (top-left aligned lower
  triangle), ``scale``, ``dropout_p`` and ``enable_gqa`` (keys/values repeated per query head).
  Outputs agree with the fused kernel to float32 rounding (~1e-6 relative). One documented
  difference: a query row whose keys are *all* masked gets the mean of the values instead of
  the zeros that ``torch >= 2.5`` returns, because masked positions get
  ``torch.finfo(dtype).min`` rather than ``-inf`` (as Hugging Face does): with ``-inf`` such a
  row would be NaN in the exported model and poison every later layer;
* new nodes are named ``<sdpa node>_<role>`` (roles: ``key_t``, ``qk``, ``scaled``, ``bias``,
  ``masked``, ``softmax``, ``dropout``, ``pv``; ``key_heads``/``value_heads`` with GQA,
  ``default_scale`` without shapes), so policy rules can name the two matmuls,
  e.g. ``{glob: '*_qk', skip: true}``; each carries ``node.meta["qatgraph.attention"]`` = the
  SDPA node's name, and ``gm.meta["qatgraph_attention"]`` lists the decomposed calls;
* an SDPA call that cannot be decomposed statically (``is_causal``/``enable_gqa`` computed at
  run time, or both ``attn_mask`` and ``is_causal``, which SDPA rejects) is left unchanged and
  the reason is logged; it then stays in floating point.
"""
from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from qatgraph.policy import Policy

log = logging.getLogger(__name__)

SDPA_TARGETS = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                 "enable_gqa": False}
ATTENTION_KEY = "qatgraph.attention"


# ---------------------------------------------------------------------------- run-time helpers
# Called from the rewritten graph (exporters trace through them): mask and head layout are
# run-time properties of the tensors, not of the graph.
def attention_bias(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None,
                   is_causal: bool) -> torch.Tensor:
    """The additive bias SDPA applies to the scaled scores: 0 where a query may attend,
    ``finfo(dtype).min`` where it may not (bool masks, causal), or a float mask as given."""
    if is_causal:
        visible = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        return _bool_to_bias(visible, query.dtype)
    if attn_mask is None:
        raise ValueError("attention_bias needs attn_mask or is_causal")
    if attn_mask.dtype == torch.bool:
        return _bool_to_bias(attn_mask, query.dtype)
    return attn_mask


def _bool_to_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        visible.logical_not(), torch.finfo(dtype).min)


def repeat_kv_heads(key_or_value: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """SDPA's ``enable_gqa``: repeat each key/value head for its group of query heads."""
    return key_or_value.repeat_interleave(query.size(-3) // key_or_value.size(-3), -3)


def default_scale(query: torch.Tensor) -> float:
    """SDPA's default softmax scale, ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(query.size(-1))


# ---------------------------------------------------------------------------- the pass
def run(gm: fx.GraphModule, policy: Policy | None = None) -> fx.GraphModule:
    decomposed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        args = sdpa_arguments(node)
        problem = _static_problem(args)
        if problem:
            log.warning("qatgraph: %s left as one op (its matmuls stay in floating point): %s", node.name, problem)
            continue
        _decompose(gm.graph, node, args)
        decomposed.append(node.name)
    if decomposed:
        gm.meta.setdefault("qatgraph_attention", []).extend(decomposed)
        gm.graph.lint()
        gm.recompile()
    return gm


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """The SDPA call's arguments by name, defaults filled in."""
    args = dict(SDPA_DEFAULTS)
    args.update(zip(SDPA_ARG_NAMES, node.args))
    args.update(node.kwargs)
    return args


def _static_problem(args: dict[str, Any]) -> str | None:
    for name in ("is_causal", "enable_gqa"):
        if isinstance(args[name], fx.Node):
            return f"{name} is computed at run time; make it a Python constant"
    if args["is_causal"] and args["attn_mask"] is not None:
        return "both attn_mask and is_causal are set, which scaled_dot_product_attention rejects"
    return None


class _Emitter:
    """Creates ``<base>_<role>`` nodes before ``anchor`` and gives them shape metadata."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node) -> None:
        self.graph, self.anchor, self.base = graph, anchor, anchor.name
        self.values: dict[fx.Node, Any] = {}

    def __call__(self, op: str, target: Callable | str, args: tuple, role: str,
                 kwargs: dict[str, Any] | None = None) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs or {}, name=f"{self.base}_{role}")
        node.meta[ATTENTION_KEY] = self.base
        node.meta.update({k: v for k, v in self.anchor.meta.items() if k in ("nn_module_stack", "stack_trace")})
        self._infer_meta(node)
        return node

    def static_value(self, node: Any) -> Any:
        """A meta tensor (or Python value) standing in for ``node``, or None when unknown."""
        if not isinstance(node, fx.Node):
            return node
        if node not in self.values:
            meta = node.meta.get("tensor_meta")
            self.values[node] = torch.empty(meta.shape, dtype=meta.dtype, device="meta") \
                if isinstance(meta, TensorMetadata) else None
        return self.values[node]

    def _infer_meta(self, node: fx.Node) -> None:
        inputs = node.all_input_nodes
        if any(self.static_value(n) is None for n in inputs):
            return
        args = fx.node.map_arg(node.args, self.static_value)
        kwargs = fx.node.map_arg(node.kwargs, self.static_value)
        try:
            with torch.no_grad():
                result = getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" \
                    else node.target(*args, **kwargs)
        except Exception as exc:  # shapes are an optimisation (tiny-GEMM rule): never fail the pass for them
            log.debug("qatgraph: no shape for %s: %s", node.name, exc)
            return
        self.values[node] = result
        if isinstance(result, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(result)


def _decompose(graph: fx.Graph, sdpa: fx.Node, args: dict[str, Any]) -> None:
    emit = _Emitter(graph, sdpa)
    query, key, value = args["query"], args["key"], args["value"]
    if args["enable_gqa"]:
        key = emit("call_function", repeat_kv_heads, (key, query), "key_heads")
        value = emit("call_function", repeat_kv_heads, (value, query), "value_heads")
    key_t = emit("call_method", "transpose", (key, -2, -1), "key_t")
    scores = emit("call_function", torch.matmul, (query, key_t), "qk")
    scale = args["scale"]
    if scale is None:
        known = emit.static_value(query)
        scale = 1.0 / math.sqrt(known.size(-1)) if known is not None else \
            emit("call_function", default_scale, (query,), "default_scale")
    scores = emit("call_function", operator.mul, (scores, scale), "scaled")
    if args["attn_mask"] is not None or args["is_causal"]:
        bias = emit("call_function", attention_bias, (query, key, args["attn_mask"], bool(args["is_causal"])), "bias")
        scores = emit("call_function", operator.add, (scores, bias), "masked")
    probs = emit("call_function", torch.softmax, (scores, -1), "softmax")
    dropout_p = args["dropout_p"]
    if isinstance(dropout_p, fx.Node) or dropout_p != 0.0:
        # SDPA drops whenever dropout_p > 0, whatever the module's mode: so does the rewrite.
        probs = emit("call_function", F.dropout, (probs,), "dropout", {"p": dropout_p, "training": True})
    output = emit("call_function", torch.matmul, (probs, value), "pv")
    sdpa.replace_all_uses_with(output)
    graph.erase_node(sdpa)
