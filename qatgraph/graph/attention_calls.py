"""``nn.MultiheadAttention`` called from untraced code, made a traced region of its own.

torch.fx keeps ``nn.MultiheadAttention`` as one call (it lives in ``torch.nn``); in a traced graph
``passes/mha.py`` rewrites that call into its projections and attention GEMMs, which get Q/DQ. When
partial tracing leaves the *caller* untraced, there is no graph around the call. With example
inputs, compile records how the untraced code calls each attention module
(:func:`record_attention_calls`: which masks it passes, ``need_weights``,
``average_attn_weights``, ``is_causal``, whether query, key and value are one tensor) and, for a
module always called the same way, builds a one-call graph (:func:`attention_graph`) that replaces
the module. The mha pass then rewrites it like any other, with the module's own parameters hoisted
to the graph's root, so the ``state_dict`` keys stay those of the float model.

The graph computes that one way of calling. A later call made differently (another flag, a mask
that was not there) raises a :class:`~qatgraph.errors.UsageError` naming the module, both calls and
the fix, rather than computing something else. Modules called in several ways, never called on the
example, with ``add_bias_kv``/``add_zero_attn``, or named in ``tracing.leaf_modules`` stay one float
module, with a float row in the summary (:mod:`.eager_ops`).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn

from qatgraph.errors import UsageError

ATTENTION_ROOT = "qatgraph_attention_root"  # GraphModule.meta: the call_module target mha hoists to the root
_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_FLAGS = ("need_weights", "average_attn_weights", "is_causal")
_MASKS = ("key_padding_mask", "attn_mask")
_CONFLICT = "called in several ways"


def record_attention_calls(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None) -> dict[int, Any]:
    """id(module) -> the call pattern of every ``nn.MultiheadAttention`` the example run calls
    (:data:`_CONFLICT` when it is called in several ways). Runs ``model`` once (eval, no grad)."""
    calls: dict[int, Any] = {}

    def record(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
        pattern = call_pattern(module, call_args, call_kwargs)
        calls[id(module)] = pattern if calls.get(id(module), pattern) == pattern else _CONFLICT

    modules = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not modules:
        return {}
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **(kwargs or {}))
    except Exception:  # noqa: BLE001 - compile's own example run reports a failing input, in words
        return {}
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return calls


def call_pattern(module: nn.Module, call_args: tuple, call_kwargs: dict) -> dict[str, Any]:
    """What the graph of one call depends on: the flags, which masks are tensors (and their dtype),
    and which of query, key and value are the same tensor."""
    bound = _SIGNATURE.bind(module, *call_args, **call_kwargs)
    bound.apply_defaults()
    values = bound.arguments
    pattern: dict[str, Any] = {flag: bool(values[flag]) for flag in _FLAGS}
    for mask in _MASKS:
        value = values[mask]
        pattern[mask] = None if value is None else str(value.dtype)
    pattern["key_is_query"] = values["key"] is values["query"]
    pattern["value_is_key"] = values["value"] is values["key"]
    return pattern


def convertible(module: nn.Module, pattern: Any) -> bool:
    return (isinstance(pattern, dict) and module.bias_k is None and module.bias_v is None and not module.add_zero_attn
            and not (pattern["is_causal"] and pattern["attn_mask"] is None))


def check_attention_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Any,
                         need_weights: Any, attn_mask: Any, average_attn_weights: Any, is_causal: Any,
                         name: str, expected: dict) -> torch.Tensor:
    """``query``, after checking that the call is the one the graph computes."""
    actual: dict[str, Any] = {"need_weights": bool(need_weights), "average_attn_weights": bool(average_attn_weights),
                              "is_causal": bool(is_causal)}
    for mask, tensor in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        actual[mask] = None if tensor is None else str(tensor.dtype)
    actual["key_is_query"], actual["value_is_key"] = key is query, value is key
    if actual != expected:
        differs = ", ".join(f"{k}: {_show(expected[k])} then, {_show(actual[k])} now" for k in expected
                            if expected[k] != actual[k])
        raise UsageError(f"{name} (nn.MultiheadAttention, called from untraced code) was compiled for the call the "
                         f"example inputs made, and is now called differently ({differs}): its quantized graph "
                         "computes that one call. Call it the same way, or keep it one float module with policy "
                         f"tracing.leaf_modules: ['{name}'].")
    return query


def _show(value: Any) -> str:
    return "no tensor" if value is None else str(value)


def attention_graph(module: nn.MultiheadAttention, name: str, pattern: dict) -> fx.GraphModule:
    """A GraphModule with ``nn.MultiheadAttention``'s signature that makes the one call
    ``pattern`` describes, guarded by :func:`check_attention_call`."""
    graph = fx.Graph()
    placeholders = {"query": graph.placeholder("query"), "key": graph.placeholder("key"),
                    "value": graph.placeholder("value")}
    defaults = {p.name: p.default for p in _SIGNATURE.parameters.values() if p.name in _MASKS + _FLAGS}
    for parameter in ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"):
        placeholders[parameter] = graph.placeholder(parameter, default_value=defaults[parameter])
    query = graph.create_node("call_function", check_attention_call, tuple(placeholders.values()) + (name, pattern),
                              name="checked_query")
    key = query if pattern["key_is_query"] else placeholders["key"]
    value = key if pattern["value_is_key"] else placeholders["value"]
    call_kwargs: dict[str, Any] = {flag: pattern[flag] for flag in _FLAGS}
    call_kwargs.update({mask: placeholders[mask] if pattern[mask] is not None else None for mask in _MASKS})
    graph.output(graph.create_node("call_module", "attention", (query, key, value), call_kwargs, name="mha"))
    graph_module = fx.GraphModule({"attention": module}, graph, "MultiheadAttentionCall")
    graph_module.train(module.training)
    graph_module.meta["qatgraph_prefix"] = name
    graph_module.meta[ATTENTION_ROOT] = "attention"
    return graph_module
