"""The first five minutes with an exported run, as a transformers user spends them: a fresh
process that never imported engram loads the folder, calls the model, runs a default
pipeline, streams, and generation stops at eos and at the context length."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from engram.cli.main import main

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "folder"
    assert main(["export-hf", str(trained_run), "--out", str(out)]) == 0
    return out


def test_the_folder_carries_the_special_ids_and_the_loader_modules(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    config = json.loads((exported / "config.json").read_text())
    generation = json.loads((exported / "generation_config.json").read_text())
    for role in ("bos", "eos", "pad"):
        expected = getattr(tok, f"{role}_token_id")
        assert expected is not None and config[f"{role}_token_id"] == generation[f"{role}_token_id"] == expected
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_engram.EngramForCausalLM"
    for shim in ("configuration_engram.py", "modeling_engram.py"):
        assert "import" in (exported / shim).read_text() and len((exported / shim).read_text().splitlines()) == 3


def fresh_python(code: str) -> dict:
    """Run `code` in a new interpreter (nothing imported); it prints one JSON line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_fresh_process_loads_calls_pipes_and_streams_it(exported):
    from engram.model.io import load_model

    got = fresh_python(f"""
        import json, sys, threading
        import torch
        from transformers import (AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer, pipeline)
        before = "engram" in sys.modules
        model = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(exported)!r})
        ids = tok("the river city north", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits  # a plain call: use_cache from the config
        pipe = pipeline("text-generation", model={str(exported)!r}, trust_remote_code=True)
        text = pipe("the river")[0]["generated_text"]  # defaults: up to 256 new tokens, past the context
        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        thread = threading.Thread(target=model.generate, kwargs=dict(input_ids=ids, max_new_tokens=12,
                                                                        do_sample=False, streamer=streamer))
        thread.start()
        streamed = "".join(streamer)
        thread.join()
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
        long = model.generate(ids, max_new_tokens=10_000, do_sample=False)
        print(json.dumps({{"engram_before": before, "logits": logits[0, -1].tolist(), "ids": ids[0].tolist(),
                          "pipeline": text, "streamed": streamed,
                          "greedy": tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True),
                          "long": long[0].tolist(), "eos": tok.eos_token_id,
                          "max_len": model.config.max_position_embeddings}}))
    """)
    assert not got["engram_before"]
    ours = load_model(exported).eval()
    with torch.no_grad():
        want = ours(torch.tensor([got["ids"]])).logits[0, -1]
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=0, atol=1e-5)
    assert got["pipeline"].startswith("the river")
    assert got["streamed"] == got["greedy"]
    long = got["long"]
    new = long[len(got["ids"]):]
    if got["eos"] in new:  # stopped at the first eos
        assert new.index(got["eos"]) == len(new) - 1
    else:  # or at the context length, without an error
        assert len(long) == got["max_len"]


def test_without_trust_remote_code_the_error_names_the_way(exported):
    done = subprocess.run([sys.executable, "-c", f"from transformers import AutoModelForCausalLM; "
                                                 f"AutoModelForCausalLM.from_pretrained({str(exported)!r})"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "trust_remote_code" in done.stderr


TASK = """task: engram_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
DOCS = [{"context": "the river city", "choices": ["north", "music", "bridge"], "label": 0},
        {"context": "the king and the", "choices": ["queen", "harbor", "valley"], "label": 0},
        {"context": "science history war", "choices": ["trade", "island", "castle"], "label": 1},
        {"context": "the army and the fleet", "choices": ["harbor", "church", "school"], "label": 0}]


def test_lm_eval_command_line_scores_the_folder_as_engram_does(exported, tmp_path):
    """`lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True` on a local
    multiple-choice task: every log-likelihood it reports equals engram's own for the same
    token ids (lm-eval's split of context and continuation)."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from engram.model.io import load_model

    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(d) for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "engram_local.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={exported},trust_remote_code=True", "--tasks", "engram_local",
                           "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "2",
                           "--output_path", str(tmp_path / "out"), "--log_samples"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_engram_local_*.jsonl")
               for line in f.read_text().splitlines()]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["engram_local"]
    assert len(samples) == len(DOCS)
    tok, model = AutoTokenizer.from_pretrained(exported), load_model(exported).eval()
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc, ours = sample["doc"], []
        for choice in doc["choices"]:
            context = tok.encode(doc["context"], add_special_tokens=False)
            whole = tok.encode(doc["context"] + " " + choice, add_special_tokens=False)
            continuation = whole[len(context):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            ours.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation)))
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == doc["label"])
    assert results["acc,none"] == pytest.approx(correct / len(DOCS))
