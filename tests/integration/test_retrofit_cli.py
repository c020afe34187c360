"""`engram retrofit` on a tiny random Llama saved with our corpus's tokenizer: a run like
`engram train` (metrics, plot, checkpoints) that resumes exactly and reports the base loss."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from engram.cli.main import main  # noqa: E402

pytestmark = pytest.mark.hf  # transformers integration: deselect with -m 'not hf'


@pytest.fixture
def tiny_llama(small_dataset, tmp_path):
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(small_dataset / "tokenizer.json"))
    folder = tmp_path / "llama"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>" if tok.token_to_id("<eos>") is not None
                                     else None)
    hf_tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, eos_token_id=hf_tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_retrofit_run_reports_and_resumes_exactly(tiny_llama, small_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["retrofit", str(tiny_llama), "--out", str(out), "--data", str(small_dataset), "--layers", "0", "2",
            "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--checkpoint-every", "2",
            "--rows-per-head", "211", "--prompt", "the river"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out loss: base" in printed and "cached generation equals uncached: True" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cached_equals_uncached"] and summary["adapter_bytes"] > 0
    assert (out / "loss_curve.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    # a run killed after step 2: resuming ends where the uninterrupted one did, exactly
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    assert main([*argv[:3], str(cut), *argv[4:], "--resume"]) == 0
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["final_val_loss"] == summary["final_val_loss"] and resumed["base_val_loss"] == summary["base_val_loss"]
