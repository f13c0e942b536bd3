"""EfQAT: train only the most important weight rows (channels) or layers.

Importance of an output row (conv channel / linear row) is ``mean |w|`` over the row, divided by
the mean of its layer (``freeze.importance: layer_normalized``, the default, so rows of layers with
small weights can compete network-wide) or not (``importance: raw``, the EfQAT paper's score).
Modes:

* ``cwpl`` — the top ``ratio`` of rows in each layer;
* ``cwpn`` — the top ``ratio`` of rows across the whole network;
* ``lwpn`` — whole layers, the most important first, until ``ratio`` of all rows is reached.

A "layer" is a quantized Conv/Linear module or a parameter read by quantized functional ops
(:mod:`.functional`: ``F.linear(x, self.qkv.weight)``, a decomposed ``nn.MultiheadAttention``'s
in-projection, ``F.conv*``, ``x @ self.w``), whose rows lie on the ops' output axis. Trainable rows
of a layer are handed to its forward (``module.trainable_rows``; a functional weight's ops read
them from its weight quantizer), which routes through the ``qatgraph::masked_*`` ops: the backward
computes the weight gradient of those rows only. A layer with no trainable row (LWPN) gets
``weight.requires_grad = False``, so autograd skips its weight-gradient GEMM entirely and
optimizers skip the parameter (every op reading a shared functional parameter then goes without
its weight gradient: the parameter is the unit).

Frozen rows never move: gradients are zero there, but SGD momentum, weight decay and Adam state
would still move them, so a global optimizer post-step hook restores them (and their learnable
weight-scale entries) from a snapshot taken at each refresh — whatever loop and optimizer the
user has. The snapshot is refreshed with the importance, every ``interval`` training samples,
counted by a forward pre-hook on the model (a counter: nothing else runs between refreshes).
Under ``torch.distributed`` the count is of the samples of all ranks (each rank's batch times the
number of ranks), so every rank refreshes at the same step; the ranks' weights being identical
under DDP, so are their selections.

Every tensor of that state is a non-persistent buffer of the layer it belongs to, or of a
functional weight's quantizer (``trainable_rows``, ``efqat_frozen_rows``, ``efqat_weight_snapshot``,
``efqat_scale_snapshot``; ``trainable_rows_<start>_<stop>`` for an op reading a row slice):
``.to(device)``, ``.cuda()``, ``.half()``, ``deepcopy`` and ``torch.compile`` see them like any
buffer, and ``state_dict()`` leaves them out. Importance is ranked on the CPU (one small copy per
layer at each refresh), so the selection is the same on every device and every rank.
"""
from __future__ import annotations

import copy
import logging
import math
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from qatgraph.distributed import is_main_process, world_size
from qatgraph.graph.queries import parameter_display_name
from qatgraph.policy import FreezeConfig
from qatgraph.quant.qmodules import CONV_TRANSPOSE_TYPES, QuantWeightMixin

from . import functional
from .layers import FROZEN_ROWS, SCALE_SNAPSHOT, STATE_BUFFERS, WEIGHT_SNAPSHOT, FrozenLayer, set_state_buffer

log = logging.getLogger(__name__)

_CONTROLLERS: weakref.WeakSet[FreezeController] = weakref.WeakSet()
_GLOBAL_HOOK = None


class FreezeController:
    """Owns the frozen set of one compiled model (``model.qatgraph_freeze``)."""

    def __init__(self, model: nn.Module, config: FreezeConfig) -> None:
        self.config = config
        self.layers = [FrozenLayer(name, module, _supports_partial(module), holder_name=name)
                       for name, module in model.named_modules()
                       if isinstance(module, QuantWeightMixin) and module.weight.requires_grad]
        found, self.unmanaged = functional.find(model, {id(layer.weight) for layer in self.layers})
        self.layers += [_functional_layer(entry) for entry in found]
        self.float_layers: dict[str, nn.Parameter] = {}
        self.freezes_float = config.float_layers == "freeze"
        self.add_float_weights(model)
        self.samples_since_refresh = 0
        self.refreshes = 0
        self.removed = False
        self.attach(model)
        _CONTROLLERS.add(self)
        _install_global_hook()
        self.refresh()

    def add_float_weights(self, model: nn.Module) -> None:
        """Take in the weights left in floating point (Conv/Linear layers, functional ops, weighted
        ops of untraced code): they train unless ``freeze.float_layers`` is "freeze". Called again
        when the first calibration batch finds untraced code's ops (compile had no example inputs)."""
        managed = {id(layer.weight) for layer in self.layers} | {id(w) for w in self.float_layers.values()}
        new = {name: weight for name, weight in _float_weights(model).items()
               if id(weight) not in managed and weight.requires_grad}
        if self.freezes_float:
            for weight in new.values():
                weight.requires_grad_(False)
        self.float_layers.update(new)

    # --------------------------------------------------------------- selection
    def refresh(self) -> None:
        """Recompute importance and the trainable rows of every layer; snapshot frozen rows."""
        mode, ratio = self.config.mode, float(self.config.ratio)
        if mode == "cwpl":  # within a layer, normalizing by its mean would not change the order
            selections = {id(layer): _top_rows(layer.importance(), ratio) for layer in self.layers if layer.partial_ok}
        elif mode == "cwpn":
            selections = self._network_rows(ratio)
        else:
            selections = self._network_layers(ratio)
        for layer in self.layers:
            self._apply(layer, selections.get(id(layer), "all"))
        self.samples_since_refresh = 0
        self.refreshes += 1
        if is_main_process():  # every rank refreshes alike: one line, not one per rank
            log.info("qatgraph EfQAT (%s, ratio %.3g): %d of %d rows train", mode, ratio, self.trainable_rows,
                     self.total_rows)

    def _network_rows(self, ratio: float) -> dict[int, torch.Tensor]:
        eligible = [layer for layer in self.layers if layer.partial_ok]
        if not eligible:
            return {}
        scores = torch.cat([_network_importance(layer, self.config.importance) for layer in eligible])
        keep = _count(ratio, scores.numel())
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[torch.topk(scores, keep).indices] = True
        selections, start = {}, 0
        for layer in eligible:
            mask = chosen[start:start + layer.num_rows]
            selections[id(layer)] = mask.nonzero().flatten()
            start += layer.num_rows
        return selections

    def _network_layers(self, ratio: float) -> dict[int, torch.Tensor | str]:
        budget = ratio * sum(layer.num_rows for layer in self.layers)
        ranked = sorted(self.layers, key=lambda layer: float(layer.importance().mean()), reverse=True)
        selections: dict[int, torch.Tensor | str] = {}
        used = 0
        for layer in ranked:
            if used + layer.num_rows <= budget + 1e-9:
                selections[id(layer)] = "all"
                used += layer.num_rows
            else:
                selections[id(layer)] = "none"
        return selections

    def _apply(self, layer: FrozenLayer, selection: torch.Tensor | str) -> None:
        weight, holder, quantizer = layer.weight, layer.holder, layer.quantizer
        device = weight.device
        scale = quantizer.scale
        learnable_scale = isinstance(scale, nn.Parameter) and not quantizer.range_frozen
        if isinstance(selection, str):
            trainable = None if selection == "all" else torch.empty(0, dtype=torch.long)
        else:
            trainable = selection.to(dtype=torch.long).sort().values
            if trainable.numel() == layer.num_rows:
                trainable = None
        whole_layer_frozen = trainable is not None and trainable.numel() == 0
        weight.requires_grad_(not whole_layer_frozen)  # LWPN: autograd skips the dW GEMM entirely
        if learnable_scale:
            scale.requires_grad_(not whole_layer_frozen)  # an LSQ scale gradient would need the weight GEMM
        # Masked ops only for a partial selection; a whole frozen layer needs none.
        layer.set_rows(trainable, device)
        if trainable is None:
            for name in STATE_BUFFERS:
                set_state_buffer(holder, name, None)
            return
        frozen = torch.ones(layer.num_rows, dtype=torch.bool)
        frozen[trainable] = False
        frozen_rows = frozen.nonzero().flatten().to(device)
        set_state_buffer(holder, FROZEN_ROWS, frozen_rows)
        set_state_buffer(holder, WEIGHT_SNAPSHOT, weight.detach().index_select(layer.axis, frozen_rows).clone())
        per_row_scale = isinstance(scale, nn.Parameter) and scale.numel() == layer.num_rows
        set_state_buffer(holder, SCALE_SNAPSHOT,
                         scale.detach().index_select(0, frozen_rows).clone() if per_row_scale else None)

    # --------------------------------------------------------------- hooks
    def attach(self, model: nn.Module) -> None:
        """Count the training samples ``model`` sees (refreshing every ``interval`` samples)."""
        self._hook = model.register_forward_pre_hook(self._count_samples, with_kwargs=True)

    def _count_samples(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if getattr(self, "removed", False) or not module.training or not torch.is_grad_enabled():
            return
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        batch = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
        # Under DDP each rank runs the same step on its own (equal-sized, as DistributedSampler makes
        # them) batch: counting the step's samples over all ranks makes every rank refresh at the same
        # step, the one where a single process on the whole batch would.
        self.samples_since_refresh += batch * world_size()
        if self.samples_since_refresh >= self.config.interval:
            self.refresh()

    @torch.no_grad()
    def restore_frozen(self, optimizer: torch.optim.Optimizer) -> None:
        """Put frozen rows back exactly as they were (called after every optimizer step)."""
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for layer in self.layers:
            holder = layer.holder
            frozen_rows = holder._buffers.get(FROZEN_ROWS)
            if frozen_rows is None or frozen_rows.numel() == 0:
                continue
            weight = layer.weight
            if id(weight) in params:
                weight.index_copy_(layer.axis, frozen_rows, holder._buffers[WEIGHT_SNAPSHOT])
            scale_snapshot = holder._buffers.get(SCALE_SNAPSHOT)
            scale = layer.quantizer.scale
            if scale_snapshot is not None and id(scale) in params:
                scale.index_copy_(0, frozen_rows, scale_snapshot)

    # --------------------------------------------------------------- reporting
    @property
    def total_rows(self) -> int:
        return sum(layer.num_rows for layer in self.layers)

    @property
    def trainable_rows(self) -> int:
        return sum(_count_rows(layer) for layer in self.layers)

    def describe(self) -> dict[str, str]:
        floats = {name: "float, weights frozen" if self.freezes_float else "float, all rows train (freeze.float_layers)"
                  for name in self.float_layers}
        return {**floats, **self.unmanaged, **{layer.name: layer.describe() for layer in self.layers}}

    def describe_weight(self, quantizer_name: str) -> str | None:
        """The frozen state of the functional weight whose quantizer is ``quantizer_name`` (the
        summary's row of each op reading it: three for a packed in-projection read in slices)."""
        return next((layer.describe() for layer in self.layers
                     if layer.functional_quantizer is not None and layer.holder_name == quantizer_name), None)

    def __deepcopy__(self, memo: dict) -> FreezeController:
        """A copy bound to the copied model (its modules come from ``memo``) that restores its own
        frozen rows: the copy of the model keeps a copy of the counting hook, bound to this clone."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            setattr(clone, key, None if key == "_hook" else copy.deepcopy(value, memo))
        _CONTROLLERS.add(clone)
        return clone

    def remove(self) -> None:
        """Back to ordinary QAT: every row and every learnable weight scale trains, hooks removed."""
        self.removed = True  # a deep copy's hook has no handle here: this makes it a no-op
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for layer in self.layers:
            layer.set_rows(None, layer.weight.device)
            layer.weight.requires_grad_(True)
            quantizer = layer.quantizer
            if isinstance(quantizer.scale, nn.Parameter) and not quantizer.range_frozen:
                quantizer.scale.requires_grad_(True)
            for name in STATE_BUFFERS:
                set_state_buffer(layer.holder, name, None)
        for region in {id(r): r for layer in self.layers for r in layer.regions}.values():  # each graph once
            functional.unrewrite(region)
        if self.freezes_float:
            for weight in self.float_layers.values():
                weight.requires_grad_(True)
        _CONTROLLERS.discard(self)


FLOAT_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def _float_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of Conv/Linear layers left in floating point and of float functional ops, by name."""
    weights = {name: module.weight for name, module in model.named_modules()
               if isinstance(module, FLOAT_WEIGHTED) and not isinstance(module, QuantWeightMixin)
               and isinstance(getattr(module, "weight", None), nn.Parameter)
               and not isinstance(getattr(module, "weight_quantizer", None), nn.Module)}  # read functionally, quantized
    weights.update(functional.float_weights(model))
    report = getattr(model, "trace_report", None)
    for op in getattr(report, "eager_weighted", ()):  # weighted ops of untraced code (graph/eager_ops.py)
        for qualified in op.parameters:
            owner, _, local = qualified.rpartition(".")
            weights.setdefault(parameter_display_name(owner, local), model.get_parameter(qualified))
    return weights


def _functional_layer(entry: functional.FunctionalWeight) -> FrozenLayer:
    num_rows = entry.num_rows
    slices = tuple(dict.fromkeys((site.rows_name(num_rows), site.start, site.stop) for site in entry.sites
                                 if (site.start, site.stop) != (0, num_rows)))
    regions = list({id(site.graph_module): site.graph_module for site in entry.sites}.values())
    if entry.partial_ok:
        functional.rewrite(entry)
    return FrozenLayer(entry.name, entry.owner, entry.partial_ok, entry.weight_name, entry.axis, entry.quantizer,
                       entry.quantizer_name, slices, regions if entry.partial_ok else [])


def _network_importance(layer: FrozenLayer, kind: str) -> torch.Tensor:
    """Row scores comparable across layers: raw mean |w| (``raw``), or divided by the layer's mean
    (``layer_normalized``: 1.0 is an average row of its layer)."""
    scores = layer.importance()
    if kind == "layer_normalized":
        scores = scores / scores.mean().clamp_min(torch.finfo(torch.float32).tiny)
    return scores


def _count_rows(layer: FrozenLayer) -> int:
    rows = layer.rows
    return layer.num_rows if rows is None else int(rows.numel())


def _supports_partial(module: nn.Module) -> bool:
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        return False  # the masked ops cover Linear and Conv1d/2d/3d
    return not isinstance(getattr(module, "padding", 0), str)


def _count(ratio: float, total: int) -> int:
    """ceil(ratio * total), immune to float noise (0.55 * 100 is 55.00000000000001)."""
    return min(total, math.ceil(round(ratio * total, 9)))


def _top_rows(importance: torch.Tensor, ratio: float) -> torch.Tensor:
    keep = _count(ratio, importance.numel())
    return torch.topk(importance, keep).indices


def _after_any_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for controller in list(_CONTROLLERS):
        controller.restore_frozen(optimizer)


def _install_global_hook() -> None:
    global _GLOBAL_HOOK
    if _GLOBAL_HOOK is None:
        _GLOBAL_HOOK = register_optimizer_step_post_hook(_after_any_optimizer_step)
