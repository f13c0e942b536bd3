"""Sensitivity analysis plumbing: sample batches, model outputs and errors, metrics, the cache key, and
:class:`ResultLog`, the resumable side (finished per-layer results appended to a JSON-lines file as
they are computed)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatgraph.distributed import broadcast_object, is_main_process
from qatgraph.errors import SensitivityError
from qatgraph.info import CompileInfo
from qatgraph.quant.batches import run_batch

log = logging.getLogger(__name__)

Metric = Callable[[nn.Module], float]


def _materialize(data: Iterable[Any], input_fn: Callable[[Any], Any] | None, num_samples: int | None,
                 device: torch.device | None) -> tuple[list[Any], list[Any], int]:
    """(batches, items, sample count): the model inputs and the data items they came from, on the
    model's device, truncated to ``num_samples`` samples along dim 0 (items is batches without input_fn)."""
    batches, items, count = [], [], 0
    for item in data:
        batch = input_fn(item) if input_fn is not None else item
        size = _batch_size(batch)
        if size is None:
            raise SensitivityError(f"a data batch holds no tensor ({type(batch).__name__}): pass batches as a tensor, "
                                   "a tuple of forward's arguments or a dict of kwargs, or map items with input_fn=")
        keep = size if num_samples is None else min(size, num_samples - count)

        def prepare(value: Any, keep: int = keep, size: int = size) -> Any:
            return _map_tensors(value, lambda t: (t[:keep] if t.dim() and t.shape[0] == size else t).detach().to(
                device if device is not None else t.device))

        batches.append(prepare(batch))
        items.append(prepare(item) if input_fn is not None else batches[-1])
        count += keep
        if num_samples is not None and count >= num_samples:
            break
    if not batches:
        raise SensitivityError("the sensitivity data yielded no batches: pass a non-empty iterable of input batches "
                               "(e.g. a DataLoader or a list of tensors)")
    return batches, items, count


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(b, fn) for b in batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    return batch


def _batch_size(batch: Any) -> int | None:
    found: list[int] = []
    _map_tensors(batch, lambda t: found.append(t.shape[0] if t.dim() else 1) or t)
    return found[0] if found else None


def _output_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        return [t for v in output.values() for t in _output_tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _output_tensors(v)]
    return []


def _flat_output(output: Any, detach: bool = True) -> torch.Tensor:
    tensors = _output_tensors(output)
    if not tensors:
        raise SensitivityError(f"the model output ({type(output).__name__}) holds no floating-point tensor to compare; "
                               "use mode='full' with a metric for such models")
    flat = torch.cat([t.float().reshape(-1) for t in tensors])
    return flat.detach() if detach else flat


@torch.no_grad()
def _output_nmse(model: nn.Module, batches: list[Any], references: list[torch.Tensor]) -> float:
    error = energy = 0.0
    for batch, reference in zip(batches, references):
        output = _flat_output(run_batch(model, batch, None))
        error += float((output - reference).double().pow(2).sum())
        energy += float(reference.double().pow(2).sum())
    return error / max(energy, 1e-30)


def _sqnr_db(nmse: float) -> float | None:
    return 10.0 * math.log10(1.0 / nmse) if nmse > 0 and math.isfinite(nmse) else None


def _evaluate(metric: Metric, model: nn.Module, what: str) -> float:
    value = metric(model)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SensitivityError(f"metric returned {type(value).__name__} for {what}: it must return one float "
                               "(higher is better), e.g. accuracy") from None
    if not math.isfinite(number):
        raise SensitivityError(f"metric returned {number} for {what}: it must be finite. Check the metric on this "
                               "configuration (NaN/Inf outputs, division by zero on an empty data set)")
    return number


# ------------------------------------------------------------------------------------- cache key
def _result_log(cache_dir: str | os.PathLike | None, model: nn.Module, info: CompileInfo, items: list[Any],
                options: dict[str, Any]) -> ResultLog:
    if cache_dir is None:
        return ResultLog(None)  # no fingerprint: hashing every weight is wasted work without a cache
    if not is_main_process():  # under torch.distributed rank 0 alone reads and writes the file ...
        log = ResultLog(None)
        log.records = broadcast_object(None)
        return log
    log = ResultLog(os.path.join(cache_dir, f"sensitivity-{_fingerprint(model, info, items, options)}.jsonl"))
    broadcast_object(log.records)  # ... and every rank starts from what it holds (a no-op for one process)
    return log


def _fingerprint(model: nn.Module, info: CompileInfo, batches: list[Any], options: dict[str, Any]) -> str:
    """sha256 over the state_dict (weights, scales, enabled flags), the policy, the data and the options."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}".encode())
            digest.update(_tensor_bytes(value))
        else:  # a module's extra state
            digest.update(f"{key}|{value!r}".encode())
    digest.update(json.dumps(info.policy.to_dict(), sort_keys=True, default=str).encode())
    for batch in batches:
        _map_tensors(batch, lambda t: digest.update(f"{t.dtype}|{tuple(t.shape)}".encode()) or
                     digest.update(_tensor_bytes(t)) or t)
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:40]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _qualname(fn: Any) -> str | None:
    return None if fn is None else f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


# ------------------------------------------------------------------------------------- the analysis


class ResultLog:
    """Append-only JSON-lines log of finished results, ``(kind, key) -> value``, for resuming.

    Each record is one line, flushed and fsynced before the next computation starts, so a crash
    loses at most the record being written; a torn last line is ignored on reading. ``path=None``
    keeps the results in memory only.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self.records: dict[str, Any] = {}
        self.hits = 0
        if self.path is None or not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        for line in text.splitlines():
            try:
                record = json.loads(line)
                self.records[record["id"]] = record["value"]
            except (ValueError, KeyError, TypeError):
                log.warning("sensitivity cache %s: ignoring a damaged line (an interrupted write)", self.path)
        if text and not text.endswith("\n"):  # a crash mid-line: start the next record on a fresh line
            self._append("\n")

    def get_or_compute(self, kind: str, key: str, compute: Callable[[], Any]) -> Any:
        """The logged value, or ``compute()``, logged before it is returned."""
        found, value = self.lookup(kind, key)
        if found:
            return value
        value = compute()
        self.add(kind, key, value)
        return value

    def lookup(self, kind: str, key: str) -> tuple[bool, Any]:
        """``(True, value)`` for a logged result (counted as a cache hit), else ``(False, None)``."""
        record_id = f"{kind}:{key}"
        if record_id not in self.records:
            return False, None
        self.hits += 1
        return True, self.records[record_id]

    def add(self, kind: str, key: str, value: Any) -> None:
        """Log a finished result (appended to the file at once, when there is one)."""
        record_id = f"{kind}:{key}"
        self.records[record_id] = value
        if self.path is not None:
            self._append(json.dumps({"id": record_id, "value": value}) + "\n")

    def _append(self, text: str) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
