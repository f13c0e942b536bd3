"""Progress bars for long loops (calibration, sensitivity, training), via tqdm.

Bars go to stderr, are disabled when ``enabled=False`` or ``QATGRAPH_NO_PROGRESS=1`` is set,
and leave no trace in logs of non-interactive runs beyond tqdm's own behaviour. Under a
``torch.distributed`` process group only rank 0 shows bars (one bar, not one per process).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from qatgraph.distributed import is_main_process

T = TypeVar("T")


def progress_enabled(enabled: bool = True) -> bool:
    return enabled and os.environ.get("QATGRAPH_NO_PROGRESS", "") not in ("1", "true", "yes") and \
        is_main_process()


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True) -> Iterator[T]:
    if not progress_enabled(enabled):
        yield from iterable
        return
    with tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) as bar:
        yield from bar
