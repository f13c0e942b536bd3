"""What EfQAT freezes: one weight tensor and where its state lives (:class:`FrozenLayer`).

A layer is a quantized Conv/Linear module (``weight`` on the module, its state buffers on the
module, rows on axis 0) or a functional weight (:mod:`.functional`: any parameter a quantized
``F.linear``/``F.conv*``/``F.conv_transpose*``/``matmul`` reads, its state on its weight quantizer,
rows on the op's output axis).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

#: Non-persistent buffers the controller keeps for each weight it manages (on the layer, or on a
#: functional weight's quantizer), so that ``.to()``, ``.cuda()``, ``.half()``, ``deepcopy`` and
#: DDP's buffer handling move them with the model.
ROWS = "trainable_rows"                      # int64 trainable output rows for the masked ops
FROZEN_ROWS = "efqat_frozen_rows"            # int64 output rows that never move (None: all train)
WEIGHT_SNAPSHOT = "efqat_weight_snapshot"    # those rows' weights as of the last refresh
SCALE_SNAPSHOT = "efqat_scale_snapshot"      # their learnable per-channel weight scales, if any
STATE_BUFFERS = (FROZEN_ROWS, WEIGHT_SNAPSHOT, SCALE_SNAPSHOT)


def set_state_buffer(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Set a non-persistent buffer (registering it on first use): state that follows the module
    everywhere but never enters ``state_dict()``."""
    if name in module._buffers:
        setattr(module, name, value)
    else:
        module.register_buffer(name, value, persistent=False)


@dataclass
class FrozenLayer:
    """One weight under the controller. Its row selection lives in buffers of ``holder``
    (``trainable_rows`` for the masked ops, ``efqat_*`` for the frozen rows and their snapshots),
    never here, so it moves wherever the model moves."""

    name: str
    module: nn.Module  # the layer, or the module owning a functional weight
    partial_ok: bool   # rows can be frozen individually (a masked op covers every use)
    weight_name: str = "weight"
    axis: int = 0      # output-row axis of the weight
    functional_quantizer: nn.Module | None = None  # functional weights: their quantizer, holding the state
    holder_name: str = ""                           # qualified name of the module holding the state
    slices: tuple[tuple[str, int, int], ...] = ()   # functional: (rows buffer, start, stop) of row-slice ops
    regions: list[fx.GraphModule] = field(default_factory=list)  # functional: graphs whose ops were rewritten

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.weight_name)

    @property
    def quantizer(self) -> nn.Module:
        return self.functional_quantizer if self.functional_quantizer is not None else self.module.weight_quantizer

    @property
    def holder(self) -> nn.Module:
        return self.functional_quantizer if self.functional_quantizer is not None else self.module

    @property
    def num_rows(self) -> int:
        return self.weight.shape[self.axis]

    @property
    def frozen_rows(self) -> torch.Tensor | None:
        return self.holder._buffers.get(FROZEN_ROWS)

    @property
    def rows(self) -> torch.Tensor | None:
        """Trainable rows: ``None`` when the whole layer trains, empty when all of it is frozen."""
        if self.frozen_rows is None:
            return None
        trainable = self.holder._buffers.get(ROWS)
        if trainable is not None:
            return trainable
        return torch.empty(0, dtype=torch.long, device=self.frozen_rows.device)

    @property
    def buffer_names(self) -> list[str]:
        """Qualified names of the state buffers (the row buffers of sliced ops included)."""
        prefix = f"{self.holder_name}." if self.holder_name else ""
        return [prefix + name for name in (ROWS, *STATE_BUFFERS, *(rows for rows, _, _ in self.slices))]

    def importance(self) -> torch.Tensor:
        """Mean |w| per output row (the paper's score)."""
        weight = self.weight.detach().movedim(self.axis, 0)
        return weight.abs().reshape(weight.shape[0], -1).mean(dim=1).float().cpu()

    def describe(self) -> str:
        rows = self.rows
        trainable = self.num_rows if rows is None else int(rows.numel())
        return f"{trainable}/{self.num_rows} rows train"

    def set_rows(self, trainable: torch.Tensor | None, device: torch.device) -> None:
        """Hand the masked ops their rows: ``None`` (plain op) for all rows or none (the weight
        then gets no gradient at all); a sliced op gets the rows of its slice, counted from its start."""
        partial = trainable is not None and 0 < trainable.numel() < self.num_rows
        set_state_buffer(self.holder, ROWS, trainable.to(device) if partial else None)
        for rows_name, start, stop in self.slices:
            share = None
            if partial:
                share = trainable[(trainable >= start) & (trainable < stop)] - start
                share = None if share.numel() == stop - start else share.to(device)
            set_state_buffer(self.holder, rows_name, share)
