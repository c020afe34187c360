"""`engram memory`: index, locate, forget, write and replay on a trained run. Edits touch only the
rows they log (bit for bit), never change the source run, and bad input is one error line."""

import hashlib
import json

import pytest
import torch

from engram.cli.main import main
from engram.model.io import load_model
from engram.runs import latest_good_checkpoint

TEXT = "the river city north empire king"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def indexed_run(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "run"
    assert main(["train", "--out", str(out), "--data", str(small_dataset), "--max-steps", "6", "--batch-size", "4",
                 "--seq-len", "32", "--eval-every", "6", "--checkpoint-every", "6"]) == 0
    assert main(["memory", "index", str(out)]) == 0
    return out


def model_of(run):
    return load_model(latest_good_checkpoint(run))


def changed_rows(a, b):
    """{state key: sorted changed row indices} between two models' tables; fails on any other change."""
    sa, sb = a.state_dict(), b.state_dict()
    out = {}
    for k in sa:
        if torch.equal(sa[k], sb[k]):
            continue
        assert ".engram.table." in k, f"{k} changed, but an edit may change table rows only"
        out[k] = sorted(set((sa[k] != sb[k]).any(-1).nonzero().flatten().tolist()))
    return out


def test_locate_shows_grams_rows_reads_and_partners(indexed_run, capsys):
    from engram.data.dataset import PreparedData

    data = PreparedData.open(json.loads((indexed_run / "run.json").read_text())["data_dir"])
    piece = [int(i) for i in data.train.tokens[200:216]]
    text = data.tokenizer.decode(piece)
    assert data.tokenizer.encode(text, add_special_tokens=False).ids == piece  # a stretch of the training split, as the text
    code, out, _ = run(capsys, "memory", "locate", str(indexed_run), "--text", text, "--json")
    assert code == 0
    found = json.loads(out)
    rows = model_of(indexed_run).engram_rows(torch.tensor([piece]))[1][0]
    for t in range(len(piece)):
        heads = found["positions"][t]["layers"]["1"]
        assert [h["row"] for h in heads] == rows[t].tolist()  # the model's own rows, every head
        if t >= 2:  # every n-gram inside the text occurs in training: its rows were read
            assert all(h["reads"] >= 1 for h in heads)
    assert any(h["partners"] for p in found["positions"] for h in p["layers"]["1"])
    code, out, _ = run(capsys, "memory", "locate", str(indexed_run), "--text", text)
    assert code == 0 and "rows addressed" in out and "layer 1 head 0" in out


def test_forget_changes_only_logged_rows_keeps_the_source_and_replays(indexed_run, tmp_path, capsys):
    source = tree_digest(indexed_run)
    code, out, _ = run(capsys, "memory", "forget", str(indexed_run), "--text", TEXT, "--force",
                       "--out", str(tmp_path / "forgot"))
    assert code == 0 and "text loss" in out
    assert tree_digest(indexed_run) == source  # the source run is untouched
    edited = tmp_path / "forgot"
    meta = json.loads((edited / "run.json").read_text())
    assert meta["parent"]["run"] == str(indexed_run) and meta["edits"][0]["op"] == "forget"
    log = json.loads(next(edited.glob("checkpoints/*/edit_log.json")).read_text())
    before, after = model_of(indexed_run), model_of(edited)
    diff = changed_rows(before, after)
    logged = sorted(e["flat_row"] for e in log["changed"])
    table_before = before.state_dict()["blocks.1.engram.table.weight"]
    table_after = after.state_dict()["blocks.1.engram.table.weight"]
    assert not table_after[logged].any()  # every logged row is reset (forget's default mode: zero)
    # exactly the logged rows that held something changed (rows start at zero; a row no training
    # step read is zero already, and resetting it changes nothing)
    assert diff == {"blocks.1.engram.table.weight": [r for r in logged if table_before[r].any()]}
    assert len(diff["blocks.1.engram.table.weight"]) > 0
    summary = log["summary"]
    assert summary["after"]["text_loss"] > summary["before"]["text_loss"]  # the text is harder to predict
    code, out, _ = run(capsys, "memory", "replay", str(edited))
    assert code == 0 and "identical" in out
    # only the rows the text owns: the held-out loss moves by less than the stated 0.01 nats
    code, out, _ = run(capsys, "memory", "forget", str(indexed_run), "--text", TEXT, "--out", str(tmp_path / "owned"))
    assert code == 0
    owned = json.loads(next((tmp_path / "owned").glob("checkpoints/*/edit_log.json")).read_text())
    assert 0 < owned["changed_rows"] < log["changed_rows"] and owned["skipped_rows"] > 0
    assert abs(owned["summary"]["after"]["held_out_loss"] - owned["summary"]["before"]["held_out_loss"]) < 0.01
    # the edited run serves like any run, and cannot be resumed as training
    assert run(capsys, "eval", str(edited), "--windows", "2")[0] == 0
    code, _, err = run(capsys, "train", "--out", str(edited), "--resume", "--data",
                       meta["data_dir"], "--max-steps", "8", "--batch-size", "4", "--seq-len", "32")
    assert code == 2 and "edited copy" in err


def test_write_trains_only_the_text_rows(indexed_run, tmp_path, capsys):
    text = "the queen music valley bridge castle fleet"
    code, out, _ = run(capsys, "memory", "write", str(indexed_run), "--text", text, "--steps", "15", "--force",
                       "--out", str(tmp_path / "wrote"))
    assert code == 0
    log = json.loads(next((tmp_path / "wrote").glob("checkpoints/*/edit_log.json")).read_text())
    assert log["summary"]["after"]["text_loss"] < log["summary"]["before"]["text_loss"] - 0.05
    diff = changed_rows(model_of(indexed_run), model_of(tmp_path / "wrote"))
    logged = sorted(e["flat_row"] for e in log["changed"])
    assert diff["blocks.1.engram.table.weight"] == logged  # trained rows all moved; nothing else did
    assert run(capsys, "memory", "replay", str(tmp_path / "wrote"))[0] == 0


@pytest.mark.parametrize("argv, message", [
    (["forget", "{run}", "--text", " ", "--out", "{tmp}/x"], "the text is empty"),
    (["forget", "{run}", "--out", "{tmp}/x"], "give the text to act on"),
    (["forget", "{run}", "--text", TEXT, "--out", "{run}"], "is the source {run}"),
    (["locate", "{tmp}", "--text", TEXT], "not a training run folder"),
    (["forget", "{run}", "--text", "river " * 300, "--out", "{tmp}/x"], "longer than the model's max_seq_len"),
    (["locate", "{run}", "--text", TEXT, "--index", "{tmp}"], "holds no row index"),
    (["replay", "{run}"], "is not an edited run"),
])
def test_bad_input_is_one_line(indexed_run, tmp_path, capsys, argv, message):
    argv, message = [a.format(run=indexed_run, tmp=tmp_path) for a in argv], message.format(run=indexed_run)
    code, _, err = run(capsys, "memory", *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def train_with(config_change, small_dataset, out, capsys):
    assert main(["config", "--preset", "tiny", "--data", str(small_dataset)]) == 0
    config = json.loads(capsys.readouterr().out)
    config_change(config)
    (out.parent / f"{out.name}.json").write_text(json.dumps(config))
    config_file = out.parent / f"{out.name}.json"
    assert main(["train", "--out", str(out), "--data", str(small_dataset), "--config", str(config_file),
                 "--max-steps", "1", "--batch-size", "2", "--seq-len", "16"]) == 0
    capsys.readouterr()


def test_an_index_of_another_run_and_a_run_without_engram_are_refused(indexed_run, small_dataset, tmp_path, capsys):
    other = tmp_path / "other"
    train_with(lambda c: c["engram"].update(seed=7), small_dataset, other, capsys)
    assert main(["memory", "index", str(other)]) == 0
    code, _, err = run(capsys, "memory", "locate", str(indexed_run), "--text", TEXT, "--index",
                       str(other / "memory_index"))
    assert code == 2 and "another hash layout" in err
    plain = tmp_path / "plain"
    train_with(lambda c: c.update(engram=None), small_dataset, plain, capsys)
    code, _, err = run(capsys, "memory", "index", str(plain))
    assert code == 2 and "without Engram layers" in err


@pytest.mark.parametrize("op", ["forget", "write", "write_many"])
def test_an_overlay_is_small_and_serves_the_edited_runs_numbers(indexed_run, tmp_path, capsys, op):
    """`--overlay` writes only the changed rows; `eval`/`generate --overlay` give the materialized
    edit's numbers exactly; an overlay on another run's parent, or twice stacked (its base rows
    are no longer the ones it was made on), is refused by name. `write_many`: one overlay
    trained on a set of texts at once (a user's facts, from --text-file)."""
    texts = ["--text", TEXT] if op == "forget" else ["--text", "the queen music valley bridge castle fleet"]
    if op == "write_many":
        (tmp_path / "facts.txt").write_text("the queen music valley\nriver castle fleet harbor\nthe king empire north\n")
        texts = ["--text-file", str(tmp_path / "facts.txt")]
    extra = ["--steps", "15"] if op != "forget" else []
    base = ["memory", op.split("_")[0], str(indexed_run), *texts, "--force", *extra]
    assert run(capsys, *base, "--out", str(tmp_path / "run"))[0] == 0
    code, out, _ = run(capsys, *base, "--overlay", "--out", str(tmp_path / "ov"))
    assert code == 0 and "overlay:" in out
    manifest = json.loads((tmp_path / "ov" / "overlay.json").read_text())
    assert len(manifest["log"]["summary"]["texts"]) == (3 if op == "write_many" else 1)
    weights = next((tmp_path / "run").glob("checkpoints/*/model.safetensors")).stat().st_size
    rows = manifest["changed_rows"]
    assert rows > 0 and manifest["rows_file"]["bytes"] < weights / 20  # O(rows changed), not the tables
    assert manifest["rows_file"]["bytes"] <= rows * (8 + 4 * 64) + 1024
    for argv in (["eval", "--windows", "4"], ["generate", "--prompt", "the river", "--max-new-tokens", "8",
                                               "--temperature", "0"]):
        code_run, out_run, _ = run(capsys, argv[0], str(tmp_path / "run"), *argv[1:])
        code_ov, out_ov, _ = run(capsys, argv[0], str(indexed_run), *argv[1:], "--overlay", str(tmp_path / "ov"))
        assert code_run == code_ov == 0
        assert out_run.split(":", 1)[-1] == out_ov.split(":", 1)[-1]  # the same loss / text
    code, _, err = run(capsys, "eval", str(indexed_run), "--windows", "2", "--overlay", str(tmp_path / "ov"),
                       str(tmp_path / "ov"))
    assert code == 2 and "differ from the rows it was made on" in err
    code, _, err = run(capsys, "eval", str(tmp_path / "run"), "--windows", "2", "--overlay", str(tmp_path / "ov"))
    assert code == 2 and "was made on" in err and "--force" in err


def test_overlay_show_verify_merge_and_drop(indexed_run, tmp_path, capsys):
    """Two overlays merged into a run equal serving the run with both (bit for bit, and the
    merged run replays); verify names a misfit; drop deletes only overlay folders."""
    write = ["memory", "write", str(indexed_run), "--steps", "5", "--force", "--overlay"]
    assert run(capsys, *write, "--text", "the queen music valley", "--out", str(tmp_path / "a"))[0] == 0
    assert run(capsys, *write, "--text", "river castle fleet harbor", "--out", str(tmp_path / "b"))[0] == 0
    code, out, _ = run(capsys, "memory", "overlay", "show", str(tmp_path / "a"))
    shown = json.loads(out)
    assert code == 0 and shown["op"] == "write" and shown["changed_rows"] > 0
    assert shown["parent"]["weights_sha256"] and shown["texts"] == ["the queen music valley"]
    code, out, _ = run(capsys, "memory", "overlay", "verify", str(tmp_path / "a"), "--run", str(indexed_run))
    assert code == 0 and "fits" in out
    code, out, _ = run(capsys, "memory", "overlay", "merge", str(tmp_path / "a"), str(tmp_path / "b"),
                       "--run", str(indexed_run), "--out", str(tmp_path / "merged"))
    assert code == 0 and "merged 2 overlay(s)" in out
    argv = ["eval", "--windows", "4"]
    served = run(capsys, argv[0], str(indexed_run), *argv[1:], "--overlay", str(tmp_path / "a"), str(tmp_path / "b"))
    merged = run(capsys, argv[0], str(tmp_path / "merged"), *argv[1:])
    assert served[0] == merged[0] == 0 and served[1].split(":", 1)[-1] == merged[1].split(":", 1)[-1]
    assert run(capsys, "memory", "replay", str(tmp_path / "merged"))[0] == 0
    code, _, err = run(capsys, "memory", "overlay", "verify", str(tmp_path / "a"), "--run", str(tmp_path / "merged"))
    assert code == 2 and "was made on" in err
    code, _, err = run(capsys, "memory", "overlay", "drop", str(indexed_run))
    assert code == 2 and "is not an overlay" in err and (indexed_run / "run.json").is_file()
    assert run(capsys, "memory", "overlay", "drop", str(tmp_path / "b"))[0] == 0 and not (tmp_path / "b").exists()
