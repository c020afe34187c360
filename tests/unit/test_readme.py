"""The README's front door works: its Python quickstart and its CLI example run verbatim.

Each runnable block is the fenced block right after a marker comment in README.md:
`<!-- quickstart -->` (```python) and `<!-- cli-example -->` (```bash). Nothing in them is
substituted: they read the user's text from `my_texts/` and write under `data/` and `runs/`
relative to the working directory, so each test makes a fresh folder, writes a few generated
`my_texts/*.txt` files there (no network), and runs the block inside it. The blocks themselves
use small sizes (a 300-id BPE, 30 steps), so both tests together take well under a minute on
two CPU cores. The assertions are on numbers: the validation loss is finite and falls, the
reopened model reproduces the run's last loss, and decoding returns new tokens. The quickstart's
names `summary`, `model`, `tok` and `new` are read back after it runs.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
WORDS = ("the river city north empire king queen music science history war trade island mountain "
         "language church school river valley bridge army fleet harbor castle").split()


def readme_block(marker: str, lang: str) -> str:
    """The fenced ```lang block that follows `<!-- marker -->` in README.md."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker} -->\s*\n```{lang}\n(.*?)\n```", text, re.S)
    assert found, f"README.md has no ```{lang} block right after <!-- {marker} -->"
    return found.group(1)


def write_texts(folder: Path, n: int = 60, seed: int = 0) -> None:
    """`n` small documents of random words (the user's `my_texts/`)."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(40, 120))]
        (folder / f"doc{i:03d}.txt").write_text(f"Document {i}. " + " ".join(words) + ".", encoding="utf-8")


def eval_losses(run: Path) -> list[float]:
    """Validation losses the run logged, in step order."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["val_loss"] for r in sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r["step"])]


def test_readme_blocks_are_short_and_the_ci_runs_the_readme_test_command():
    assert len(readme_block("quickstart", "python").strip().splitlines()) <= 12
    assert len([l for l in readme_block("cli-example", "bash").splitlines() if l.strip()]) <= 5
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 160
    # .ci/run must run the README's own test command, verbatim
    test_cmd = 'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && .venv/bin/python -m pytest'
    assert f"```bash\n{test_cmd}\n```" in README.read_text(encoding="utf-8")
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_quickstart_trains_reopens_and_generates(tmp_path, monkeypatch, capsys):
    code = readme_block("quickstart", "python")
    write_texts(tmp_path / "my_texts")
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme_quickstart"}
    exec(compile(code, f"{README}:quickstart", "exec"), ns)
    out = capsys.readouterr().out

    summary = ns["summary"]
    first, final = summary["first_val_loss"], summary["final_val_loss"]
    losses = eval_losses(tmp_path / "runs" / "quick")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert losses[0] == pytest.approx(first) and losses[-1] == pytest.approx(final)
    assert final < first - 0.5, f"validation loss did not fall: {losses}"
    assert f"val loss {first:.2f} -> {final:.2f} nats/token" in out

    model, tok, new = ns["model"], ns["tok"], ns["new"]
    assert model.config.vocab_size == tok.get_vocab_size() <= 300  # the trained run, reopened
    assert len(new) == 20 and all(0 <= t < model.config.vocab_size for t in new), new
    text = tok.decode(new)
    assert text.strip(), f"greedy decoding gave only whitespace: {text!r}"
    assert out.rstrip().endswith(("The river" + text).rstrip())


def test_cli_example_trains_evaluates_and_generates(tmp_path):
    lines = [l for l in readme_block("cli-example", "bash").splitlines() if l.strip()]
    write_texts(tmp_path / "my_texts")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("ENGRAM_DEBUG", None)
    outputs = {}
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        outputs[line.split()[1]] = done.stdout  # by subcommand: data, train, eval, generate, info

    run = tmp_path / "runs" / "mine"
    losses = eval_losses(run)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.5, f"validation loss did not fall: {losses}"
    assert f"validation loss {losses[0]:.4f} -> {losses[-1]:.4f}" in outputs["train"]
    # `engram eval` reopens the newest checkpoint and gets the run's last loss: the validation
    # split (about 2.7k tokens) holds fewer windows than either evaluation's cap, so both see all.
    got = re.search(r"step_(\d+): val loss ([0-9.]+)", outputs["eval"])
    assert got, outputs["eval"]
    assert int(got.group(1)) == 30 and float(got.group(2)) == pytest.approx(losses[-1], abs=1e-4)
    sample = outputs["generate"].rstrip("\n")
    assert sample.startswith("The river") and len(sample) > len("The river") + 5, sample
    assert "hash layout: Engram layers [1]" in outputs["info"]
