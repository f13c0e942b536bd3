"""``nn.MultiheadAttention`` called from untraced code, made a traced region of its own.

torch.fx keeps ``nn.MultiheadAttention`` as one call (it lives in ``torch.nn``); in a traced graph
``passes/mha.py`` rewrites that call into its projections and attention GEMMs, which get Q/DQ. When
partial tracing leaves the *caller* untraced, there is no graph around the call. With example
inputs, compile records how the untraced code calls each attention module
(:func:`record_attention_calls`: which masks it passes, ``need_weights``,
``average_attn_weights``, ``is_causal``, whether query, key and value are one tensor) and, for a
module always called the same way, builds a one-call graph (:func:`attention_graph`) that replaces
the module; without example inputs it stays one float module. The mha pass then rewrites the
graph like any other, with the module's own parameters hoisted to the graph's root, so the
``state_dict`` keys stay those of the float model. The graph keeps the module's plain attributes
(``embed_dim``, ``num_heads``, ``batch_first``, ...) for the untraced code that reads them.

The example runs in eval and in training mode (a call may depend on ``self.training``); BatchNorm
statistics and the random stream are put back after the training-mode run. The graph
computes that one way of calling. A later call it would compute wrongly (another flag, a mask that
was not there, or a separate key where the example passed the query again) raises
a :class:`~qatgraph.errors.UsageError` naming the module, what changed and the fix, rather than
computing something else. Modules called in several ways, never called on the example, with
``add_bias_kv``/``add_zero_attn``, or named in ``tracing.leaf_modules`` stay one float module, with a
float row in the summary (:mod:`.eager_ops`). A module two parents hold becomes one graph that both
hold.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from qatgraph.errors import UsageError

from .eager_ops import float_run

ATTENTION_ROOT = "qatgraph_attention_root"  # GraphModule.meta: the call_module target mha hoists to the root
SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_FLAGS = ("need_weights", "average_attn_weights", "is_causal")
_MASKS = ("key_padding_mask", "attn_mask")
_CONFLICT = "called in several ways"


def module_problem(module: nn.MultiheadAttention) -> str | None:
    """Why no call of ``module`` can be rewritten into its GEMMs (passes/mha.py), or None."""
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True"
    if module.add_zero_attn:
        return "add_zero_attn=True"
    return None


def call_problem(is_causal: bool, has_attn_mask: bool) -> str | None:
    """Why a call with these (constant) arguments cannot be rewritten, or None."""
    if is_causal and not has_attn_mask:
        return "is_causal=True without attn_mask, which MultiheadAttention rejects"
    return None


def record_attention_calls(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Qualified name -> the call pattern of every ``nn.MultiheadAttention`` the example run
    calls, in eval and in training mode (:data:`_CONFLICT` when the calls differ)."""
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return {}
    calls: dict[str, Any] = {}
    try:
        with float_run(model):
            _run_recording(model, args, kwargs, calls)
        with _training_run(model):
            _run_recording(model, args, kwargs, calls)
    except Exception:  # noqa: BLE001 - compile's own example run reports a failing input, in words
        return {}
    return calls


@contextmanager
def _training_run(model: nn.Module):  # noqa: ANN202 - a context manager
    """Training mode, no grad; each module's mode, the buffers (BatchNorm statistics) and the
    random stream (dropout) as they were afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _run_recording(model: nn.Module, args: tuple, kwargs: dict[str, Any] | None, calls: dict[str, Any]) -> None:
    def record(name: str, module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
        bound = SIGNATURE.bind(module, *call_args, **call_kwargs)
        bound.apply_defaults()
        values = bound.arguments
        pattern = _pattern(*(values[k] for k in ("query", "key", "value", "key_padding_mask", "need_weights",
                                                "attn_mask", "average_attn_weights", "is_causal")))
        calls[name] = pattern if calls.get(name, pattern) == pattern else _CONFLICT

    hooks = [module.register_forward_pre_hook(lambda m, a, k, _name=name: record(_name, m, a, k), with_kwargs=True)
             for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]
    try:
        model(*args, **(kwargs or {}))
    finally:
        for hook in hooks:
            hook.remove()


def _pattern(query: Any, key: Any, value: Any, key_padding_mask: Any, need_weights: Any, attn_mask: Any,
             average_attn_weights: Any, is_causal: Any) -> dict[str, Any]:
    """What the graph of one call depends on: the flags, the masks given (their dtype, for the
    message) and which of query, key and value are the same tensor."""
    return {"need_weights": bool(need_weights), "average_attn_weights": bool(average_attn_weights),
            "is_causal": bool(is_causal),
            "key_padding_mask": None if key_padding_mask is None else str(key_padding_mask.dtype),
            "attn_mask": None if attn_mask is None else str(attn_mask.dtype),
            "key_is_query": key is query, "value_is_key": value is key}


def convertible(module: nn.MultiheadAttention, pattern: Any) -> bool:
    return isinstance(pattern, dict) and module_problem(module) is None and \
        call_problem(pattern["is_causal"], pattern["attn_mask"] is not None) is None


def _differs(expected: Any, actual: Any, field: str) -> bool:
    if field in _MASKS:  # the graph takes any mask dtype (mha_attention_bias): only presence matters
        return (expected is None) != (actual is None)
    if field in ("key_is_query", "value_is_key"):  # the graph reuses the query only where the example did
        return bool(expected) and not actual
    return expected != actual


def check_attention_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Any,
                         need_weights: Any, attn_mask: Any, average_attn_weights: Any, is_causal: Any,
                         name: str, expected: dict) -> torch.Tensor:
    """``query``, after checking that the graph computes this call."""
    actual = _pattern(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
    differs = [field for field in expected if _differs(expected[field], actual[field], field)]
    if differs:
        changes = ", ".join(f"{k}: {_show(expected[k])} then, {_show(actual[k])} now" for k in differs)
        raise UsageError(f"{name} (nn.MultiheadAttention, called from untraced code) was compiled for the call the "
                         f"example inputs made, and is now called differently ({changes}): its quantized graph "
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
    defaults = {p.name: p.default for p in SIGNATURE.parameters.values() if p.name in _MASKS + _FLAGS}
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
    graph_module.meta["qatgraph_prefix"] = name
    graph_module.meta[ATTENTION_ROOT] = "attention"
    graph_module.train(module.training)
    kept = {attribute: getattr(module, attribute) for attribute in _ATTRIBUTES}  # what untraced code may read
    for attribute, value in kept.items():
        setattr(graph_module, attribute, value)
    graph_module.meta[_PRESERVED] = kept  # GraphModule.__deepcopy__ sets these again on the copy
    return graph_module


_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
_ATTRIBUTES = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "head_dim", "dropout", "batch_first",
               "add_zero_attn")
