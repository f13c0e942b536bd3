"""Work that waits for the first calibration batch: ``qatgraph.calibrate`` runs each registered
hook that wants the model on that batch, before any range is collected.

Compile registers one (qatgraph/pipeline.py): a model it traced only in part without
``example_inputs`` has its untraced code analysed there (one quantizer per tensor, Conv-BN folds,
float weighted ops). This room knows nothing of graphs; the hook is a plain callable.

Under ``torch.distributed`` every rank takes part, and the ranks leave together: a rank without a
batch, a hook that fails on one rank, or hooks whose outcomes differ between ranks (data-dependent
control flow in the untraced code) raise on every rank instead of leaving the ranks with different
models or waiting in the next collective.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from qatgraph.distributed import all_gather_objects, all_reduce, gather_failures, is_distributed
from qatgraph.errors import CalibrationError, QatgraphError

from .batches import batch_failed, call_args, check_fits, model_device, to_device

Wants = Callable[[nn.Module], bool]
Run = Callable[[nn.Module, tuple, dict[str, Any]], Any]  # returns a picklable outcome the ranks must agree on
FIRST_BATCH_HOOKS: list[tuple[Wants, Run]] = []


def register_first_batch_hook(wants: Wants, run: Run) -> None:
    """Have ``calibrate`` call ``run(model, args, kwargs)`` on the first batch when ``wants(model)``."""
    FIRST_BATCH_HOOKS.append((wants, run))


def wanted(model: nn.Module) -> list[Run]:
    return [run for wants, run in FIRST_BATCH_HOOKS if wants(model)]


def run_first_batch_hooks(model: nn.Module, hooks: list[Run], batches: Iterable[Any],
                          input_fn: Callable[[Any], Any] | None) -> Iterator[Any]:
    """Run ``hooks`` on the first batch; returns the batches, that one still first. Collective."""
    stream = iter(batches)
    first = next(stream, _NONE)
    has = 0.0 if first is _NONE else 1.0
    negated_fewest, most = all_reduce(torch.tensor([-has, has], dtype=torch.float64), "max").tolist()
    if -negated_fewest == 0 and most == 1:  # some ranks have a batch, some none
        raise CalibrationError("qatgraph.calibrate: a rank got no calibration batch, but this model analyses its "
                               "untraced code on the first batch and every rank must do the same: give every rank "
                               "at least one batch, or pass example_inputs to qatgraph.compile")
    if first is _NONE:
        return iter(())
    failure, outcome = None, None
    try:
        batch = to_device(input_fn(first) if input_fn is not None else first, model_device(model))
        check_fits(model, batch, 1, input_fn is not None)
        args, kwargs = call_args(batch)
        try:
            outcome = [run(model, args, kwargs) for run in hooks]
        except QatgraphError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise batch_failed(batch, 1, exc) from exc
    except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it
        failure = exc
    gather_failures(failure, "the analysis of untraced code on the first calibration batch")
    if is_distributed() and any(other != outcome for other in all_gather_objects(outcome)):
        raise CalibrationError("qatgraph.calibrate: the ranks' first batches took different paths through the "
                               "model's untraced code (different quantizers shared, BatchNorms folded or weighted "
                               "ops found), so the ranks' models would differ: pass example_inputs to "
                               "qatgraph.compile, which analyses that code once on the same inputs everywhere")
    return itertools.chain([first], stream)


_NONE = object()
