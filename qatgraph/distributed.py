"""qatgraph under ``torch.distributed``: which process this is, and the few collectives qatgraph needs.

qatgraph starts no processes of its own: a launcher (``torchrun --nproc-per-node N script.py``)
starts one process per GPU and :func:`setup` (or ``torch.distributed.init_process_group``) joins
them into a process group. While a group of more than one process is initialized, qatgraph's
steps act on all of them together:

* :func:`qatgraph.calibrate` merges the calibration statistics of every rank's shard;
* :func:`qatgraph.finetune` trains through ``DistributedDataParallel`` (:mod:`qatgraph.train.ddp`);
* :func:`qatgraph.sensitivity` splits its per-layer probes across the ranks;
* :func:`qatgraph.export_onnx`, checkpoints and ``SensitivityReport.save`` are written by rank 0
  (atomically) while the other ranks wait for the finished file.

Those calls are *collective*: every rank must make them, in the same order, or the ranks that did
wait for the others (until the process group's timeout). Code that runs on one rank alone (``if
rank == 0: ...``) wraps qatgraph's calls in :func:`this_rank_only`, inside which qatgraph acts as
a single process.

Guarantees: without an initialized group of more than one process, every function here is the
single-process answer (rank 0 of 1, collectives return their input) and touches no
``torch.distributed`` state. Collectives move tensors to the device the group's backend needs
(CUDA for ``nccl``, the CPU otherwise) and back. :func:`gather_failures` and :func:`run_on_main`
keep the ranks in step when one of them fails, so an error on one rank is an error on every rank
rather than a hang.

May import: :mod:`qatgraph.errors` (torch only otherwise): every room may build on this module.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
import pickle
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from qatgraph.errors import DistributedError

log = logging.getLogger(__name__)

T = TypeVar("T")
ReduceOp = Literal["sum", "min", "max"]

_LOCAL_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("qatgraph_this_rank_only", default=False)
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    """Whether qatgraph acts on a process group: one is initialized, it has more than one process,
    and the caller is not inside :func:`this_rank_only`."""
    return (not _LOCAL_ONLY.get() and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def rank() -> int:
    """This process's rank in the group qatgraph acts on (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes qatgraph acts on (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, the process that logs, shows progress bars and writes files."""
    return rank() == 0


@contextlib.contextmanager
def this_rank_only() -> Iterator[None]:
    """Inside this block qatgraph ignores the process group: every call is this process's alone
    (for code that runs on one rank only, e.g. ``if rank == 0: export``)."""
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (or ``model``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


# ------------------------------------------------------------------------------------- joining
def setup(backend: str | None = None, timeout: datetime.timedelta | None = None) -> torch.device:
    """Join the process group a launcher such as ``torchrun`` prepared; returns this rank's device.

    ``backend``: ``nccl`` when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK`` becomes
    the current device), ``gloo`` on CPUs. Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment. Calling it again returns the device.
    """
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing and not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(f"qatgraph.distributed.setup: the environment lacks {', '.join(missing)}, which a "
                               "launcher sets: start the script with `torchrun --nproc-per-node N script.py` (or "
                               "call torch.distributed.init_process_group yourself)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise DistributedError(f"backend 'nccl' needs one CUDA device per process, but local rank {local_rank} "
                                   f"sees {torch.cuda.device_count()} device(s): use backend='gloo' on CPUs or "
                                   "launch at most one process per GPU")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
        log.info("qatgraph: rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(),
                 backend)
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def teardown() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still writes)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- collectives
def collective_device() -> torch.device:
    """Where the group's backend wants tensors: the current CUDA device for ``nccl``, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
    """A copy of ``tensor`` reduced elementwise over the ranks (``sum``, ``min`` or ``max``), on
    ``tensor``'s device and in its dtype. Collective."""
    if not is_distributed():
        return tensor.clone()
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    buffer = tensor.detach().to(collective_device(), copy=True)
    dist.all_reduce(buffer, op=ops[op])
    return buffer.to(tensor.device)


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order. Collective."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s ``value`` (picklable) on every rank. Collective."""
    if not is_distributed():
        return value
    holder = [value if dist.get_rank() == source else None]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def barrier() -> None:
    """Wait until every rank gets here. Collective."""
    if is_distributed():
        dist.barrier()


def gather_failures(error: BaseException | None, what: str) -> None:
    """Agree across ranks on whether a step failed. Collective: call on every rank, with the
    exception the step raised on this rank or ``None``.

    If this rank failed, its own exception is raised again; if only other ranks failed, a
    :class:`DistributedError` naming them and their errors is raised. Every rank therefore leaves
    a failed step together instead of waiting for the others in the next collective."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    summary = None if error is None else "".join(traceback.format_exception_only(type(error), error)).strip()
    failures = [(index, message) for index, message in enumerate(all_gather_objects(summary)) if message is not None]
    if error is not None:
        raise error
    if failures:
        detail = "; ".join(f"rank {index}: {message}" for index, message in failures)
        raise DistributedError(f"{what} failed on another rank ({detail}); this rank stopped with it")


def run_on_main(action: Callable[[], T], what: str) -> T:
    """Run ``action`` on rank 0 only while the other ranks wait; every rank returns its result
    (which must be picklable) or raises its exception. Collective.

    Used for files: rank 0 writes (atomically), and no rank goes on before the file is complete."""
    if not is_distributed():
        return action()
    outcome: tuple[bool, Any] | None = None
    local_error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            outcome = (True, action())
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then raised everywhere
            local_error, outcome = exc, (False, exc)
        outcome = _picklable(outcome, what)
    succeeded, value = broadcast_object(outcome)
    if local_error is not None:
        raise local_error
    if succeeded:
        return value
    raise value


def _picklable(outcome: tuple[bool, Any], what: str) -> tuple[bool, Any]:
    """``outcome`` if it pickles, else a failure the other ranks can receive (rank 0 must never
    fail inside the broadcast: the others would wait for it until the group's timeout)."""
    try:
        pickle.dumps(outcome)
    except Exception as exc:  # noqa: BLE001 - anything that does not pickle
        succeeded, value = outcome
        message = f"{type(value).__name__}: {value}" if not succeeded else f"its result does not pickle ({exc})"
        return False, DistributedError(f"{what} failed on rank 0: {message}")
    return outcome
