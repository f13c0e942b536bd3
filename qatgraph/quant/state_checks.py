"""Whole-model checks before a ``load_state_dict`` into a compiled model copies anything.

``qatgraph.compile`` calls :func:`install_state_checks` on the model it returns. Its load
pre-hook runs before torch copies a single tensor and refuses, with
:class:`~qatgraph.errors.StateMismatchError`:

* every quantizer whose saved format differs from this model's (all of them listed at once;
  see :mod:`qatgraph.quant.state_format`), whatever ``strict`` says;
* with ``strict=True`` (torch's default), a state whose quantizers cover other layers than this
  model's (a different skip list, override or preset) or whose weights differ, explained in
  qatgraph's words instead of torch's "Missing key(s) in state_dict".

``strict=False`` keeps torch's behaviour for missing and unexpected keys.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

from torch import nn

from qatgraph.errors import StateMismatchError, listing

from .quantizer import FakeQuantizer
from .state_format import EXTRA_STATE, QuantizerFormat, format_of, mismatch_message, refusal

_QUANTIZER_KEYS = {"scale", "zero_point", "enabled", "calibrated"}


def install_state_checks(model: nn.Module) -> None:
    """Check every later ``model.load_state_dict`` as a whole before anything is copied (idempotent)."""
    if getattr(model, "_qatgraph_state_checks", False):
        return
    model._register_load_state_dict_pre_hook(_check_state, with_module=True)
    model._qatgraph_state_checks = True


def _check_state(model: nn.Module, state_dict: dict, prefix: str, _metadata: Any, _strict: bool,
                 _missing: list, _unexpected: list, _errors: list) -> None:
    quantizers = {prefix + name: q for name, q in model.named_modules() if isinstance(q, FakeQuantizer)}
    mismatches = []
    for owner, quantizer in quantizers.items():
        stored = QuantizerFormat.from_state(state_dict.get(f"{owner}.{EXTRA_STATE}"))
        if stored is not None and stored != format_of(quantizer):
            mismatches.append(mismatch_message(quantizer.name or owner, stored, format_of(quantizer)))
    if mismatches:
        raise refusal(mismatches)
    if _strict_of_this_load():
        _check_keys(model, state_dict, prefix, set(quantizers))


def _strict_of_this_load() -> bool:
    """The ``strict`` argument of the ``load_state_dict`` call running now. torch hands every
    module's ``_load_from_state_dict`` (and its pre-hooks) ``strict=True`` and applies the real value
    only after copying, so it is read from the caller's frame; if that frame cannot be found, the
    keys are left to torch's own check."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is nn.Module.load_state_dict.__code__:
            return bool(frame.f_locals.get("strict", True))
        frame = frame.f_back
    return False


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def _check_keys(model: nn.Module, state_dict: dict, prefix: str, model_quantizers: set[str]) -> None:
    expected = {k for k in model.state_dict(prefix=prefix) if not k.endswith("." + EXTRA_STATE)}
    given = {k for k in state_dict if k.startswith(prefix) and not k.endswith("." + EXTRA_STATE)}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if not missing and not unexpected:
        return
    keys_by_owner: dict[str, set[str]] = defaultdict(set)
    for key in given:
        keys_by_owner[_owner(key)].add(key.rpartition(".")[2])
    state_quantizers = {owner for owner, names in keys_by_owner.items() if _QUANTIZER_KEYS <= names}
    extra_quantizers = sorted({_owner(k) for k in unexpected if _owner(k) in state_quantizers})
    absent_quantizers = sorted({_owner(k) for k in missing if _owner(k) in model_quantizers})
    other_missing = [k for k in missing if _owner(k) not in model_quantizers]
    other_unexpected = [k for k in unexpected if _owner(k) not in state_quantizers]
    raise StateMismatchError(_explain(extra_quantizers, absent_quantizers, other_missing, other_unexpected))


def _explain(extra_quantizers: list[str], absent_quantizers: list[str], other_missing: list[str],
             other_unexpected: list[str]) -> str:
    parts = []
    if extra_quantizers:
        parts.append(f"the state has {len(extra_quantizers)} quantizer(s) this model does not "
                     f"({listing(extra_quantizers, 6)}): its model quantized layers that this one keeps in floating point")
    if absent_quantizers:
        parts.append(f"this model has {len(absent_quantizers)} quantizer(s) the state lacks "
                     f"({listing(absent_quantizers, 6)}): it quantizes layers that the state's model kept in floating "
                     "point")
    if other_missing or other_unexpected:
        weights = f"{len(other_missing)} weight/buffer key(s) of this model are not in the state"
        weights += f" ({listing(other_missing, 4)})" if other_missing else ""
        weights += f" and {len(other_unexpected)} key(s) of the state are not in this model"
        weights += f" ({listing(other_unexpected, 4)})" if other_unexpected else ""
        if any("running_" in k for k in other_missing + other_unexpected):
            weights += (" (BatchNorm keys: one model was compiled with bn: fold, the other with bn: train? Or, with "
                        "bn: fold, one folded the BatchNorms of its untraced code and this one has not yet: compile "
                        "it with example_inputs, or calibrate it, before loading)")
        parts.append(weights)
    return ("this state does not fit the model: " + "; ".join(parts) + ". Nothing was loaded. The two were compiled "
            "with different policies (preset, skip list, overrides, bn) or from different models: compile this model "
            "with the policy the state was saved with (qatgraph.summary lists what each quantizes), or pass "
            "strict=False to load the keys both have (quantizers left without a state then need qatgraph.calibrate).")
