"""Run a function on W gloo ranks in fresh processes, on a free port, with a deadline.

Every process started is joined or killed before `run_ranks` returns; a rank's exception
comes back as the test's failure with that rank's traceback."""

from __future__ import annotations

import os
import queue
import socket
import traceback
from datetime import timedelta
import multiprocessing as mp
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _portable(value, to_numpy: bool):
    """Tensors as numpy arrays (sent by value: a torch tensor through a Queue is shared memory
    that dies with its process), and back."""
    import numpy as np
    import torch

    if isinstance(value, dict):
        return {k: _portable(v, to_numpy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_portable(v, to_numpy) for v in value)
    if to_numpy and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if not to_numpy and isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


def _entry(fn, rank: int, world_size: int, port: int, results, args, env: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), **env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        results.put((rank, "ok", _portable(fn(rank, world_size, *args), to_numpy=True)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, env: dict | None = None,
              outcomes: bool = False) -> list:
    """[fn(rank, world_size, *args) for each rank], each in its own process. `fn` must be a
    module-level function (spawned processes import it). With `outcomes`, nothing is raised
    for a failing rank: each rank's ("ok", value), ("error", traceback) or ("died", exit code)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, results, args, env or {}), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors, reported = {}, [], {}
    deadline = time.monotonic() + timeout
    try:
        while len(reported) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(reported))} did not finish in "
                                   f"{timeout} s")
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in reported]
                if dead and outcomes:
                    time.sleep(0.5)  # a rank that failed cleanly may still be delivering its report
                    if results.empty():
                        reported.update({r: ("died", procs[r].exitcode) for r in dead})
                elif dead and not errors:
                    raise RuntimeError(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                continue
            reported[rank] = (status, _portable(value, to_numpy=False) if status == "ok" else value)
            if status == "ok":
                out[rank] = reported[rank][1]
            elif not outcomes:
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks may now wait on the dead one: stop them all
        if outcomes:
            return [reported[r] for r in range(world_size)]
        if errors:
            raise AssertionError("\n".join(errors))
        return [out[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
