"""Sharing the sensitivity probes among the ranks of a ``torch.distributed`` group.

Expects every rank to hold the same model and the same samples (checked by
:func:`check_same_everywhere`: the layers are split across ranks, not the data). Guarantees:
:func:`shared_results` gives every rank every result, each computed once, on one rank, exactly as
one process would compute it (same model, same data, same arithmetic; with the same thread
count), so the report is the one a single process writes, while each rank runs ``1 / ranks`` of
the probes. Probes go out round robin, one per rank per round, and each round's results are
gathered before the next, so rank 0's result log (the resumable cache) records every finished
probe as it goes and its progress bar counts them.
A failure on any rank stops every rank (see :func:`qatgraph.distributed.gather_failures`).
Without a process group these are the plain single-process loops.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from torch import nn

from qatgraph.distributed import all_gather_objects, gather_failures, is_distributed, rank, world_size
from qatgraph.errors import DistributedError
from qatgraph.progress import progress

from .data import ResultLog, _map_tensors, _tensor_bytes

T = TypeVar("T")


def shared_results(log: ResultLog, kind: str, keys: list[str], compute: Callable[[str], Any], *,
                   description: str, show_progress: bool) -> dict[str, Any]:
    """``{key: value}`` for every key: the logged value, else ``compute(key)`` on one of the ranks
    (logged as it arrives). Collective under a process group."""
    if not is_distributed():
        return {key: log.get_or_compute(kind, key, lambda key=key: compute(key))
                for key in progress(keys, total=len(keys), desc=description, unit="layer", enabled=show_progress)}
    found = {key: log.lookup(kind, key) for key in keys}
    pending = [key for key in keys if not found[key][0]]
    for round_keys, values in _rounds(pending, compute, description, show_progress):
        for key, value in zip(round_keys, values):
            log.add(kind, key, value)
    return {key: value if hit else log.records[f"{kind}:{key}"] for key, (hit, value) in found.items()}


def shared_map(items: list[T], compute: Callable[[T], Any], *, what: str) -> list[Any]:
    """``[compute(item) for item in items]``, the items shared among the ranks (every rank gets the
    whole list, in order). Collective under a process group."""
    if not is_distributed():
        return [compute(item) for item in items]
    return [value for _, values in _rounds(items, compute, what, show_progress=False) for value in values]


def _rounds(items: list[Any], compute: Callable[[Any], Any], what: str,
            show_progress: bool) -> Iterable[tuple[list[Any], list[Any]]]:
    """(the round's items, their values): each rank computes the item of its rank, then all gather."""
    ranks = world_size()
    rounds = [items[start:start + ranks] for start in range(0, len(items), ranks)]
    for round_items in progress(rounds, total=len(rounds), desc=f"{what} ({ranks} ranks)", unit="round",
                                enabled=show_progress):
        value, failure = None, None
        if rank() < len(round_items):
            try:
                value = compute(round_items[rank()])
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it before the next collective
                failure = exc
        gather_failures(failure, what)
        yield round_items, all_gather_objects(value)[:len(round_items)]


def check_same_everywhere(model: nn.Module, batches: list[Any]) -> None:
    """Every rank must analyse the same model on the same samples. Collective under a process group."""
    if not is_distributed():
        return
    digests = all_gather_objects((_digest(model.state_dict().values()), _digest(batches)))
    for index, (model_digest, data_digest) in enumerate(digests):
        if data_digest != digests[0][1]:
            raise DistributedError(
                f"sensitivity: rank {index}'s samples differ from rank 0's. Every rank must pass the same samples "
                "(the layers are split among the ranks, not the data): give sensitivity the same batches on every "
                "rank, not a DistributedSampler shard")
        if model_digest != digests[0][0]:
            raise DistributedError(f"sensitivity: rank {index}'s model (weights, scales or buffers) differs from rank "
                                   "0's: calibrate with qatgraph.calibrate on every rank (it merges the ranks' "
                                   "statistics) and train with DDP before analysing")


def _digest(values: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for value in values:
        _map_tensors(value, lambda t: digest.update(f"{t.dtype}|{tuple(t.shape)}".encode()) or
                     digest.update(_tensor_bytes(t)) or t)
    return digest.hexdigest()


__all__ = ["check_same_everywhere", "shared_map", "shared_results"]
