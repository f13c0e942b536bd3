"""What a calibration batch is, and running a model on one with errors that name the batch.

A batch is a tensor (forward's one argument), a tuple/list of forward's arguments, or a dict of
keyword arguments. :func:`run_checked` refuses, in one paragraph each, a batch that does not bind
to ``forward`` (e.g. ``(inputs, labels)`` pairs without ``input_fn``) and a batch the model fails
on (wrong shape), naming the batch and what it held.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from qatgraph.errors import CalibrationError, QatgraphError, plural


def call_args(batch: Any) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of ``model(...)`` for one batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict):
        return (), batch
    raise CalibrationError(f"a calibration batch must be a tensor, a tuple/list of tensors or a dict of keyword "
                           f"arguments, not {type(batch).__name__}; use input_fn= to extract the inputs")


def run_batch(model: nn.Module, batch: Any, device: torch.device | None) -> Any:
    """Call ``model`` on one batch: a tensor, a tuple/list of forward's arguments, or a dict of kwargs."""
    args, kwargs = call_args(to_device(batch, device))
    return model(*args, **kwargs)


def to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def model_device(model: nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)


def run_checked(model: nn.Module, batch: Any, device: torch.device | None, index: int, mapped: bool) -> Any:
    """:func:`run_batch` with a one-paragraph error naming the batch when it does not fit the model."""
    check_fits(model, batch, index, mapped)
    try:
        return run_batch(model, batch, device)
    except QatgraphError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise batch_failed(batch, index, exc) from exc


def check_fits(model: nn.Module, batch: Any, index: int, mapped: bool) -> None:
    """Refuse batch ``index`` when it does not bind to ``forward`` (``mapped``: ``input_fn`` made it)."""
    mismatch = _forward_accepts(model, batch)
    if mismatch is not None:
        hint = " If the batches are (inputs, labels) pairs, pass input_fn=lambda batch: batch[0]." \
            if isinstance(batch, (tuple, list)) and not mapped else " Map each item to forward's arguments with input_fn."
        raise CalibrationError(f"calibration batch {index} is {describe_batch(batch)}, but {mismatch}.{hint}")


def batch_failed(batch: Any, index: int, exc: Exception) -> CalibrationError:
    """The error for batch ``index`` on which running the model raised ``exc``."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CalibrationError(f"running the model on calibration batch {index} ({describe_batch(batch)}) failed: "
                            f"{type(exc).__name__}: {first_line}. Check that the batches have the shape and dtype "
                            "the model was compiled for (its example_inputs).")


def describe_batch(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        parts = [f"shape {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__ for b in batch]
        return f"a {type(batch).__name__} of {plural(len(batch), 'item')} ({', '.join(parts)})"
    if isinstance(batch, dict):
        return f"a dict with keys {', '.join(map(str, batch))}"
    return f"a {type(batch).__name__}"


def _forward_accepts(model: nn.Module, batch: Any) -> str | None:
    """Why ``model(batch)`` cannot bind to forward's parameters, or None when it can (or cannot be told)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    try:
        if isinstance(batch, dict):
            signature.bind(**batch)
        elif isinstance(batch, (tuple, list)):
            signature.bind(*batch)
        else:
            signature.bind(batch)
    except TypeError as exc:
        return f"forward{signature} does not take it ({exc})"
    return None
