"""Memory overlays chosen per request on vLLM: one batch mixing three requests with three
different overlays and one with none gives each request exactly the tokens it gets served
alone by an engine on the materialized edit (its rows written into the tables), and
log-probabilities within LOGPROB_TOL. Each overlay does change its request's tokens (checked),
so the comparison can fail. An unknown overlay name is refused before it reaches the engine, and
an engine with overlays and vLLM's prefix cache (which does not key by overlay) does not start.

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


def test_a_batch_of_requests_with_different_overlays_equals_each_materialized_edit_alone(tmp_path, capfd):
    folder = write_folder(tmp_path / "base", train_steps=150)
    prompts = bios_prompts(folder, [40, 65, 30, 52])  # three with an overlay each, the last with none
    folders = {name: write_overlay(folder, prompts[k], tmp_path / f"ov_{name}", tmp_path / f"edited_{name}", seed=k)
               for k, name in enumerate(NAMES)}
    named = {"engram_overlays": {n: str(f) for n, f in folders.items()}}
    with pytest.raises(Exception):  # its cache would mix overlays' blocks: the worker refuses to start
        Engine(folder, block_size=32, hf_overrides=named, enable_prefix_caching=True)
    assert "start the engine with --no-enable-prefix-caching" in capfd.readouterr().err
    with Engine(folder, block_size=32, hf_overrides=named, enable_prefix_caching=False) as engine:
        mixed = engine.generate(prompts, overlays=[*NAMES, None])
        plain = engine.generate(prompts[:3])  # the same prompts with no overlay
        from vllm.exceptions import VLLMValidationError

        with pytest.raises(VLLMValidationError, match="no overlay named 'dave' is served"):
            engine.generate(prompts[:1], overlays=["dave"])
    alone = {}
    for k, name in enumerate(NAMES):
        with Engine(tmp_path / f"edited_{name}", block_size=32) as engine:
            alone[name] = engine.generate([prompts[k]])
    with Engine(folder, block_size=32) as engine:
        base_alone = engine.generate([prompts[3]])
    for k, name in enumerate(NAMES):
        assert_same(mixed[k:k + 1], expected(alone[name]))
        assert list(plain[k].outputs[0].token_ids) != list(mixed[k].outputs[0].token_ids), name  # it matters
    assert_same(mixed[3:], expected(base_alone))
