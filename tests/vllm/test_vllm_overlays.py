"""Memory overlays chosen per request on vLLM: one batch mixing three requests with three
different overlays and one with none gives each request exactly the tokens it gets served
alone by an engine on the materialized edit (its rows written into the tables), and
log-probabilities within LOGPROB_TOL. Each overlay does change its request's tokens (checked),
so the comparison can fail. With vLLM's prefix cache on, a block cached under one overlay serves
only requests with the same overlays (the same prompt with none, or another, recomputes; the
same again hits the cache). An unknown overlay name is refused before it reaches the engine.

Run in the vLLM venv: `python -m pytest -m vllm tests/vllm` (five engine starts, ~2 min)."""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run in the vLLM venv "
                           "(pip install -e '.[vllm]', docs/serving.md)")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.vllm.harness import Engine, assert_same, bios_prompts, write_folder, write_overlay  # noqa: E402

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
NAMES = ("alice", "bob", "carol")


def expected(outs):
    return [(list(o.outputs[0].token_ids), [o.outputs[0].logprobs[i][t].logprob
                                            for i, t in enumerate(o.outputs[0].token_ids)]) for o in outs]


def test_a_batch_of_requests_with_different_overlays_equals_each_materialized_edit_alone(tmp_path):
    folder = write_folder(tmp_path / "base", train_steps=150)
    prompts = bios_prompts(folder, [40, 65, 30, 52])  # three with an overlay each, the last with none
    folders = {name: write_overlay(folder, prompts[k], tmp_path / f"ov_{name}", tmp_path / f"edited_{name}", seed=k)
               for k, name in enumerate(NAMES)}
    named = {"engram_overlays": {n: str(f) for n, f in folders.items()}}
    with Engine(folder, block_size=32, hf_overrides=named, enable_prefix_caching=True) as engine:
        mixed = engine.generate(prompts, overlays=[*NAMES, None])
        plain = engine.generate(prompts[:3])  # the same prompts, no overlay: no overlay's cached block may serve
        swapped = engine.generate(prompts[:1], overlays=["bob"])  # alice's prompt under bob's overlay
        again = engine.generate(prompts[1:2], overlays=["bob"])  # bob's prompt and overlay again: a cache hit
        from vllm.exceptions import VLLMValidationError

        with pytest.raises(VLLMValidationError, match="no overlay named 'dave' is served"):
            engine.generate(prompts[:1], overlays=["dave"])
    alone = {}
    for k, name in enumerate(NAMES):
        with Engine(tmp_path / f"edited_{name}", block_size=32) as engine:
            alone[name] = engine.generate([prompts[k]] + ([prompts[0]] if name == "bob" else []))
    with Engine(folder, block_size=32) as engine:
        base_alone = [engine.generate([p])[0] for p in prompts]
    for k, name in enumerate(NAMES):
        assert_same(mixed[k:k + 1], expected(alone[name][:1]))
        assert_same(plain[k:k + 1], expected(base_alone[k:k + 1]))
        assert plain[k].num_cached_tokens == 0  # the overlay's blocks were not reused without it
        assert list(plain[k].outputs[0].token_ids) != list(mixed[k].outputs[0].token_ids), name  # it matters
    assert_same(mixed[3:], expected(base_alone[3:]))
    assert_same(swapped, expected(alone["bob"][1:]))
    assert again[0].num_cached_tokens == 64
    assert list(again[0].outputs[0].token_ids) == list(mixed[1].outputs[0].token_ids)
