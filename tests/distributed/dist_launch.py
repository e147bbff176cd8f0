"""Run a function on N local processes (gloo over 127.0.0.1) with a hard timeout: never hangs."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, out_dir: str, timeout_s: float) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)  # 2 ranks on a 2-core machine
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        result = fn(rank, world)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Done: leave without the interpreter's teardown, where gloo's threads once aborted a finished
    # rank in CI ("terminate called without an active exception", exit -6) after its result was saved.
    os._exit(0)


def run_distributed(fn: Callable, out_dir: Path, world: int = 2, timeout_s: float = 40.0) -> list:
    """fn(rank, world) -> picklable result, on `world` spawned processes; returns the results by rank.

    Fails (never hangs) when a rank errors or the whole run exceeds `timeout_s`.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, fn, str(out_dir), timeout_s), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    import time

    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    errors = [(out_dir / f"rank{r}.err") for r in range(world)]
    msgs = [e.read_text() for e in errors if e.exists()]
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout_s}s (killed)\n" + "\n".join(msgs))
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks failed (rank, exitcode): {bad}\n" + "\n".join(msgs))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
