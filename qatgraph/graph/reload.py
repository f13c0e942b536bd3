"""What ``torch.load`` of a whole pickled compiled model does: refuse, in words.

torch.fx pickles a GraphModule as its generated code and, on load, rebuilds the graph by tracing
that code with the graph's tracer class. What qatgraph knows about the graph (which node each
quantizer belongs to, the output structure a torch.export model returns, the items of a traced
``nn.Sequential``) lives in node and module metadata that this rebuild drops, and the code calls
functions (the attention pass's ``attention_bias``) that a re-trace would trace into. A model
rebuilt that way would train, yet export or calibrate wrongly, so :func:`mark_compiled` makes
:class:`CompiledModelTracer` the tracer of each graph, and loading stops with the way to persist a
compiled model: its ``state_dict``, loaded into a model compiled again (what the command line's
checkpoints hold). Saving still works (nothing is half-written).
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from qatgraph.errors import UsageError

HOW_TO_PERSIST = ("save qmodel.state_dict() and load it into qatgraph.compile(model, policy, example_inputs) of "
                  "the same model and policy (a compiled state_dict carries every weight, scale and quantizer "
                  "format); the command line's checkpoints (qatgraph compile -o) do that for you")


class CompiledModelTracer(fx.Tracer):
    """The tracer torch.fx would rebuild a pickled compiled GraphModule with: refuses."""

    def trace(self, root: nn.Module | Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        name = getattr(root, "_graphmodule_cls_name", None) or type(root).__name__
        raise UsageError(f"this file holds a whole pickled qatgraph-compiled model ({name}); torch.fx cannot rebuild "
                         f"it with the quantization graph qatgraph needs. To persist a compiled model, {HOW_TO_PERSIST}.")


def mark_compiled(model: nn.Module) -> None:
    """Make each GraphModule of ``model`` refuse to be rebuilt from a pickle (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, fx.GraphModule):
            module.graph._tracer_cls = module._tracer_cls = CompiledModelTracer  # the module's copy is pickled
