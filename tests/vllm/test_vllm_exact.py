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

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: these tests run in the vLLM venv "
                           "(pip install -e '.[vllm]', docs/serving.md)")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.vllm.folder import texts, write_folder  # noqa: E402

from engram import generate  # noqa: E402
from engram.runs import open_run  # noqa: E402

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

LOGPROB_TOL = 2e-3  # float32 on both sides; measured differences are ~1e-5
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_folders")
    return {"dense_m1": write_folder(root / "dense_m1", train_steps=150),
            "moe_m2": write_folder(root / "moe_m2", moe=True, M=2, train_steps=150)}


def bios_prompts(folder: Path, lengths) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    stream = [i for t in texts()[40:] for i in tok.encode(t).ids]
    return [stream[7 * k: 7 * k + n] for k, n in enumerate(lengths)]


def reference(folder: Path, prompts: list[list[int]], n: int = NEW_TOKENS):
    """engram's greedy tokens and each token's log-probability from one full forward."""
    model = open_run(folder).model
    out = []
    for prompt in prompts:
        tokens = generate(model, [prompt], n, temperature=0)[0]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + tokens])).logits[0].float().log_softmax(-1)
        out.append((tokens, [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]))
    return out


class Engine:
    """A vLLM engine on a folder, shut down on exit (one engine at a time on these cores)."""

    def __init__(self, folder: Path, **kwargs) -> None:
        kwargs.setdefault("max_model_len", 512)
        self.llm = vllm.LLM(str(folder), dtype="float32", seed=0, enforce_eager=True, disable_log_stats=False,
                            **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()

    def generate(self, prompts, n: int = NEW_TOKENS):
        params = vllm.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return outs

    def metric(self, name: str) -> float:
        return sum(getattr(m, "value", 0) or 0 for m in self.llm.get_metrics() if m.name == name)


def assert_same(outs, expected) -> float:
    """Tokens equal; returns the largest log-probability difference (asserted below tolerance)."""
    worst = 0.0
    for out, (tokens, logps) in zip(outs, expected, strict=True):
        got = out.outputs[0]
        assert list(got.token_ids) == tokens
        for step, (token, ref) in enumerate(zip(tokens, logps)):
            worst = max(worst, abs(got.logprobs[step][token].logprob - ref))
    assert worst < LOGPROB_TOL, f"log-probabilities differ by {worst:.2e}"
    return worst


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
