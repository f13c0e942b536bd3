"""Pass 0a — re-express ``nn.MultiheadAttention`` as the ops TensorRT quantizes.

torch.fx keeps ``nn.MultiheadAttention`` as one leaf call (it lives in ``torch.nn``), so annotate
would see neither its projections nor its two attention GEMMs, and none of them would reach the
summary. This pass rewrites each call into traceable ops on the module's own parameters::

    q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, -1)  # self-attention, packed weight
      (or three F.linear on row slices of the packed weight, or on q/k/v_proj_weight)
    q, k, v -> (batch, heads, tokens, head_dim) via unflatten + transpose
    out = scaled_dot_product_attention(q, k, v, attn_mask=bias)       # decomposed right here by
                                                                        # passes/attention.py
    out_proj(out.transpose(1, 2).flatten(-2))                          # the module's out_proj Linear

so the in-projection is a functional Linear on a parameter (quantized per output channel by
annotate/materialize, the weight staying where it was: ``state_dict`` keys unchanged), both
attention matmuls get quantized inputs (Q, Kᵀ; softmax P, V) and the softmax/scores stay float:
the Q/DQ pattern of TensorRT's MHA fusion.

Expects: a traced GraphModule before annotate (shape metadata optional: when present the new
nodes get it too, so the tiny-GEMM rule sees them).
Guarantees:
* the function is unchanged for ``batch_first`` true and false, packed and separate
  (``kdim``/``vdim``) in-projections, with or without biases, ``key_padding_mask`` and
  ``attn_mask`` (bool: True = may not attend; float: added; 2-D or 3-D ``(batch*heads, L, S)``),
  ``need_weights`` (the returned weights are the softmax, averaged over heads unless
  ``average_attn_weights=False``) and attention dropout (an ``nn.Dropout`` registered on the
  module as ``attention_dropout``: it follows ``train()``/``eval()``). Masked scores get
  ``finfo.min`` instead of ``-inf``, as in passes/attention.py (a fully masked row is the mean of
  the values, not NaN);
* ``out_proj`` (a ``NonDynamicallyQuantizableLinear``) becomes a plain ``nn.Linear`` sharing the
  same parameters, so it is quantized like any Linear;
* a call that cannot be rewritten (``add_bias_kv``, ``add_zero_attn``, flags computed at run
  time) stays one module; annotate then lists it in the summary, float, with this reason;
* the graph of one call that compile builds for an attention module called from untraced code
  (qatgraph/graph/attention_calls.py, ``meta["qatgraph_attention_root"]``) gets the module's
  parameters and children hoisted to its root, so its ``state_dict`` keys are the module's own.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from qatgraph.errors import QatgraphError
from qatgraph.graph.attention_calls import ATTENTION_ROOT, SIGNATURE, call_problem, module_problem
from qatgraph.passes import attention
from qatgraph.policy import Policy

log = logging.getLogger(__name__)
KEPT_WHOLE = "_qatgraph_kept_whole"


# ---------------------------------------------------------------------------- run-time helpers
def mha_attention_bias(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None,
                       key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """The additive bias on (batch, heads, L, S) scores from MultiheadAttention's two masks:
    boolean True entries get ``finfo(dtype).min``, float entries are added."""
    heads, length, source = query.size(1), query.size(-2), key.size(-2)
    dtype = query.dtype
    bias = torch.zeros((), dtype=dtype, device=query.device)
    blocked = None
    if attn_mask is not None:
        mask = attn_mask.view(-1, heads, length, source) if attn_mask.dim() == 3 else attn_mask
        if mask.dtype == torch.bool:
            blocked = mask
        else:
            bias = bias + mask.to(dtype)
    if key_padding_mask is not None:
        padding = key_padding_mask.view(key_padding_mask.size(0), 1, 1, source)
        if padding.dtype == torch.bool:
            blocked = padding if blocked is None else blocked | padding
        else:
            bias = bias + padding.to(dtype)
    if blocked is not None:
        bias = torch.where(blocked, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=query.device), bias)
    return bias


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, embed) -> (batch, heads, tokens, head_dim)."""
    return x.unflatten(-1, (heads, x.size(-1) // heads)).transpose(1, 2)


def attention_output(output: torch.Tensor, weights: torch.Tensor | None) -> tuple:
    return output, weights


# ---------------------------------------------------------------------------- the pass
def run(gm: fx.GraphModule, policy: Policy | None = None) -> fx.GraphModule:
    rewritten = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, nn.MultiheadAttention):
            continue
        bound = SIGNATURE.bind(module, *node.args, **node.kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        problem = _static_problem(module, args)
        if problem and gm.meta.get(ATTENTION_ROOT) == node.target:  # graph/attention_calls.py checked it
            raise QatgraphError(f"internal error: the attention call graph {gm.meta.get('qatgraph_prefix')!r} "
                                f"cannot be rewritten ({problem}); please report this")
        if problem:
            module.__dict__[KEPT_WHOLE] = f"MultiheadAttention kept as one module ({problem}): its GEMMs stay float"
            log.warning("qatgraph: %s left as one module (its GEMMs stay in floating point): %s", node.name, problem)
            continue
        _rewrite(gm, node, module, args)
        rewritten.append(node.name)
    if rewritten:
        gm.meta.setdefault("qatgraph_mha", []).extend(rewritten)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return gm


def _static_problem(module: nn.MultiheadAttention, args: dict) -> str | None:
    for name in ("need_weights", "average_attn_weights", "is_causal"):
        if isinstance(args[name], fx.Node):
            return f"{name} is computed at run time; pass a Python constant"
    return module_problem(module) or call_problem(bool(args["is_causal"]), args["attn_mask"] is not None)


def _rewrite(gm: fx.GraphModule, node: fx.Node, module: nn.MultiheadAttention, args: dict) -> None:
    emit = attention._Emitter(gm.graph, node)
    heads, embed = module.num_heads, module.embed_dim
    hoisted = gm.meta.get(ATTENTION_ROOT) == node.target  # the graph of one call (graph/attention_calls.py)
    _plain_out_proj(module)
    if hoisted:  # the module's parameters and children become the graph's own: state_dict keys unchanged
        for name, value in module.named_parameters(recurse=False):
            gm.register_parameter(name, value)
        for name, child in module.named_children():
            gm.add_module(name, child)
    prefix = "" if hoisted else str(node.target)

    def path(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name
    inputs = [args["query"], args["key"], args["value"]]
    if not module.batch_first:
        transposed: dict[fx.Node, fx.Node] = {}
        for role, tensor in zip(("query", "key", "value"), inputs):
            if tensor not in transposed:
                transposed[tensor] = emit("call_method", "transpose", (tensor, 0, 1), f"{role}_bf")
        inputs = [transposed[t] for t in inputs]

    def parameter(name: str) -> fx.Node | None:
        value = getattr(module, name)
        if value is None:
            return None
        getter = emit("get_attr", path(name), (), name)
        getter.meta["tensor_meta"] = _extract_tensor_metadata(value)
        return getter

    bias = parameter("in_proj_bias")
    bias_rows = [emit("call_function", operator.getitem, (bias, slice(i * embed, (i + 1) * embed)), f"{role}_bias")
                 if bias is not None else None for i, role in enumerate(("q", "k", "v"))]
    if module._qkv_same_embed_dim and inputs[0] is inputs[1] is inputs[2]:
        packed = emit("call_function", F.linear, (inputs[0], parameter("in_proj_weight"), bias), "in_proj")
        chunks = emit("call_method", "chunk", (packed, 3, -1), "qkv")
        projected = [emit("call_function", operator.getitem, (chunks, i), role) for i, role in enumerate("qkv")]
    elif module._qkv_same_embed_dim:
        weight = parameter("in_proj_weight")
        projected = []
        for i, (role, tensor) in enumerate(zip("qkv", inputs)):
            rows = emit("call_function", operator.getitem, (weight, slice(i * embed, (i + 1) * embed)), f"{role}_weight")
            projected.append(emit("call_function", F.linear, (tensor, rows, bias_rows[i]), f"{role}_proj"))
    else:
        projected = [emit("call_function", F.linear, (tensor, parameter(f"{role}_proj_weight"), bias_rows[i]),
                          f"{role}_proj") for i, (role, tensor) in enumerate(zip("qkv", inputs))]
    q, k, v = [emit("call_function", split_heads, (x, heads), f"{role}_heads") for role, x in zip("qkv", projected)]
    mask = None
    if args["attn_mask"] is not None or args["key_padding_mask"] is not None:
        mask = emit("call_function", mha_attention_bias, (q, k, args["attn_mask"], args["key_padding_mask"]), "mask")
    with gm.graph.inserting_before(node):
        sdpa = gm.graph.create_node("call_function", F.scaled_dot_product_attention, (q, k, v), {"attn_mask": mask},
                                    name=f"{node.name}_attention")
    attention._decompose(gm.graph, sdpa, attention.sdpa_arguments(sdpa))
    softmax = next(n for n in gm.graph.nodes if n.name == f"{sdpa.name}_softmax")
    pv = next(iter(softmax.users))
    if module.dropout > 0:
        (gm if hoisted else module).add_module("attention_dropout", nn.Dropout(module.dropout))
        with gm.graph.inserting_after(softmax):
            dropped = gm.graph.call_module(path("attention_dropout"), (softmax,))
        pv.replace_input_with(softmax, dropped)
    merged = emit("call_method", "flatten", (emit("call_method", "transpose", (pv, 1, 2), "merge"), -2), "merged")
    output = emit("call_module", path("out_proj"), (merged,), "out_proj")
    if not module.batch_first:
        output = emit("call_method", "transpose", (output, 0, 1), "output")
    weights = None
    if args["need_weights"]:
        weights = emit("call_method", "mean", (softmax, 1), "weights") if args["average_attn_weights"] else softmax
    _replace_outputs(gm, node, output, weights, emit)
    if hoisted:
        gm.delete_submodule(str(node.target))


def _plain_out_proj(module: nn.MultiheadAttention) -> None:
    """NonDynamicallyQuantizableLinear -> nn.Linear on the same parameters (same state_dict keys)."""
    old = module.out_proj
    if type(old) is nn.Linear:
        return
    plain = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    plain.weight = old.weight
    if old.bias is not None:
        plain.bias = old.bias
    module.out_proj = plain


def _replace_outputs(gm: fx.GraphModule, node: fx.Node, output: fx.Node, weights: fx.Node | None,
                     emit: attention._Emitter) -> None:
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1):
            if user.args[1] == 0:
                user.replace_all_uses_with(output)
            elif weights is not None:
                user.replace_all_uses_with(weights)
            elif user.users:
                continue  # the module returned None here: keep the (unused) tuple below
            gm.graph.erase_node(user)
    if node.users:
        node.replace_all_uses_with(emit("call_function", attention_output, (output, weights), "tuple"))
    gm.graph.erase_node(node)
