"""No command destroys what it did not create, and faults are one clear line: one test per
class of the cases a new (or unlucky) user meets. Every refused command exits 2 (a fault: 1)
with a message naming the path and the way out, and the files it pointed at are byte for byte
what they were."""

import hashlib
import shutil
from pathlib import Path

import pytest

from engram.cli.main import main
from engram.runs import OutputError, check_output
from tests.faults import small_disk


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` and the sha256 of its bytes."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def refused(capsys, argv, *needles, code=2):
    capsys.readouterr()  # what earlier commands printed
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("engram: error: "), err
    err = err.splitlines()[-1]  # one line (above it at most a library's progress bar)
    for needle in needles:
        assert needle in err, err
    return err


def test_an_output_that_is_inside_or_contains_the_source_is_refused(tmp_path):
    src = tmp_path / "run"
    (src / "sub").mkdir(parents=True)
    with pytest.raises(OutputError, match="is the source"):
        check_output(src, sources=[src])
    with pytest.raises(OutputError, match="is inside the source"):
        check_output(src / "sub" / "new", sources=[src])
    with pytest.raises(OutputError, match="contains the source"):
        check_output(tmp_path, sources=[src])
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", sources=[src]) == (tmp_path / "empty").resolve()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not an earlier export"):
        check_output(tmp_path / "mine", what="export", own=lambda p: False, overwrite=True)
    with pytest.raises(OutputError, match="give --overwrite"):
        check_output(tmp_path / "mine", what="export", own=lambda p: True)


def test_export_hf_never_replaces_the_run_or_a_users_folder(trained_run, tmp_path, capsys):
    before = tree(trained_run)
    refused(capsys, ["export-hf", str(trained_run), "--out", str(trained_run)], "is the source", "another --out")
    refused(capsys, ["export-hf", str(trained_run), "--out", str(trained_run / "hf")], "inside the source")
    assert tree(trained_run) == before
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("three years of work")
    refused(capsys, ["export-hf", str(trained_run), "--out", str(users)], "not an earlier export-hf folder")
    assert (users / "thesis.tex").read_text() == "three years of work"
    out = tmp_path / "hf"
    assert main(["export-hf", str(trained_run), "--out", str(out)]) == 0
    refused(capsys, ["export-hf", str(trained_run), "--out", str(out)], "--overwrite")
    assert main(["export-hf", str(trained_run), "--out", str(out), "--overwrite"]) == 0


def test_train_into_an_existing_run_without_resume_is_refused(trained_run, small_dataset, capsys):
    before = tree(trained_run)
    refused(capsys, ["train", "--out", str(trained_run), "--data", str(small_dataset), "--max-steps", "2",
                     "--batch-size", "4", "--seq-len", "32"], "existing run", "--resume")
    assert tree(trained_run) == before  # metrics.jsonl and every checkpoint as they were


@pytest.fixture(scope="module")
def indexed_run(trained_run, tmp_path_factory):
    """A copy of the trained run with its row index (edits need one; the shared run stays as is)."""
    run = tmp_path_factory.mktemp("indexed") / "run"
    shutil.copytree(trained_run, run)
    assert main(["memory", "index", str(run)]) == 0
    return run


def test_offload_and_edits_stay_out_of_their_source(trained_run, tmp_path, capsys):
    before = tree(trained_run)
    refused(capsys, ["offload", str(trained_run), "--out", str(trained_run / "tables")], "inside the source")
    refused(capsys, ["memory", "forget", str(trained_run), "--text", "the river city", "--out",
                     str(trained_run / "forgot")], "inside the source")
    refused(capsys, ["memory", "write", str(trained_run), "--text", "the river city", "--overlay", "--out",
                     str(trained_run.parent)], "contains the source")
    assert tree(trained_run) == before
    assert main(["offload", str(trained_run), "--out", str(tmp_path / "t")]) == 0
    refused(capsys, ["offload", str(trained_run), "--out", str(tmp_path / "t")], "earlier offload folder",
            "--overwrite")


def test_a_write_that_makes_rows_non_finite_writes_nothing(indexed_run, tmp_path, capsys):
    out = tmp_path / "nan"
    refused(capsys, ["memory", "write", str(indexed_run), "--text", "the river city north empire", "--force",
                     "--lr", "1e20", "--steps", "3", "--out", str(out)], "non-finite", "lower --lr")
    assert not out.exists()


def test_an_edit_names_a_corrupt_newest_checkpoint_and_falls_back_only_when_told(indexed_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(indexed_run, run)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    argv = ["memory", "forget", str(run), "--text", "the river city", "--force"]
    refused(capsys, argv + ["--out", str(tmp_path / "a")], newest.name, "--fall-back")
    assert main(argv + ["--out", str(tmp_path / "b"), "--fall-back"]) == 0
    older = sorted((run / "checkpoints").iterdir())[-2]
    assert f"edited {older}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["export-hf", "offload", "forget"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_output(indexed_run, tmp_path, capsys, command):
    argv = {"export-hf": ["export-hf", str(indexed_run)], "offload": ["offload", str(indexed_run)],
            "forget": ["memory", "forget", str(indexed_run), "--text", "the river city", "--force"]}[command]
    with small_disk(tmp_path / "disk", kib=128) as (disk, how):
        refused(capsys, argv + ["--out", str(disk / "out")], "No space left on device", code=1)
        assert list(disk.iterdir()) == [], how  # neither the folder nor its staging copy


def test_artifacts_of_another_model_are_refused_by_name(trained_run, small_dataset, tmp_path, capsys):
    """Tables offloaded from another run, and an exported folder whose hash multipliers were
    edited, give plausible numbers for the wrong model: both are refused."""
    import json

    from engram.runs import RunError, open_run

    other = tmp_path / "other"
    assert main(["train", "--out", str(other), "--data", str(small_dataset), "--max-steps", "2", "--batch-size", "4",
                 "--seq-len", "32", "--seed", "1"]) == 0
    assert main(["offload", str(other), "--out", str(tmp_path / "other_tables")]) == 0
    with pytest.raises(RunError, match="offloaded from .*not from this model's"):
        open_run(trained_run, tables=tmp_path / "other_tables")
    assert main(["offload", str(trained_run), "--out", str(tmp_path / "tables")]) == 0
    assert open_run(trained_run, tables=tmp_path / "tables").model is not None  # its own tables serve

    hf = tmp_path / "hf"
    assert main(["export-hf", str(trained_run), "--out", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    layer = next(iter(config["hash_layout"]["multipliers"]))
    config["hash_layout"]["multipliers"][layer][0] += 2  # still odd: only the checksum can tell
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hash layout fields were changed after it was saved"):
        open_run(hf)
