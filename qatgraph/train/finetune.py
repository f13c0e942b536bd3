"""The QAT fine-tuning recipe (NVIDIA's and PyTorch's practice), as one call or as pieces.

``finetune`` trains a calibrated QAT model for about 10% of the original schedule:

* SGD with momentum 0.9 on the weights, learning rate ``lr_scale`` (1%) of the original, linear
  warm-up then cosine annealing to 1% of that, weight decay ``weight_decay_scale`` (x0.01) of the
  original;
* quantizer parameters (learnable scales) in their own Adam optimizer, with no weight decay, at a
  learning rate relative to each scale (LSQ-style: ``quantizer_lr_relative`` x the scale's mean
  magnitude, so a 0.004 and a 4.0 scale move by the same fraction per step), or at one absolute
  ``quantizer_lr`` when given;
* BatchNorm statistics frozen after ``freeze_bn_fraction`` of the steps, quantizer ranges after
  ``freeze_quantizers_fraction`` (both configurable, ``None`` never);
* gradient clipping, AMP (bf16 or fp16 with a grad scaler) on CUDA, EfQAT refresh through the
  model's freeze controller (it counts samples itself), a progress bar and a history;
* under ``torch.distributed``, DistributedDataParallel and sharded data (:mod:`.ddp`).

Every piece is usable in a hand-written loop: :func:`recipe` returns the learning-rate
schedule, :func:`split_parameters` the two parameter groups, :func:`freeze_batchnorm` and
:func:`freeze_quantizer_ranges` the late-training switches.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qatgraph.errors import QatgraphError
from qatgraph.progress import progress
from qatgraph.quant.batches import model_device, to_device
from qatgraph.quant.quantizer import FakeQuantizer

from .ddp import check_equal_steps, prepare


def recipe(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | None = None,
           final_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (default 5% of the steps) then cosine annealing to ``final_ratio`` of the peak."""
    if total_steps <= 0:
        raise QatgraphError(f"total_steps={total_steps}: the schedule needs at least one step")
    warmup = max(1, round(0.05 * total_steps)) if warmup_steps is None else max(0, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ratio = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress_ratio))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights and other parameters, quantizer parameters such as learnable scales)."""
    quantizer_params = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()}
    weights = [p for p in model.parameters() if id(p) not in quantizer_params]
    quantizers = [p for p in model.parameters() if id(p) in quantizer_params]
    return weights, quantizers


def freeze_batchnorm(model: nn.Module) -> None:
    """Stop updating BN running statistics (BN layers switch to eval; affine params still train)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def freeze_quantizer_ranges(model: nn.Module) -> None:
    """Fix every scale: learnable scales stop training, weight scales stop following the weights."""
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            module.freeze_range()


@dataclass
class FinetuneConfig:
    epochs: int
    base_lr: float
    lr_scale: float = 0.01
    final_lr_ratio: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4  # the original run's weight decay (fine-tuning uses x weight_decay_scale)
    weight_decay_scale: float = 0.01
    quantizer_lr: float | None = None  # absolute Adam lr for every quantizer parameter; None: relative
    quantizer_lr_relative: float = 1e-2  # Adam lr of a quantizer parameter = this x its mean |value|
    warmup_fraction: float = 0.05
    freeze_bn_fraction: float | None = 0.5
    freeze_quantizers_fraction: float | None = 0.8
    grad_clip: float | None = 1.0
    amp: str | None = "auto"  # "bf16", "fp16", None; "auto" = bf16 on CUDA when supported, else off


def quantizer_adam(params: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Adam:
    """Adam for the quantizer parameters: one absolute ``quantizer_lr``, or per parameter
    ``quantizer_lr_relative`` x its mean magnitude at the start (LSQ-style scale-relative steps)."""
    if config.quantizer_lr is not None:
        return torch.optim.Adam(params, lr=config.quantizer_lr)
    groups = [{"params": [p], "lr": config.quantizer_lr_relative * max(float(p.detach().abs().mean()), 1e-12)}
              for p in params]
    return torch.optim.Adam(groups)


@dataclass
class FinetuneHistory:
    epochs: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.epochs[-1] if self.epochs else {}


def finetune(qmodel: nn.Module, train_loader: Iterable[Any], loss_fn: Callable[[Any, Any], torch.Tensor], *,
             epochs: int, base_lr: float, val_loader: Iterable[Any] | None = None,
             metric: Callable[[nn.Module, Iterable[Any]], float] | None = None, show_progress: bool = True,
             ddp: bool | None = None, checkpoint_path: str | os.PathLike | None = None,
             **options: Any) -> FinetuneHistory:
    """Fine-tune a calibrated QAT model with the recipe above; returns the per-epoch history.

    ``train_loader`` yields ``(inputs, targets)``; ``loss_fn(outputs, targets)``; ``metric(model,
    val_loader)`` returns a score (e.g. accuracy) evaluated after each epoch. ``options`` are the
    fields of :class:`FinetuneConfig` (``momentum``, ``weight_decay``, ``quantizer_lr``, ...).
    ``checkpoint_path``: after every epoch, ``{"format", "epoch", "state_dict", "history"}`` is
    written there atomically (``torch.load(path, weights_only=True)`` reads it).

    Under a ``torch.distributed`` group (every rank calls ``finetune``; see
    :mod:`qatgraph.train.ddp`) the model trains through ``DistributedDataParallel`` (``ddp=None``
    wraps it when the group has several ranks, ``True`` always, ``False`` never; a model already
    wrapped is used as it is), a plain ``DataLoader`` is sharded with a ``DistributedSampler``,
    the history holds the loss over all ranks and the mean of the ranks' metric values (the same
    on every rank), and rank 0 alone shows progress and writes the checkpoint.
    """
    try:
        config = FinetuneConfig(epochs=epochs, base_lr=base_lr, **options)
    except TypeError as exc:
        valid = ", ".join(f for f in FinetuneConfig.__dataclass_fields__ if f not in ("epochs", "base_lr"))
        raise QatgraphError(f"finetune: {exc}; valid options are {valid}") from None
    processes = prepare(qmodel, train_loader, ddp)
    qmodel, train_loader = processes.compiled, processes.loader
    steps_per_epoch = _length(train_loader)
    check_equal_steps(steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    weights, quantizer_params = split_parameters(qmodel)
    optimizer = torch.optim.SGD(weights, lr=base_lr * config.lr_scale, momentum=config.momentum,
                                weight_decay=config.weight_decay * config.weight_decay_scale)
    scheduler = recipe(optimizer, total_steps, round(config.warmup_fraction * total_steps), config.final_lr_ratio)
    quantizer_optimizer = quantizer_adam(quantizer_params, config) if quantizer_params else None
    device = model_device(qmodel)
    amp_dtype = _amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    history = FinetuneHistory()
    step = 0
    for epoch in range(epochs):
        processes.start_epoch(epoch)
        qmodel.train()
        _apply_late_freezes(qmodel, config, step, total_steps)  # train() above re-enabled BN updates
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        for inputs, targets in progress(train_loader, total=steps_per_epoch, desc=f"QAT epoch {epoch + 1}/{epochs}",
                                        unit="step", enabled=show_progress):
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(processes.model(inputs), targets)
            _backward_and_step(loss, qmodel, optimizer, quantizer_optimizer, scaler, config.grad_clip)
            scheduler.step()
            step += 1
            _apply_late_freezes(qmodel, config, step, total_steps)
            loss_sum += float(loss.detach()) * _batch_size(inputs)
            seen += _batch_size(inputs)
        record = {"epoch": epoch + 1, "train_loss": processes.mean_loss(loss_sum, seen),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
        if metric is not None and val_loader is not None:
            qmodel.eval()
            with torch.no_grad():
                record["val_metric"] = processes.mean_metric(float(metric(qmodel, val_loader)))
        history.epochs.append(record)
        processes.check_efqat_agreement()
        if checkpoint_path is not None:
            processes.save_checkpoint(checkpoint_path, epoch + 1, history.epochs)
    qmodel.train()
    return history


def _backward_and_step(loss, model, optimizer, quantizer_optimizer, scaler, grad_clip) -> None:
    optimizer.zero_grad(set_to_none=True)
    if quantizer_optimizer is not None:
        quantizer_optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        raise QatgraphError(f"finetune: the loss became {float(loss)}; lower base_lr or check the data")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    for opt in (optimizer, quantizer_optimizer):
        if opt is None:
            continue
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
    if scaler is not None:
        scaler.update()


def _apply_late_freezes(model: nn.Module, config: FinetuneConfig, step: int, total_steps: int) -> None:
    if config.freeze_bn_fraction is not None and step >= config.freeze_bn_fraction * total_steps:
        freeze_batchnorm(model)
    if config.freeze_quantizers_fraction is not None and step >= config.freeze_quantizers_fraction * total_steps:
        freeze_quantizer_ranges(model)


def _amp_dtype(amp: str | None, device: torch.device | None) -> torch.dtype | None:
    if amp is None or device is None or device.type != "cuda":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    raise QatgraphError(f"amp={amp!r}: use 'auto', 'bf16', 'fp16' or None")


def _length(loader: Iterable[Any]) -> int:
    try:
        return max(1, len(loader))  # type: ignore[arg-type]
    except TypeError:
        raise QatgraphError("finetune needs a train_loader with a length (a DataLoader or a list) to plan the "
                            "learning-rate schedule") from None


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, (tuple, list)) and inputs:
        return _batch_size(inputs[0])
    return 1
