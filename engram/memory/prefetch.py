"""Deterministic prefetch: row ids are known before the forward, so fetching can start then.

`MemoryTable.prefetch(rows)` hands the table's `gather` to one background worker thread
(shared by all tables, so fetches run in layer order); on a GPU the worker issues its copies
on a side CUDA stream and records an event. When the Engram layer runs, it waits only for
what has not arrived yet, and the time it waited is recorded.

CUDA stream ordering (the ids are produced on the caller's stream, read on the side stream,
and the rows come back the other way):
  - at submit, the side stream waits for the caller's stream as it is then (`wait_stream`),
    so the copy of the ids cannot start before the kernels that computed them finish; it is
    enqueued on the caller's thread, so later work on the caller's stream is not waited for;
  - the ids are `record_stream`ed on the side stream and the rows on the consuming stream, so
    the caching allocator does not reuse either block while the other stream may still use it;
  - the consumer waits on an event recorded after the side stream's copies.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def _worker() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch")
        return _executor


@dataclass
class PendingFetch:
    """A fetch in flight: the flat ids it was started for, and its result to come."""

    flat_ids: torch.Tensor
    future: Future
    event: "torch.cuda.Event | None" = None

    def wait(self) -> tuple[torch.Tensor, float]:
        """(rows, seconds this thread was blocked)."""
        t0 = time.perf_counter()
        out = self.future.result()
        if self.event is not None:  # the copies were issued on a side stream
            consumer = torch.cuda.current_stream(out.device)
            consumer.wait_event(self.event)
            out.record_stream(consumer)  # allocated on the side stream, used on this one
        return out, time.perf_counter() - t0


def start_fetch(gather: Callable[[torch.Tensor], torch.Tensor], flat_ids: torch.Tensor,
                device: torch.device) -> PendingFetch:
    """Run `gather(flat_ids)` on the background worker (and a side stream on CUDA)."""
    event = None
    if device.type == "cuda":
        if device not in _side_streams:
            _side_streams[device] = torch.cuda.Stream(device=device)
        stream = _side_streams[device]
        producer = torch.cuda.current_stream(device)  # where the ids were computed
        stream.wait_stream(producer)  # now, on this thread: the ids as they are at submit
        if flat_ids.is_cuda:
            flat_ids.record_stream(stream)  # read on the side stream
        event = torch.cuda.Event()

        def job() -> torch.Tensor:
            with torch.cuda.stream(stream):
                out = gather(flat_ids)
                event.record(stream)
            return out
    else:
        def job() -> torch.Tensor:
            return gather(flat_ids)
    return PendingFetch(flat_ids=flat_ids, future=_worker().submit(job), event=event)
