"""Run a test function on two processes joined by ``torch.distributed`` (gloo on CPUs; nccl), from pytest.

``run_ranks(fn, *args)`` starts one process per rank (``forkserver``: forks of a fresh server
process that imported torch and qatgraph once, so no thread or state of pytest's process is
inherited and no rank pays the imports again), each joins a gloo group through a fresh free TCP port on 127.0.0.1, calls
``fn(rank, *args)`` and sends back its picklable result; the list of results comes back in rank
order. Bounded in time: the process group's collectives time out after ``COLLECTIVE_TIMEOUT_S``
(a rank waiting for a dead peer fails rather than hangs) and the whole run after
``timeout_s``. On any failure the test fails with every rank's exit code and traceback (or the
note that it was still running and was stopped).

``fn`` must be importable by name (a module-level function of a test module or of this one).
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2
COLLECTIVE_TIMEOUT_S = 60
GRACE_S = 10  # how long the other ranks get to fail on their own once one rank has failed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = WORLD_SIZE, timeout_s: float = 240.0,
              backend: str = "gloo") -> list[Any]:
    """``[fn(0, *args), fn(1, *args), ...]``, each computed in its own process of one group (``nccl``:
    rank r on ``cuda:r``)."""
    folder = tempfile.mkdtemp(prefix="qatgraph-ranks-")
    context = _context()
    address = f"tcp://127.0.0.1:{free_port()}"
    processes = [context.Process(target=_rank_main, args=(fn, rank, world_size, address, folder, backend, args),
                                 name=f"rank{rank}") for rank in range(world_size)]
    for process in processes:
        process.start()
    stopped = _wait(processes, time.monotonic() + timeout_s)
    failed = [rank for rank, p in enumerate(processes) if p.exitcode != 0 or
              not os.path.exists(_path(folder, "result", rank))]
    if failed:
        pytest.fail(_failure_report(fn, processes, folder, stopped, timeout_s), pytrace=False)
    results = []
    for rank in range(world_size):
        with open(_path(folder, "result", rank), "rb") as handle:
            results.append(pickle.load(handle))
    return results


def _context():
    """``forkserver`` with torch and qatgraph imported once in the server: each rank starts as a fork
    of that thread-free process (no import cost per test, none of pytest's threads or state)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "qatgraph", "distributed_ranks"])
    return context


def _wait(processes: list[Any], deadline: float) -> set[int]:
    """Join all; once one fails, the rest get GRACE_S; stop whatever still runs at the deadline."""
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in processes):
            deadline = min(deadline, time.monotonic() + GRACE_S)
        time.sleep(0.05)
    stopped = set()
    for rank, process in enumerate(processes):
        if process.is_alive():
            stopped.add(rank)
            process.terminate()
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
    return stopped


def _failure_report(fn: Callable[..., Any], processes: list[Any], folder: str, stopped: set[int],
                    timeout_s: float) -> str:
    lines = [f"{fn.__name__} on {len(processes)} ranks failed:"]
    for rank, process in enumerate(processes):
        if rank in stopped:
            lines.append(f"--- rank {rank}: still running, stopped (run limit {timeout_s:.0f} s, or {GRACE_S} s after "
                         "another rank failed)")
        else:
            lines.append(f"--- rank {rank}: exit code {process.exitcode}")
        trace = _path(folder, "traceback", rank)
        if os.path.exists(trace):
            with open(trace, encoding="utf-8") as handle:
                lines.append(handle.read().rstrip())
    return "\n".join(lines)


def _path(folder: str, kind: str, rank: int) -> str:
    return os.path.join(folder, f"{kind}-{rank}.{'pkl' if kind == 'result' else 'txt'}")


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, address: str, folder: str, backend: str,
               args: tuple) -> None:
    import torch.distributed as dist

    os.environ["QATGRAPH_NO_PROGRESS"] = "1"
    torch.set_num_threads(1)  # the same arithmetic on every rank and in the reference runs
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=address, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        result = fn(rank, *args)
        with open(_path(folder, "result", rank) + ".tmp", "wb") as handle:
            pickle.dump(result, handle)
        os.replace(_path(folder, "result", rank) + ".tmp", _path(folder, "result", rank))
    except BaseException:  # noqa: BLE001 - whatever stopped this rank, the parent shows its traceback
        with open(_path(folder, "traceback", rank), "w", encoding="utf-8") as handle:
            handle.write(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
