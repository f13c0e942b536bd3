"""Fine-tuning across processes: ``DistributedDataParallel``, data sharding, rank-0 output, reduced metrics.

:func:`qatgraph.finetune` asks :func:`prepare` how one run spreads over a ``torch.distributed``
group and gets a :class:`TrainingProcesses`; without a group of more than one process it is the
single-process run and nothing here does any communication.

Under a group:

* the model trains through ``DistributedDataParallel`` (:func:`wrap_ddp`): gradients of every
  trainable parameter are averaged across ranks, the learnable quantizer scales (the recipe's
  second parameter group) included, so every rank's optimizers take the same step;
* a plain ``DataLoader`` (random or sequential sampler) is rebuilt on a ``DistributedSampler``
  (each rank a disjoint shard, reshuffled every epoch through ``set_epoch``); every rank must then
  have the same number of steps per epoch, which is checked before training;
* the epoch's training loss is the mean over all ranks' samples and the validation metric the
  mean of the ranks' values, identical on every rank; the progress bar shows on rank 0 only;
* checkpoints are written by rank 0, atomically, while the other ranks wait.

DDP and qatgraph's frozen parameters: a parameter that goes without a gradient in a step (a
learnable scale frozen late in the recipe or on a disabled quantizer, an EfQAT layer left with no
trainable row at a refresh) never reports it, and plain DDP then fails ("Expected to have
finished reduction") or waits; a parameter that does not need a gradient when DDP is built is
never synchronized, even once it trains. :func:`wrap_ddp` therefore registers every parameter
that may train at some point and turns on ``find_unused_parameters`` when one may skip a step.
Partly frozen layers need neither: their masked ops give a full-size weight gradient (zero on
the frozen rows, so the average over ranks is zero there too). EfQAT's state buffers, identical
on every rank, are left out of DDP's per-step buffer broadcast.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from qatgraph.atomic_files import torch_save
from qatgraph.distributed import (
    all_gather_objects,
    all_reduce,
    is_distributed,
    is_main_process,
    rank,
    run_on_main,
    unwrap,
    world_size,
)
from qatgraph.errors import DistributedError
from qatgraph.quant.quantizer import FakeQuantizer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "qatgraph-finetune/1"


@dataclass
class TrainingProcesses:
    """How one fine-tuning run spreads over the process group (one process when not distributed)."""

    model: nn.Module       # what the training step calls: the DDP wrapper, or the compiled model
    compiled: nn.Module    # the compiled model: optimizers, freezing, evaluation and checkpoints use it
    loader: Iterable[Any]  # the training batches of this rank

    @property
    def distributed(self) -> bool:
        return is_distributed()

    def start_epoch(self, epoch: int) -> None:
        """Give distributed samplers the epoch, so every epoch shuffles anew (the same way on every rank)."""
        for sampler in _samplers(self.loader):
            sampler.set_epoch(epoch)

    def mean_loss(self, loss_sum: float, samples: int) -> float:
        """The epoch's mean training loss over every rank's samples."""
        total = all_reduce(torch.tensor([loss_sum, float(samples)], dtype=torch.float64), "sum")
        return float(total[0] / max(float(total[1]), 1.0))

    def mean_metric(self, value: float) -> float:
        """The ranks' metric values averaged (each rank evaluates its own ``val_loader``)."""
        return float(all_reduce(torch.tensor([float(value)], dtype=torch.float64), "sum")[0]) / world_size()

    def check_efqat_agreement(self) -> None:
        """EfQAT must refresh at the same steps and choose the same rows on every rank; a mismatch
        (ranks fed batches of different sizes) would silently train different models."""
        controller = getattr(self.compiled, "qatgraph_freeze", None)
        if controller is None or not self.distributed:
            return
        state = (controller.refreshes, controller.samples_since_refresh,
                 tuple(_frozen_rows_digest(layer.frozen_rows) for layer in controller.layers))
        states = all_gather_objects(state)
        if any(other != states[0] for other in states):
            counts = ", ".join(f"rank {index}: {s[0]} refreshes, {s[1]} samples since" for index, s in enumerate(states))
            raise DistributedError(f"EfQAT state differs between ranks ({counts}): every rank must see batches of the "
                                   "same size at every step (DistributedSampler shards do) so that all refresh at the "
                                   "same step")

    def save_checkpoint(self, path: str | os.PathLike, epoch: int, history: list[dict[str, float]]) -> None:
        """``{"format", "epoch", "state_dict", "history"}`` to ``path``: rank 0 writes atomically, all wait."""
        def write() -> None:
            torch_save({"format": CHECKPOINT_FORMAT, "epoch": epoch, "state_dict": self.compiled.state_dict(),
                        "history": history}, path)

        run_on_main(write, f"saving the fine-tune checkpoint {os.fspath(path)!r}")


def prepare(qmodel: nn.Module, train_loader: Iterable[Any], ddp: bool | None) -> TrainingProcesses:
    """Wrap the model and shard the data as the process group requires (see the module docstring).

    ``ddp``: ``None`` wraps in DDP when qatgraph runs distributed, ``True`` always (a process
    group must be initialized), ``False`` never (the caller synchronizes gradients itself)."""
    if ddp and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise DistributedError("finetune(ddp=True) needs an initialized torch.distributed process group: launch with "
                               "torchrun and call qatgraph.distributed.setup() (or init_process_group) first")
    compiled = unwrap(qmodel)
    model = qmodel
    if isinstance(qmodel, nn.parallel.DistributedDataParallel):
        _check_user_ddp(qmodel)
    elif ddp or (ddp is None and is_distributed()):
        model = wrap_ddp(compiled)
    loader = _distributed_loader(train_loader) if is_distributed() else train_loader
    return TrainingProcesses(model=model, compiled=compiled, loader=loader)


def check_equal_steps(steps_per_epoch: int) -> None:
    """Every rank must take the same number of optimizer steps, or DDP's all-reduce waits forever."""
    steps = all_gather_objects(steps_per_epoch)
    if len(set(steps)) > 1:
        listing = ", ".join(f"rank {index}: {count}" for index, count in enumerate(steps))
        raise DistributedError(f"finetune: the ranks have different numbers of batches per epoch ({listing}); DDP "
                               "needs the same number of steps on every rank: shard the data with DistributedSampler "
                               "(a plain DataLoader is sharded automatically) or give every rank equal shards")


def wrap_ddp(qmodel: nn.Module, *, find_unused_parameters: bool | None = None,
             **ddp_options: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` around a compiled model, ready for qatgraph's freezing.

    Registers every parameter EfQAT or the recipe may train (frozen ones included, for the moment
    of wrapping) and, with ``find_unused_parameters=None``, turns that option on only when a
    registered parameter can go without a gradient in a step (learnable scales, EfQAT),
    since DDP would otherwise fail or wait for it. For a hand-written loop as for
    :func:`qatgraph.finetune`. CUDA models
    get ``device_ids=[their device]``; under ``nccl`` the model must be on this rank's GPU.
    ``ddp_options`` go to ``DistributedDataParallel`` as they are."""
    if isinstance(qmodel, nn.parallel.DistributedDataParallel):
        return qmodel
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise DistributedError("wrap_ddp needs an initialized torch.distributed process group: launch with torchrun "
                               "and call qatgraph.distributed.setup() (or init_process_group) first")
    device = next((p.device for p in qmodel.parameters()), torch.device("cpu"))
    if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        raise DistributedError(f"the process group uses nccl, which needs the model on this rank's GPU, but it is on "
                               f"{device}: move it with model.to(qatgraph.distributed.setup()) or use the gloo backend")
    if device.type == "cuda":
        ddp_options.setdefault("device_ids", [device.index if device.index is not None else torch.cuda.current_device()])
    if find_unused_parameters is None:
        find_unused_parameters = _may_skip_gradients(qmodel)
    _skip_efqat_state_in_buffer_broadcast(qmodel)
    with _every_trainable_parameter_registered(qmodel):
        wrapped = nn.parallel.DistributedDataParallel(qmodel, find_unused_parameters=find_unused_parameters,
                                                      **ddp_options)
    if is_main_process():
        log.info("qatgraph: training on %d ranks with DistributedDataParallel (find_unused_parameters=%s)",
                 world_size(), find_unused_parameters)
    return wrapped


# ------------------------------------------------------------------------------------- freezing
def _frozen_rows_digest(rows: torch.Tensor | None) -> tuple[int, int] | None:
    return None if rows is None else (int(rows.numel()), int(rows.sum()))


def _trainable_scales(model: nn.Module) -> list[nn.Parameter]:
    """Learnable scales whose range is not frozen: they train, or stop training when the recipe
    freezes ranges, or never get a gradient while their quantizer is disabled (a skipped layer)."""
    return [m.scale for m in model.modules()
            if isinstance(m, FakeQuantizer) and isinstance(m.scale, nn.Parameter) and not m.range_frozen]


def _efqat_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights the model's EfQAT controller (``model.qatgraph_freeze``) may freeze or unfreeze."""
    controller = getattr(model, "qatgraph_freeze", None)
    return [layer.weight for layer in getattr(controller, "layers", [])]


def _may_skip_gradients(model: nn.Module) -> bool:
    """Whether a parameter DDP registers can go without a gradient in some step."""
    # EfQAT (every mode) gives a layer left with no trainable row no weight gradient at all
    return getattr(model, "qatgraph_freeze", None) is not None or bool(_trainable_scales(model))


@contextlib.contextmanager
def _every_trainable_parameter_registered(model: nn.Module) -> Iterator[None]:
    """DDP syncs only parameters that need a gradient when it is built: for that moment, every weight
    EfQAT manages and every learnable scale whose range is not frozen needs one."""
    switched = [p for p in _efqat_weights(model) + _trainable_scales(model) if not p.requires_grad]
    for parameter in switched:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in switched:
            parameter.requires_grad_(False)


def _skip_efqat_state_in_buffer_broadcast(model: nn.Module) -> None:
    """DDP broadcasts every buffer from rank 0 before each forward. EfQAT's state buffers (the row
    selection and the snapshot of the frozen rows, most of the weights at small ratios) are the same
    on every rank by construction (checked after every finetune epoch): broadcasting them each step
    would cost about as much traffic as the gradients, so DDP is told to leave them out."""
    controller = getattr(model, "qatgraph_freeze", None)
    names = {name for layer in getattr(controller, "layers", []) for name in layer.buffer_names}
    if names:
        names |= set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))


def _check_user_ddp(model: nn.parallel.DistributedDataParallel) -> None:
    if _may_skip_gradients(model.module) and not model.find_unused_parameters:
        raise DistributedError(
            "finetune: some parameters of this model can go without a gradient in a step (learnable quantizer scales: "
            "frozen late by the recipe, or on a disabled quantizer; EfQAT layers left with no trainable row), and "
            "DistributedDataParallel(find_unused_parameters=False) then fails or waits for them: pass the compiled "
            "model unwrapped (finetune wraps it) or wrap it with qatgraph.wrap_ddp(model)")


# ------------------------------------------------------------------------------------- data
def _samplers(loader: Iterable[Any]) -> list[Any]:
    candidates = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                  getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    found, seen = [], set()
    for candidate in candidates:
        if candidate is not None and callable(getattr(candidate, "set_epoch", None)) and id(candidate) not in seen:
            seen.add(id(candidate))
            found.append(candidate)
    return found


def _distributed_loader(loader: Iterable[Any]) -> Iterable[Any]:
    """A plain DataLoader over a map-style dataset on a DistributedSampler; anything else as it is."""
    if type(loader) is not DataLoader or type(loader.sampler) not in (RandomSampler, SequentialSampler) or \
            loader.batch_size is None:
        return loader
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle)
    if is_main_process():
        log.info("qatgraph finetune: the DataLoader now reads a DistributedSampler shard (%d of %d samples per rank, "
                 "shuffle=%s)", sampler.num_samples, len(loader.dataset), shuffle)  # type: ignore[arg-type]
    options: dict[str, Any] = {
        "batch_size": loader.batch_size, "drop_last": loader.drop_last, "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory, "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn, "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        options.update(prefetch_factor=loader.prefetch_factor, multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(loader.dataset, sampler=sampler, **options)
