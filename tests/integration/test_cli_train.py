"""The CLI contract other tools script against: exit 0 on success, one error line + exit 2."""

import json

import pytest
import torch

from engram.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_generate_info(trained_run, capsys):
    code, out, _ = run(capsys, "eval", str(trained_run), "--windows", "4")
    assert code == 0 and "step_00000004: val loss" in out and "bits/byte" in out
    code, out, _ = run(capsys, "generate", str(trained_run), "--prompt", "the river", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("the river")
    greedy = run(capsys, "generate", str(trained_run), "--prompt", "the river the river", "--temperature", "0")
    spec = run(capsys, "generate", str(trained_run), "--prompt", "the river the river", "--temperature", "0",
               "--draft", "prompt_lookup")
    assert greedy[0] == spec[0] == 0 and greedy[1] == spec[1]
    code, _, err = run(capsys, "generate", str(trained_run), "--prompt", "x", "--draft", "prompt_lookup")
    assert code == 2 and "temperature=0" in err
    code, out, _ = run(capsys, "info", str(trained_run))
    assert code == 0 and "engram_tables" in out and "hash layout: Engram layers [1]" in out
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["steps"] == 4


def test_data_build_from_files(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("alpha beta gamma. " * 50)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "delta epsilon. " * 40}) + "\n"
                                      + json.dumps({"text": "zeta eta theta. " * 40}) + "\n")
    code, out, err = run(capsys, "data", "build", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                         "--out", str(tmp_path / "ds"), "--vocab-size", "280", "--val-fraction", "0.3")
    assert code == 0, err
    assert (tmp_path / "ds" / "train.bin").is_file() and (tmp_path / "ds" / "tokenizer.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "huge", "--out", "{tmp}/r", "--data", "{data}"], "unknown preset 'huge'"),
    (["train", "--preset", "tiny", "--out", "{tmp}/r", "--data", "{tmp}/empty"], "not a prepared dataset"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--batch-size", "6", "--grad-accum", "4"],
     "batch_size (6) must be a multiple of grad_accum (4)"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--seq-len", "300"],
     "seq_len 300 is longer than the model's max_seq_len 256"),
    (["train", "--out", "{tmp}/r", "--data", "{data}", "--device", "cuda:0"] if not torch.cuda.is_available()
     else ["train", "--out", "{tmp}/r", "--data", "{data}", "--device", "cuda:99"], "cuda"),
    (["data", "build", "--corpus", "wiki-xx", "--out", "{tmp}/d"], "wiki-xx"),
    (["data", "build", "--input", "{tmp}/empty", "--out", "{tmp}/d"], "empty"),
    (["data", "build", "--input", "{tmp}/latin1.txt", "--out", "{tmp}/d"], "latin1.txt"),
    (["data", "build", "--input", "{tmp}/missing.txt", "--out", "{tmp}/d"], "missing.txt"),
    (["eval", "{tmp}"], "not a training run folder"),
    (["generate", "{tmp}"], "--prompt"),
])
def test_user_mistakes_are_one_line_exit_2(argv, message, tmp_path, small_dataset, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    argv = [a.format(tmp=tmp_path, data=small_dataset) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("engram: error:"), err
    assert message in err, err


def test_every_command_has_help(capsys):
    for argv in (["--help"], ["train", "--help"], ["data", "build", "--help"], ["eval", "--help"],
                 ["generate", "--help"], ["info", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage: engram" in capsys.readouterr().out


def test_offload_then_serve_from_disk(trained_run, tmp_path, capsys):
    code, out, err = run(capsys, "offload", str(trained_run), "--out", str(tmp_path / "tables"))
    assert code == 0, err
    assert "layer 1:" in out and (tmp_path / "tables" / "layer1.bin").is_file()
    code, resident, _ = run(capsys, "eval", str(trained_run), "--windows", "4")
    code2, disk, err = run(capsys, "eval", str(trained_run), "--windows", "4", "--tables", str(tmp_path / "tables"),
                           "--cache-rows", "500")
    assert code == code2 == 0, err
    assert resident.splitlines()[0] == disk.splitlines()[0]  # the same loss, to the last digit
    assert "cache hit rate" in disk and "peak RSS" in disk
    code, a, _ = run(capsys, "generate", str(trained_run), "--prompt", "the river", "--max-new-tokens", "6")
    code, b, _ = run(capsys, "generate", str(trained_run), "--prompt", "the river", "--max-new-tokens", "6",
                     "--tables", str(tmp_path / "tables"))
    assert a == b


@pytest.mark.parametrize("dtype, group, tolerance",
                         [("bf16", "row", 0.01), ("int8", "row", 0.01), ("fp8", "row", 0.02)])
def test_offload_quantized_serves_within_a_stated_loss_change(trained_run, tmp_path, capsys, dtype, group, tolerance):
    tables = tmp_path / "tables"
    code, out, err = run(capsys, "offload", str(trained_run), "--out", str(tables), "--dtype", dtype, "--group", group)
    assert code == 0, err
    assert f", {dtype})" in out
    fp32 = (trained_run / "checkpoints").glob("*/model.safetensors")
    assert (tables / "layer1.bin").stat().st_size < next(fp32).stat().st_size
    code, resident, _ = run(capsys, "eval", str(trained_run), "--windows", "4")
    code2, served, err = run(capsys, "eval", str(trained_run), "--windows", "4", "--tables", str(tables))
    assert code == code2 == 0, err
    loss = lambda text: float(text.split("loss ")[1].split()[0].rstrip(","))  # noqa: E731
    assert abs(loss(served) - loss(resident)) < tolerance


@pytest.mark.parametrize("what", ["gates", "ablation", "logit-lens", "tables"])
def test_analyze_commands(trained_run, tmp_path, capsys, what):
    code, out, err = run(capsys, "analyze", what, str(trained_run), "--out", str(tmp_path), "--windows", "4")
    assert code == 0, err
    expected = {"gates": ["gates.html", "gates.png"], "ablation": ["ablation.json"],
                "logit-lens": ["logit_lens.png"], "tables": ["table_stats.json", "table_zipf.png"]}[what]
    for name in expected:
        assert (tmp_path / name).is_file(), name


def test_cka_needs_two_runs(trained_run, tmp_path, capsys):
    code, _, err = run(capsys, "analyze", "cka", str(trained_run), "--out", str(tmp_path))
    assert code == 2 and "--other" in err
    code, out, err = run(capsys, "analyze", "cka", str(trained_run), "--other", str(trained_run), "--out",
                         str(tmp_path), "--windows", "4")
    assert code == 0 and "soft-alignment index" in out, err


@pytest.mark.hf
def test_export_hf_folder_reads_like_the_run(trained_run, tmp_path, capsys):
    """`engram export-hf`: transformers loads it (model and tokenizer) with the run's numbers, and
    the engram commands read it like the run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import engram.hf  # noqa: F401
    from engram.model.io import load_model
    from engram.runs import latest_good_checkpoint

    hf_dir = tmp_path / "hf"
    code, out, _ = run(capsys, "export-hf", str(trained_run), "--out", str(hf_dir))
    assert code == 0, out
    ours = load_model(latest_good_checkpoint(trained_run)).eval()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), load_model(hf_dir).state_dict().values()))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok("the river city north")["input_ids"]])
    with torch.no_grad():  # the same weights; loaded apart (mapped file vs copy), BLAS may sum in another order
        err = (hf(ids, use_cache=False).logits - ours(ids).logits).abs().max().item()
    assert err < 1e-5, err
    for argv in (["eval", "--windows", "4"], ["generate", "--prompt", "the river", "--max-new-tokens", "5"]):
        code_run, out_run, _ = run(capsys, argv[0], str(trained_run), *argv[1:])
        code_hf, out_hf, _ = run(capsys, argv[0], str(hf_dir), *argv[1:])
        assert code_run == code_hf == 0
        assert out_run.split(":", 1)[-1] == out_hf.split(":", 1)[-1]  # the same numbers / text
    code, out, _ = run(capsys, "info", str(hf_dir))
    assert code == 0 and "engram_tables" in out
    code, out, _ = run(capsys, "offload", str(hf_dir), "--out", str(tmp_path / "tables"))
    assert code == 0 and "layer 1:" in out
    code_t, out_t, _ = run(capsys, "eval", str(hf_dir), "--windows", "4", "--tables", str(tmp_path / "tables"))
    code_p, out_p, _ = run(capsys, "eval", str(hf_dir), "--windows", "4")
    loss = [line.split(":", 1)[-1] for line in (out_t, out_p)]  # the first line: the loss from either source
    assert code_t == code_p == 0 and loss[0].splitlines()[0] == loss[1].splitlines()[0]
