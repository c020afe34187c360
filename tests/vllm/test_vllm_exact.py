"""vLLM serves an Engram model with exactly engram's numbers, whatever it does to a sequence.

Each case runs vLLM's engine (`vllm.LLM`) on an exported folder and compares every request
with `engram.generate` on the same folder: greedy tokens equal, and the log-probability vLLM
reports for each generated token within LOGPROB_TOL of the full forward's. Cases:
- alone, and in one batch of mixed lengths;
- chunked prefill (32 tokens per step, so prompts span several chunks);
- a prefix-cache hit that ends in the middle of an n-gram and of the short conv's window;
- preemption (a KV cache too small for the batch; vLLM recomputes the preempted request);
- vLLM's n-gram (prompt-lookup) speculative decoding, with drafts accepted and rejected.
Each case asserts that vLLM really did it (cached tokens, preemptions, accepted drafts).

Run in the vLLM venv (docs/serving.md): `python -m pytest -m vllm tests/vllm`. Each engine
start costs ~20 s on this machine.
"""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run in the vLLM venv "
                           "(pip install -e '.[vllm]', docs/serving.md)")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.vllm.harness import Engine, assert_same, bios_prompts, reference, write_folder  # noqa: E402

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_folders")
    return {"dense_m1": write_folder(root / "dense_m1", train_steps=150),
            "moe_m2": write_folder(root / "moe_m2", moe=True, M=2, train_steps=150)}


@pytest.mark.parametrize("name", ["dense_m1", "moe_m2"])
def test_alone_batched_and_prefix_hit_mid_ngram(folders, name):
    folder = folders[name]
    prompts = bios_prompts(folder, [9, 150, 37, 64, 5, 101])
    expected = reference(folder, prompts)
    with Engine(folder, block_size=32, enable_prefix_caching=True) as engine:
        for prompt, ref in zip(prompts, expected):  # alone
            assert_same(engine.generate([prompt]), [ref])
        engine.llm.reset_prefix_cache()
        assert_same(engine.generate(prompts), expected)  # one batch of mixed lengths

        # A hit of one block (32 tokens) on a prompt whose next token continues an n-gram and a
        # conv window that began inside the cached block.
        base = bios_prompts(folder, [45])[0]
        branch = base[:40] + [base[3], base[9]] + base[40:]
        refs = reference(folder, [base, branch])
        assert_same(engine.generate([base]), refs[:1])
        hit = engine.generate([branch])
        assert hit[0].num_cached_tokens == 32
        assert_same(hit, refs[1:])


def test_chunked_prefill_and_preemption(folders):
    folder = folders["dense_m1"]
    prompts = bios_prompts(folder, [50, 70, 90, 40])
    expected = reference(folder, prompts)
    # 6 blocks of 32 slots hold 192 positions: the four requests need 346, so vLLM preempts
    with Engine(folder, block_size=32, num_gpu_blocks_override=6, max_model_len=160, max_num_batched_tokens=32,
                max_num_seqs=4, enable_prefix_caching=False) as engine:
        assert_same(engine.generate(prompts), expected)
        assert engine.metric("vllm:num_preemptions") >= 1


@pytest.mark.parametrize("name", ["dense_m1", "moe_m2"])
def test_ngram_speculative_decoding(folders, name):
    folder = folders[name]
    prompts = bios_prompts(folder, [60, 90, 120])
    expected = reference(folder, prompts, n=40)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    with Engine(folder, block_size=32, speculative_config=spec) as engine:
        assert_same(engine.generate(prompts, n=40), expected)
        drafted = engine.metric("vllm:spec_decode_num_draft_tokens")
        accepted = engine.metric("vllm:spec_decode_num_accepted_tokens")
        assert 0 < accepted < drafted, (accepted, drafted)  # both accepted and rejected drafts


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU workers need two cores")
@pytest.mark.parametrize("name", ["dense_m1", "moe_m2"])
def test_tensor_parallel_two_workers(folders, name, monkeypatch):
    """Attention heads and the dense MLP sharded over 2 CPU workers (vLLM's gloo/shared-memory
    group), the Engram tables, MoE and hyper-connections replicated: engram's numbers still."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per worker (one NUMA node here)
    folder = folders[name]
    prompts = bios_prompts(folder, [30, 80, 55])
    with Engine(folder, block_size=32, tensor_parallel_size=2) as engine:
        assert_same(engine.generate(prompts), reference(folder, prompts))
