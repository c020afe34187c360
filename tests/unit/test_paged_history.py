"""The vLLM plugin's slot-keyed history, without vLLM: a request's n-gram ids and conv taps read
back through its block table equal those of its plain token list, across chunks, blocks and a
rewind; the stores' size is stated, and running out of memory for them is a clear error."""

from types import SimpleNamespace

import pytest
import torch

from engram.vllm_plugin.history import PagedBatch, PagedHistory

BLOCK, PAD = 4, 0


def step(history, block_tables, chunks):
    """One forward over `chunks` = [(request, first position, ids)]: the (ngram context, conv
    taps) every token reads, from the stores."""
    positions, slots, starts = [], [], [0]
    for r, first, ids in chunks:
        for p in range(first, first + len(ids)):
            positions.append(p)
            slots.append(block_tables[r][p // BLOCK] * BLOCK + p % BLOCK)
        starts.append(starts[-1] + len(ids))
    width = max(len(t) for t in block_tables)
    meta = SimpleNamespace(query_start_loc=torch.tensor(starts),
                           slot_mapping=torch.tensor(slots),
                           block_table=torch.tensor([t + [0] * (width - len(t)) for t in block_tables]))
    batch = PagedBatch.from_metadata(torch.tensor(positions), meta, BLOCK, history.num_slots)
    ids = torch.tensor([i for _, _, chunk in chunks for i in chunk])
    context = history.ngram_context(batch, ids, None, lambda x: x)
    taps = history.conv_taps(7, batch, ids.to(torch.float32)[:, None].repeat(1, 3))
    return context, taps


def expected(tokens, p, depth=2, kernel=3, dilation=2):
    context = [tokens[p - k] if p - k >= 0 else PAD for k in range(depth, 0, -1)]
    taps = [float(tokens[p - j * dilation]) if p - j * dilation >= 0 else 0.0 for j in range(kernel - 1, -1, -1)]
    return context, taps


def fresh(blocks=8):
    history = PagedHistory(depth=2, pad_id=PAD, conv={7: (3, 3, 2)})
    assert history.bind([torch.empty(blocks, 2, BLOCK, 1, 2)] * 3, BLOCK, torch.float32)
    return history


def test_history_follows_slots_across_chunks_blocks_and_a_rewind():
    history = fresh()
    a, b = list(range(11, 24)), list(range(31, 37))  # 13 and 6 tokens
    tables = [[5, 2, 7, 0], [3, 6]]  # blocks out of order, as vLLM hands them out
    got = []
    got.append(step(history, tables, [(0, 0, a[:5]), (1, 0, b[:4])]))  # two chunked prefills, mixed
    got.append(step(history, tables, [(0, 5, a[5:10]), (1, 4, b[4:6])]))
    for (context, taps), spans in zip(got, [[(a, 0, 5), (b, 0, 4)], [(a, 5, 10), (b, 4, 6)]]):
        want = [expected(t, p) for t, lo, hi in spans for p in range(lo, hi)]
        assert context.tolist() == [c for c, _ in want]
        assert taps[:, :, 0].tolist() == [t for _, t in want]
    # a rewind: request a's positions 8.. are rejected and rewritten with other tokens
    a2 = a[:8] + [90, 91, 92, 93]
    context, taps = step(history, tables, [(0, 8, a2[8:12])])
    want = [expected(a2, p) for p in range(8, 12)]
    assert context.tolist() == [c for c, _ in want]
    assert taps[:, :, 0].tolist() == [t for _, t in want]


def test_history_size_is_stated_and_out_of_memory_is_a_clear_error(monkeypatch, caplog):
    history = PagedHistory(depth=2, pad_id=PAD, conv={1: (256, 4, 1), 4: (256, 4, 1)})
    caches = [torch.empty(100, 2, 32, 4, 32)] * 8  # 3200 slots, 8 layers of 4 KV heads x 32
    with caplog.at_level("INFO", logger="engram.vllm_plugin.history"):
        assert history.bind(caches, 32, torch.float32)
    assert history.bytes_per_slot(torch.float32) == 8 + 2 * 256 * 4
    assert history.num_slots == 3200 and history.inputs[1].shape == (3202, 256)
    assert "3200 KV slots, 25% of the KV cache" in caplog.text  # 2056 B against 8192 B per slot
    assert not PagedHistory(2, PAD, {}).bind([torch.empty(0)], 32, torch.float32)  # profiling run

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(torch, "zeros", no_memory)
    with pytest.raises(RuntimeError, match="Engram history beside vLLM's KV cache.*gpu-memory-utilization"):
        PagedHistory(depth=2, pad_id=PAD, conv={1: (256, 4, 1)}).bind(caches, 32, torch.float32)
