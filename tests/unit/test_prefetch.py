"""Prefetch through the MemoryTable seam: same numbers, never stale rows, waits reported."""

import contextlib
import threading
import time

import torch

from engram import EngramLM
from engram.memory import prefetch
from engram.memory.table import MemoryTable
from tests.tiny import build, small_config


class SlowHostTable(MemoryTable):
    """An asynchronous table whose fetch takes a while (a stand-in for host/disk tiers)."""

    asynchronous = True

    def __init__(self, weight, table_sizes, delay=0.01):
        super().__init__(table_sizes, weight.shape[1])
        self.data, self.delay, self.fetched = weight.detach().clone(), delay, 0

    def gather(self, flat_ids):
        time.sleep(self.delay)
        self.fetched += 1
        return self.data.index_select(0, flat_ids.reshape(-1)).reshape(*flat_ids.shape, -1)


def offloaded(model):
    for layer in model.engram_layers:
        t = model.blocks[layer].engram.table
        model.set_table(layer, SlowHostTable(t.weight, t.table_sizes))
    return model


def test_prefetched_model_equals_resident_for_forward_and_decode():
    resident = build(small_config(M=4))
    slow = offloaded(build(small_config(M=4)))
    ids = torch.randint(0, 97, (3, 19))
    full = resident(ids)
    out = slow(ids)
    assert torch.equal(out.logits, full.logits)
    assert out.table_wait_s > 0 and full.table_wait_s == 0
    assert all(slow.blocks[l].engram.table.fetched == 1 for l in slow.engram_layers)  # one prefetch each
    state, pieces, t = slow.new_state(3), [], 0
    for s in (5, 1, 1, 7, 5):
        o = slow(ids[:, t:t + s], state)
        pieces.append(o.logits)
        state, t = o.state, t + s
    assert (torch.cat(pieces, 1) - full.logits).abs().max() < 1e-4


def test_prefetch_never_serves_stale_or_other_rows():
    model = offloaded(build(small_config(M=4)))
    ids = torch.randint(0, 97, (2, 9))
    first = model(ids).logits
    for layer in model.engram_layers:  # poison the backing store between steps
        model.blocks[layer].engram.table.data.fill_(float("nan"))
    assert torch.isnan(model(ids).logits).all()
    table = model.blocks[1].engram.table
    table.data.normal_()
    rows_a = model.hasher.hash(model.compress(ids))[1]
    rows_b = (rows_a + 1) % torch.tensor(table.table_sizes)
    table.prefetch(rows_a)  # a prefetch for other rows must not be served
    assert torch.equal(table(rows_b), table.gather(rows_b + table.offsets))
    assert not torch.isnan(first).any()


def test_resident_tables_do_not_prefetch():
    model = EngramLM(small_config())
    table = model.blocks[1].engram.table
    table.prefetch(torch.zeros(1, 1, len(table.table_sizes), dtype=torch.long))
    assert table._pending is None


def test_every_backend_serves_the_model_bit_identically(tmp_path):
    from engram.memory import CachedTable, DiskTable, HostTable

    resident = build(small_config(M=4))
    ids = torch.randint(0, 97, (2, 21))
    full = resident(ids).logits
    for kind in ("host", "disk", "disk+cache"):
        model = build(small_config(M=4))
        for layer in model.engram_layers:
            t = model.blocks[layer].engram.table
            if kind == "host":
                table = HostTable.from_table(t)
            else:
                table = DiskTable.open(DiskTable.write(tmp_path / f"{kind}{layer}", t.weight.detach(), t.table_sizes))
                if kind == "disk+cache":
                    table = CachedTable(table, capacity_rows=20)  # far smaller than the rows read: evictions
            model.set_table(layer, table)
        assert torch.equal(model(ids).logits, full), kind
        state, pieces, t = model.new_state(2), [], 0
        for s in (4, 1, 9, 7):
            o = model(ids[:, t:t + s], state)
            pieces.append(o.logits)
            state, t = o.state, t + s
        assert (torch.cat(pieces, 1) - full).abs().max() < 1e-4, kind


# ---------------------------------------------------------------- CUDA stream ordering (issue 10)
class _Log(list):
    def add(self, *entry):
        self.append(entry + (threading.current_thread().name,))


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.add("wait_stream", self.name, other.name)

    def wait_event(self, event):
        self.log.add("wait_event", self.name, event.name)


class _FakeEvent:
    def __init__(self, log):
        self.name, self.log = "event", log

    def record(self, stream):
        self.log.add("event.record", stream.name)


class _OnFakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA and logs record_stream (no GPU here)."""

    log: _Log

    @property
    def is_cuda(self):
        return True

    def record_stream(self, stream):
        self.log.add("record_stream", self.label, stream.name)


def _fake_cuda(monkeypatch, log):
    local = threading.local()
    main = _FakeStream("consumer", log)

    def current_stream(device=None):
        return getattr(local, "stream", main)

    @contextlib.contextmanager
    def stream_ctx(s):
        prev = current_stream()
        local.stream = s
        try:
            yield
        finally:
            local.stream = prev

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "Event", lambda: _FakeEvent(log))
    monkeypatch.setattr(prefetch, "_side_streams", {})
    return current_stream


def _tagged(t, label, log):
    out = torch.Tensor._make_subclass(_OnFakeCuda, t)
    out.label, out.log = label, log
    return out


def test_side_stream_waits_for_the_producer_and_streams_are_recorded(monkeypatch):
    log = _Log()
    current_stream = _fake_cuda(monkeypatch, log)
    ids = _tagged(torch.arange(6), "ids", log)
    rows = torch.randn(10, 4)

    def gather(flat):
        log.add("gather", current_stream().name)
        return _tagged(rows.index_select(0, flat.as_subclass(torch.Tensor)), "rows", log)

    pending = prefetch.start_fetch(gather, ids, torch.device("cuda", 0))
    out, _ = pending.wait()
    assert torch.equal(out.as_subclass(torch.Tensor), rows[:6])
    main = threading.current_thread().name
    steps = [e[:-1] for e in log]
    assert steps == [
        ("wait_stream", "side", "consumer"),  # the ids' producer, before anything reads them
        ("record_stream", "ids", "side"),
        ("gather", "side"),  # the copies run on the side stream
        ("event.record", "side"),  # after them
        ("wait_event", "consumer", "event"),  # the consumer waits for the rows
        ("record_stream", "rows", "consumer"),
    ], steps
    # the wait is enqueued at submit, on the caller's thread (not later on the worker, where it
    # would also wait for everything the caller queued meanwhile); the gather runs on the worker
    assert log[0][-1] == main and log[1][-1] == main
    assert log[2][-1] != main and log[4][-1] == main


def test_cpu_fetch_touches_no_streams(monkeypatch):
    log = _Log()
    _fake_cuda(monkeypatch, log)
    rows = torch.randn(10, 4)
    out, _ = prefetch.start_fetch(lambda f: rows[f], torch.arange(3), torch.device("cpu")).wait()
    assert torch.equal(out, rows[:3]) and log == []
