"""The module that stands for a call whose training flag must follow ``train()``/``eval()``
(qatgraph/graph/modes.py puts it in traced graphs)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class TrainingFlagCall(nn.Module):
    """``function(*args, **kwargs)`` with the arguments at ``flags`` (positions or keyword names)
    set to this module's ``training``: follows ``train()``/``eval()`` like the code it replaces."""

    def __init__(self, function: Callable[..., Any], flags: tuple[int | str, ...]) -> None:
        super().__init__()
        self.function = function
        self.flags = flags

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = list(args)
        for flag in self.flags:
            if isinstance(flag, int):
                args[flag] = self.training
            else:
                kwargs[flag] = self.training
        return self.function(*args, **kwargs)

    def extra_repr(self) -> str:
        name = getattr(self.function, "__qualname__", repr(self.function))
        return f"{name}, training at {list(self.flags)}"
