"""A quantizer's saved state carries its format, and loading refuses a state it cannot hold.

A :class:`~qatgraph.quant.quantizer.FakeQuantizer`'s scale and zero point mean something only
together with its format: a 4-bit scale is amax / 7, an 8-bit one amax / 127; an asymmetric zero
point of 131 is meaningless in a signed symmetric quantizer (and wraps to -125 in an int8 ONNX
zero point); per-channel scales belong to one axis. :class:`QuantizerFormat` is that format as
plain values; the quantizer saves it as its extra state (``<name>._extra_state`` in
``state_dict()``: a small int64 tensor, so a state_dict stays tensors only).

On ``load_state_dict`` the stored format is compared with the receiving quantizer's and a
difference raises :class:`~qatgraph.errors.StateMismatchError` naming the quantizer and both
formats (:func:`check_stored_format`), whatever ``strict`` says: a scale in another format is
never right. States saved before formats were stored (no ``_extra_state`` key) load as before:
their scales are taken to be in the receiving quantizer's format (:func:`fill_missing_format`).

May import what :mod:`qatgraph.quant` may; it does not import the quantizer module (which uses it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qatgraph.errors import StateMismatchError

FORMAT_TAG = 0x51_46_31  # "QF1": version 1 of the layout below
EXTRA_STATE = "_extra_state"  # torch's key suffix for a module's extra state


@dataclass(frozen=True)
class QuantizerFormat:
    """What a quantizer's scale and zero point mean: the integer grid and how it is laid out."""

    bits: int
    signed: bool
    symmetric: bool
    axis: int | None
    channels: int | None

    def to_state(self) -> torch.Tensor:
        """Six int64 values: a tag, bits, signed, symmetric, axis (-1: per tensor), channels (0: per tensor).
        A tensor, so that a state_dict stays tensors only (safetensors, ``.to()``, ``.shape`` all work)."""
        return torch.tensor([FORMAT_TAG, self.bits, int(self.signed), int(self.symmetric),
                             -1 if self.axis is None else self.axis, self.channels or 0], dtype=torch.int64)

    @classmethod
    def from_state(cls, state: Any) -> QuantizerFormat | None:
        """The format in a saved extra state, or None when the state is not one of ours."""
        if not isinstance(state, torch.Tensor) or state.shape != (6,) or int(state[0]) != FORMAT_TAG:
            return None
        _, bits, signed, symmetric, axis, channels = (int(v) for v in state.tolist())
        return cls(bits, bool(signed), bool(symmetric), None if axis < 0 else axis, channels or None)

    def describe(self) -> str:
        """E.g. ``INT8 symmetric per-channel (axis 0, 64 channels)``, ``UINT8 asymmetric per-tensor``."""
        kind = "INT" if self.signed else "UINT"
        layout = "per-tensor" if self.axis is None else f"per-channel (axis {self.axis}, {self.channels} channels)"
        return f"{kind}{self.bits} {'symmetric' if self.symmetric else 'asymmetric'} {layout}"

    def differences(self, other: QuantizerFormat) -> list[str]:
        """Names of the fields that differ (bits, signedness, symmetry, axis, channels)."""
        names = {"bits": "bits", "signed": "signedness", "symmetric": "symmetry", "axis": "axis",
                 "channels": "per-channel size"}
        return [label for field_name, label in names.items() if getattr(self, field_name) != getattr(other, field_name)]


def format_of(quantizer: Any) -> QuantizerFormat:
    """The format of a FakeQuantizer (read from its spec, axis and scale shape)."""
    spec = quantizer.spec
    axis = quantizer.axis
    channels = int(quantizer.scale.shape[0]) if axis is not None and quantizer.scale.dim() else None
    return QuantizerFormat(int(spec.bits), quantizer.qmin < 0, bool(spec.symmetric), axis, channels)


def mismatch_message(name: str, stored: QuantizerFormat, own: QuantizerFormat) -> str:
    return (f"quantizer {name!r}: the state holds {stored.describe()} values, this model's quantizer is "
            f"{own.describe()} ({', '.join(stored.differences(own))} differ)")


def refusal(mismatches: list[str]) -> StateMismatchError:
    """The error for one or more quantizer format mismatches (nothing has been loaded yet)."""
    shown = "\n  ".join(mismatches[:8]) + (f"\n  ... and {len(mismatches) - 8} more" if len(mismatches) > 8 else "")
    return StateMismatchError(
        f"cannot load this state: {len(mismatches)} quantizer(s) were saved in another format, and their scales "
        f"and zero points mean something else in this model:\n  {shown}\nNothing was loaded. The state comes from "
        "a model compiled with another policy (bits, symmetric, granularity or preset). Compile with the policy "
        "the state was saved with, or load only the float weights (e.g. a state without the '*quantizer*' keys, "
        "strict=False) and run qatgraph.calibrate to compute scales in this model's format.")


def check_stored_format(quantizer: Any, state: Any) -> None:
    """Raise :class:`StateMismatchError` when ``state`` (a saved extra state) is another format."""
    stored = QuantizerFormat.from_state(state)
    own = format_of(quantizer)
    if stored is not None and stored != own:
        raise refusal([mismatch_message(quantizer.name or type(quantizer).__name__, stored, own)])


def fill_missing_format(quantizer: Any, state_dict: dict, prefix: str, *_args: Any) -> None:
    """Load pre-hook: a state saved before formats were stored has no ``_extra_state`` key; take it
    to be in the receiving quantizer's format, so that ``strict`` loading of old checkpoints works.
    Also checks a stored format before this quantizer's tensors are copied."""
    key = prefix + EXTRA_STATE
    if key not in state_dict:
        state_dict[key] = format_of(quantizer).to_state()
    else:
        check_stored_format(quantizer, state_dict[key])
