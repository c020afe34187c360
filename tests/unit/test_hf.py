"""EngramForCausalLM under transformers' own generate, loss and save/load, against engram itself."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from engram import EngramLM  # noqa: E402
from engram.config import EngramConfig, ModelConfig, MoEConfig  # noqa: E402
from engram.model.generate import generate  # noqa: E402

pytestmark = pytest.mark.hf  # transformers integration: deselect with -m 'not hf'

V, V_COMPRESSED, PAD = 97, 61, 0


def config(tie=False):
    return ModelConfig(
        vocab_size=V, hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, n_streams=2,
        max_seq_len=64, tie_embeddings=tie,
        moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden_size=16, first_k_dense=1),
        engram=EngramConfig(compressed_vocab_size=V_COMPRESSED, pad_id=0, layer_ids=(1, 2),
                            rows_per_head=(101, 103), n_head_per_ngram=2, n_embed_per_ngram=16,
                            conv_zero_init=False, table_init_std=1.0))  # rows that add something


def build(tie=False):
    from engram.hf import EngramForCausalLM

    torch.manual_seed(0)
    compression = np.arange(V) % V_COMPRESSED  # ids 61..96 share rows with 0..35: a real many-to-one table
    model = EngramLM(config(tie), compression=compression).eval()
    with torch.no_grad():  # hyper-connections and conv away from their static init
        for name, p in model.named_parameters():
            if name.endswith((".phi", "alpha_pre", "alpha_post", "alpha_res")) or "short_conv.weight" in name:
                p.normal_(0, 0.3)
    return model, EngramForCausalLM.from_engram(model).eval()


def prompt(n, seed):
    return torch.randint(1, V, (1, n), generator=torch.Generator().manual_seed(seed))


def test_greedy_and_sampled_generate_equal_engram_generate():
    model, hf = build()
    ids = prompt(7, 1)
    out = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    assert out[0, 7:].tolist() == generate(model, [ids[0].tolist()], 10, temperature=0)[0]
    torch.manual_seed(5)
    sampled = hf.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=1.0,
                          pad_token_id=PAD)
    ours = generate(model, [ids[0].tolist()], 10, temperature=0.9, top_k=20, seed=5)[0]
    assert sampled[0, 7:].tolist() == ours


def test_beam_search_and_left_padding_with_the_cache_equal_without():
    model, hf = build()
    ids = prompt(6, 2)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD)
    assert torch.equal(hf.generate(ids, use_cache=True, **kw), hf.generate(ids, use_cache=False, **kw))
    short, long = prompt(4, 3), prompt(9, 4)
    batch = torch.full((2, 9), PAD)
    batch[0, 5:], batch[1] = short[0], long[0]
    mask = (torch.arange(9) >= torch.tensor([[5], [0]])).long()
    together = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    for row, single in enumerate((short, long)):
        alone = hf.generate(single, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        assert together[row, 9:].tolist() == alone[0, single.shape[1]:].tolist()


def test_labels_give_the_next_token_loss():
    model, hf = build()
    ids = prompt(12, 5)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions
    out = hf(ids, labels=labels, use_cache=False)
    logits = model(ids).logits
    ref = torch.nn.functional.cross_entropy(logits[0, 2:-1], ids[0, 3:])
    assert torch.allclose(out.loss, ref, atol=1e-6) and torch.equal(out.logits, logits)


def test_inputs_embeds_alone_is_a_clear_error():
    _, hf = build()
    with pytest.raises(ValueError, match="pass input_ids"):
        hf(inputs_embeds=torch.zeros(1, 3, 32))


LOAD = """
import sys, json, torch, engram.hf
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2])).eval()
ids = torch.tensor([json.loads(sys.argv[3])])
with torch.no_grad():
    print(json.dumps({"logits": m(ids, use_cache=False).logits.float().flatten().tolist(),
                      "compression": m.model.compression.tolist(), "type": type(m).__name__}))
"""


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_and_from_pretrained_in_a_fresh_process(tmp_path, tie):
    model, hf = build(tie)
    hf.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    ids = prompt(9, 6)
    with torch.no_grad():
        ref = model(ids).logits.flatten()

    def load(dtype):
        out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "m"), dtype, json.dumps(ids[0].tolist())],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    fp32 = load("float32")
    assert fp32["type"] == "EngramForCausalLM"
    assert fp32["compression"] == model.compression.tolist()
    assert torch.equal(torch.tensor(fp32["logits"]), ref)
    bf16 = torch.tensor(load("bfloat16")["logits"])
    assert (bf16 - ref).abs().max().item() < 0.1 * ref.abs().max().item()

    # a hash layout that does not match the model config is refused on load
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["hash_layout"]["primes"]["1"][0] += 2
    cfg_file.write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM

    import engram.hf  # noqa: F401

    with pytest.raises(ValueError, match="layout"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
