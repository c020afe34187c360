"""Experiments: fair arms (equal total / active parameters), resumable, results written."""

import dataclasses
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from engram import count_params
from engram.cli.main import main
from engram.experiments import summary as _experiment_summary
from engram.experiments.comparisons import engram_vs_moe_configs, run_engram_vs_moe
from engram.data.dataset import PreparedData
from engram.train.loop import TrainConfig


def test_arms_are_iso_parameter(small_dataset):
    configs = engram_vs_moe_configs(TrainConfig(table_optimizer="sparse_adam"), PreparedData.open(small_dataset), 0.5)
    n = {k: count_params(c) for k, c in configs.items()}
    assert n["moe"]["engram"] == 0 and n["engram"]["engram"] > 0 and configs["dense"].moe is None
    assert abs(n["engram"]["total"] / n["moe"]["total"] - 1) < 0.005
    for arm in ("engram", "dense"):
        assert abs(n[arm]["active"] / n["moe"]["active"] - 1) < 0.005, arm


def test_experiment_runs_resumes_and_writes_results(small_dataset, tmp_path):
    messages = []
    first = run_engram_vs_moe(tmp_path, small_dataset, seeds=(0, 1), steps=2, log=messages.append)
    assert set(first["final_val_loss"]) == {"moe", "engram", "dense"}
    assert all(len(v) == 2 for v in first["final_val_loss"].values())
    assert (tmp_path / "engram_vs_moe.png").is_file()
    reads = first["row_reads"]["engram"]["1"]  # reads per used row of the Engram arm (seed 0's batches)
    cfg = TrainConfig()
    e = json.loads(next((tmp_path / "runs").glob("rho0.*_2steps_seed0/run.json")).read_text())["model"]["engram"]
    heads = (e["max_ngram_size"] - 1) * e["n_head_per_ngram"]
    assert set(first["row_reads"]) == {"engram"}
    assert reads["reads"] == 2 * cfg.batch_size * cfg.seq_len * heads  # steps x positions x hash heads
    assert 0 < reads["used_rows"] <= reads["table_rows"] and reads["reads_per_used_row"] >= 1
    assert json.loads((tmp_path / "engram_vs_moe.json").read_text())["final_val_loss"] == first["final_val_loss"]
    messages.clear()
    again = run_engram_vs_moe(tmp_path, small_dataset, seeds=(0, 1), steps=2, log=messages.append)
    assert not any("training" in m for m in messages)  # finished runs are not trained again
    assert again["final_val_loss"] == first["final_val_loss"]
    messages.clear()
    zero = run_engram_vs_moe(tmp_path, small_dataset, seeds=(0, 1), steps=2, table_init_std=1.0,
                             log=messages.append)  # the same planned model, rows N(0, 1), beside the zero rows
    trained = [m.split(" -> ")[0] for m in messages if m.startswith("training")]
    assert trained == ["training rho0.75_init1, seed 0", "training rho0.75_init1, seed 1"]
    assert zero["final_val_loss"]["engram"] == first["final_val_loss"]["engram"]
    assert zero["params"]["engram_init1"] == zero["params"]["engram"]
    assert set(zero["row_reads"]) == {"engram", "engram_init1"} and set(zero["init_vs_reference"]) >= {"mean", "std"}
    saved = json.loads((tmp_path / "engram_vs_moe_init1.json").read_text())
    assert (saved["table_init_std"], saved["reference_init"]) == (1.0, 0.0)
    assert (tmp_path / "engram_vs_moe_init1.png").is_file()
    run = json.loads((tmp_path / "runs" / "rho0.75_init1_2steps_seed0" / "run.json").read_text())
    assert run["model"]["engram"]["table_init_std"] == 1.0
    run = json.loads((tmp_path / "runs" / "rho0.75_2steps_seed0" / "run.json").read_text())
    assert run["model"]["engram"]["table_init_std"] == 0.0  # the default: rows start at zero
    assert json.loads((tmp_path / "engram_vs_moe.json").read_text())["final_val_loss"] == first["final_val_loss"]


def test_rho_sweep_reports_the_achieved_rho(small_dataset, tmp_path):
    from engram.experiments.comparisons import run_rho_sweep

    result = run_rho_sweep(tmp_path, small_dataset, rhos=(0.5, 1.0), seeds=(0,), steps=2, log=lambda *a: None)
    points = {p["rho_requested"]: p for p in result["points"]}
    assert points[1.0]["rho"] == 1.0 and points[1.0]["table_params"] == 0 and points[1.0]["experts"] == 8
    assert abs(points[0.5]["rho"] - 0.5) < 1 / 6 and points[0.5]["table_params"] > 0
    assert (tmp_path / "rho_sweep.png").is_file()
    saved = json.loads((tmp_path / "rho_sweep.json").read_text())
    assert len(saved["rho_to_final_val_loss"]) == 2
    messages = []
    zero = run_rho_sweep(tmp_path, small_dataset, rhos=(0.5, 1.0), seeds=(0,), steps=2, table_init_std=1.0,
                         log=messages.append)
    assert [m.split(",")[0] for m in messages if m.startswith("training")] == ["training rho0.5_init1"]
    by_init = {(p["rho_requested"], p["table_init_std"]): p for p in zero["points"]}
    assert set(by_init) == {(0.5, 0.0), (1.0, 0.0), (0.5, 1.0)}  # the MoE has no table to start otherwise
    assert by_init[(0.5, 1.0)]["table_params"] == points[0.5]["table_params"]
    assert by_init[(0.5, 1.0)]["paired_vs_reference_init"]["by_seed"] == [
        by_init[(0.5, 1.0)]["final_val_loss"][0] - points[0.5]["final_val_loss"][0]]
    assert len(json.loads((tmp_path / "rho_sweep_init1.json").read_text())["rho_to_final_val_loss"]) == 3
    assert (tmp_path / "rho_sweep_init1.png").is_file() and "vs rows start at 0" in _experiment_summary(zero)


def test_ablation_arms_change_one_thing_each(small_dataset):
    from engram.experiments.ablations import ablation_configs

    arms = ablation_configs(TrainConfig(table_optimizer="sparse_adam"), PreparedData.open(small_dataset))
    full = arms["full"]
    assert arms["no_engram"] == dataclasses.replace(full, engram=None)
    changed = {name: {f.name for f in dataclasses.fields(full.engram)
                      if getattr(c.engram, f.name) != getattr(full.engram, f.name)}
               for name, c in arms.items() if c.engram is not None and name != "m4"}
    assert "compressed_vocab_size" in changed.pop("no_compression") <= {"compressed_vocab_size", "pad_id"}
    assert changed == {"full": set(), "no_gate": {"use_gate"}, "no_short_conv": {"use_short_conv"},
                       "capacity_1": {"single_row"}, "doc_reset": {"reset_id"}, "layer_0": {"layer_ids"},
                       "layer_2": {"layer_ids"}, "layer_3": {"layer_ids"},
                       "over_encoding": {"layer_ids", "use_gate", "use_short_conv"}}
    assert arms["over_encoding"].engram.layer_ids == (0,)  # on the token embedding, before block 0
    assert arms["no_compression"].engram.compressed_vocab_size == full.vocab_size > full.engram.compressed_vocab_size
    assert arms["m4"].n_streams == 4  # the Engram modules take the model's streams
    assert arms["m4"].engram == full.engram and arms["m4_no_engram"].n_streams == 4
    assert all(dataclasses.replace(c, engram=None, n_streams=1) == arms["no_engram"] for c in arms.values())


def test_ablations_and_table_size_run_and_share_runs(small_dataset, tmp_path):
    from engram.experiments.ablations import run_ablations, run_table_size

    messages = []
    result = run_ablations(tmp_path, small_dataset, seeds=(0,), steps=2, log=messages.append)
    arms = result["arms"]
    assert arms["full"]["delta_vs_full"] == 0 and arms["capacity_1"]["params"]["table_rows"] == 8
    assert arms["no_engram"]["params"]["engram"] == 0
    run = json.loads((tmp_path / "runs" / "no_compression_2steps_seed0" / "run.json").read_text())
    with safe_open(str(_newest(tmp_path / "runs" / "no_compression_2steps_seed0") / "model.safetensors"), "pt") as f:
        assert f.get_tensor("compression").tolist() == list(range(run["model"]["vocab_size"]))  # raw ids
    assert (tmp_path / "ablations.png").is_file() and (tmp_path / "ablations.json").is_file()
    messages.clear()
    sweep = run_table_size(tmp_path, small_dataset, rows_per_head=(64, 16384), seeds=(0,), steps=2,
                           log=messages.append)
    trained = sorted(m.split(",")[0] for m in messages if m.startswith("training"))
    assert trained == ["training oe_rows64", "training rows64"]  # 16384 is the preset: those runs are reused
    assert sweep["arms"]["rows16384"]["final_val_loss"] == arms["full"]["final_val_loss"]
    assert sweep["arms"]["oe_rows16384"]["final_val_loss"] == arms["over_encoding"]["final_val_loss"]
    assert len(sweep["slots_to_final_val_loss"]) == 2 and (tmp_path / "table_size.png").is_file()
    # how often training read the average used row: every position reads one row per head
    reads = sweep["arms"]["rows64"]["row_reads"]["1"]
    heads = len(run["model"]["engram"]["rows_per_head"]) * run["model"]["engram"]["n_head_per_ngram"]
    assert reads["reads"] == 2 * 16 * 128 * heads  # 2 steps of 16 x 128 positions
    assert reads["table_rows"] == sweep["arms"]["rows64"]["params"]["table_rows"] >= reads["used_rows"]
    assert 1 < reads["reads_per_used_row"] == reads["reads"] / reads["used_rows"]
    big = sweep["arms"]["rows16384"]["row_reads"]["1"]
    assert big["reads"] == reads["reads"] and big["reads_per_used_row"] < reads["reads_per_used_row"]
    assert sweep["arms"]["no_engram"]["row_reads"] is None
    one = sweep["arms"]["capacity_1"]["row_reads"]["1"]  # every position reads row 0 of each head
    assert one["used_rows"] == one["table_rows"] == heads and one["reads_per_used_row"] == 2 * 16 * 128
    # the default tables start at zero: exactly the rows training read have moved
    with safe_open(str(_newest(tmp_path / "runs" / "rows64_2steps_seed0") / "model.safetensors"), "pt") as f:
        table = f.get_tensor("blocks.1.engram.table.weight")
    assert int(table.any(1).sum()) == sweep["arms"]["rows64"]["row_reads"]["1"]["used_rows"] < len(table)
    # N(0, 1) tables beside the zero ones, paired by seed; the reference arm is reused
    messages.clear()
    zero = run_table_size(tmp_path, small_dataset, rows_per_head=(64,), over_encoding_rows=(), table_init_std=1.0,
                          seeds=(0,), steps=2, log=messages.append)
    assert sorted(m.split(",")[0] for m in messages if m.startswith("training")) == ["training rows64_init1"]
    assert set(zero["init_vs_reference"]) == {"rows64"} and (tmp_path / "table_size_init1.png").is_file()
    assert json.loads((tmp_path / "table_size_init1.json").read_text())["table_init_std"] == 1.0
    z = zero["arms"]["rows64_init1"]
    assert zero["slots_to_final_val_loss"] == {str(z["params"]["table_rows"]): z["mean"]}
    assert zero["init_vs_reference"]["rows64"]["mean"] == z["mean"] - sweep["arms"]["rows64"]["mean"]
    # some ablations, every table starting N(0, 1); the MoE (no table) is the same run as before
    messages.clear()
    zab = run_ablations(tmp_path, small_dataset, seeds=(0,), steps=2, arms=("full", "no_gate", "no_engram"),
                        table_init_std=1.0, log=messages.append)
    trained = sorted(m.split(",")[0] for m in messages if m.startswith("training"))
    assert trained == ["training full_init1", "training no_gate_init1"]
    assert set(zab["arms"]) == {"full_init1", "no_gate_init1", "no_engram"} and zab["reference"] == "full_init1"
    assert zab["arms"]["full_init1"]["delta_vs_full"] == 0
    assert zab["arms"]["no_engram"]["final_val_loss"] == arms["no_engram"]["final_val_loss"]
    e = json.loads((tmp_path / "runs" / "no_gate_init1_2steps_seed0" / "run.json").read_text())["model"]["engram"]
    assert e["table_init_std"] == 1.0 and e["use_gate"] is False
    assert (tmp_path / "ablations_init1.png").is_file() and (tmp_path / "ablations.json").is_file()
    with pytest.raises(ValueError, match="must include 'full'"):
        run_ablations(tmp_path, small_dataset, seeds=(0,), steps=2, arms=("no_gate",), log=messages.append)
    with pytest.raises(ValueError, match="got full, no_such_arm"):
        run_ablations(tmp_path, small_dataset, seeds=(0,), steps=2, arms=("full", "no_such_arm"), log=messages.append)
    lines = _experiment_summary(result).splitlines()
    assert len(lines) == len(arms) and lines[0].startswith("full") and "+0.0000 vs full" in lines[0]
    from engram.experiments.ablations import run_boundary_reset

    messages.clear()
    reset = run_boundary_reset(tmp_path, small_dataset, seeds=(0,), steps=2, log=messages.append)
    assert not [m for m in messages if m.startswith("training")]  # both arms' runs are the ablation's own
    assert reset["arms"]["doc_reset"]["final_val_loss"] == arms["doc_reset"]["final_val_loss"]
    assert (tmp_path / "boundary_reset.json").is_file() and (tmp_path / "boundary_reset.png").is_file()


def test_a_run_folder_of_another_model_or_other_data_is_refused(small_dataset, tmp_path):
    from engram.experiments.ablations import run_ablations

    run_engram_vs_moe(tmp_path, small_dataset, seeds=(0,), steps=2, rho=0.5, log=lambda *a: None)
    (tmp_path / "runs" / "full_2steps_seed0").mkdir()
    other = tmp_path / "runs" / "moe_2steps_seed0" / "run.json"
    (tmp_path / "runs" / "full_2steps_seed0" / "run.json").write_text(other.read_text())
    with pytest.raises(ValueError, match="another model"):
        run_ablations(tmp_path, small_dataset, seeds=(0,), steps=2, log=lambda *a: None)
    run = json.loads(other.read_text())
    run["data"]["tokenizer_sha256"] = "0" * 64  # as if trained on another dataset
    other.write_text(json.dumps(run))
    with pytest.raises(ValueError, match="trained on other data"):
        run_engram_vs_moe(tmp_path, small_dataset, seeds=(0,), steps=2, rho=0.5, log=lambda *a: None)


def test_knowledge_probes_and_entity_gates(titled_dataset, tmp_path):
    from engram.experiments.probes import run_entity_gates, run_knowledge_probes

    facts = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima")]
    res = run_knowledge_probes(tmp_path, titled_dataset, seeds=(0, 1), steps=2, facts=facts, n_distractors=3,
                               log=lambda *a: None)
    assert res["facts"] == {"stated": 2, "unstated": 2}
    scores = res["scores"]
    assert set(scores["full"]) == {"closed_book", "closed_book_engram_zeroed", "in_context", "in_context_engram_zeroed"}
    assert set(scores["no_engram"]) == {"closed_book", "in_context"}
    acc = scores["full"]["closed_book"]["stated"]["accuracy"]
    assert len(acc["by_seed"]) == 2 and all(0 <= a <= 1 for a in acc["by_seed"])
    calibrated = scores["no_engram"]["in_context"]["unstated"]["calibrated_accuracy"]["by_seed"]
    assert len(calibrated) == 2 and all(0 <= a <= 1 for a in calibrated)
    assert set(res["kept_fraction"]["calibrated_accuracy"]) == {"stated", "unstated"}
    assert (tmp_path / "knowledge_probes.png").is_file()

    gates = run_entity_gates(tmp_path, titled_dataset, seeds=(0, 1), steps=2, log=lambda *a: None)
    layer = gates["layers"]["1"]
    assert layer["tokens"]["entity_last"] > 0 and layer["tokens"]["other"] > 0
    assert all(0 <= layer[c]["mean"] <= 1 for c in ("entity_first", "entity_last", "other"))
    assert Path(gates["example"]["html"]).is_file() and (tmp_path / "entity_gates.png").is_file()
    assert "chance 0.25" in _experiment_summary(res) and "layer 1: mean gate" in _experiment_summary(gates)


def test_entity_gates_need_titles(small_dataset, tmp_path):
    from engram.experiments.probes import run_entity_gates

    with pytest.raises(ValueError, match="no document titles"):
        run_entity_gates(tmp_path, small_dataset, seeds=(0,), steps=2, log=lambda *a: None)


def _newest(run_dir):
    return sorted((run_dir / "checkpoints").iterdir())[-1]


def test_cli_names_the_known_experiments(capsys):
    assert main(["experiment", "no_such_thing", "--data", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no_such_thing'" in err and "knowledge_probes" in err


def test_cli_rejects_bad_table_sizes(capsys):
    assert main(["experiment", "table_size", "--data", "x", "--rows-per-head", "1024,16384"]) == 2
    assert ("argument --rows-per-head: takes its values as separate words (e.g. 1024 16384), not comma-separated"
            in capsys.readouterr().err)
    assert main(["experiment", "table_size", "--data", "x", "--rows-per-head", "1024", "many"]) == 2
    assert "argument --rows-per-head: needs an integer >= 1, got 'many'" in capsys.readouterr().err
    assert main(["experiment", "table_size", "--data", "x", "--over-encoding-rows", "0"]) == 2
    assert "argument --over-encoding-rows: needs an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["experiment", "table_size", "--data", "x", "--table-init-std", "-1"]) == 2
    assert "needs a number >= 0" in capsys.readouterr().err
    assert main(["experiment", "boundary_reset", "--data", "x", "--table-init-std", "0"]) == 2
    assert ("--table-init-std is an option of ablations, engram_vs_moe, rho_sweep, table_size, not of "
            "boundary_reset" in capsys.readouterr().err)
    assert main(["experiment", "ablations", "--data", "x", "--rhos", "0.5"]) == 2
    assert "--rhos is an option of rho_sweep, not of ablations" in capsys.readouterr().err


def test_cli_passes_list_options_to_the_experiment(monkeypatch, tmp_path, capsys):
    """Arms, rhos, sizes and table sizes come from the command line as repeated words."""
    from engram import experiments

    (tmp_path / "tokens.json").write_text("{}")  # a dataset folder, as far as the CLI looks
    seen = {}
    monkeypatch.setattr(experiments, "run", lambda name, out, data, **kw: seen.update(name=name, **kw) or
                        {"experiment": name})
    monkeypatch.setattr(experiments, "summary", lambda result: "ok")
    for argv in (["rho_sweep", "--rhos", "0.25", "0.5", "--rhos", "1"], ["ablations", "--arms", "full", "no_gate"],
                 ["table_size", "--rows-per-head", "64", "128", "--no-over-encoding"],
                 ["knowledge_capacity", "--sizes", "d64", "--rho", "0.5"]):
        seen.clear()
        assert main(["experiment", *argv, "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--seeds", "2"]) == 0
        assert seen.pop("seeds") == (0, 1) and seen.pop("name") == argv[0]
        assert seen == {"rho_sweep": {"rhos": (0.25, 0.5, 1.0)}, "ablations": {"arms": ("full", "no_gate")},
                        "table_size": {"rows_per_head": (64, 128), "over_encoding_rows": ()},
                        "knowledge_capacity": {"sizes": ("d64",), "rho": 0.5}}[argv[0]]


def test_knowledge_capacity_runs_probes_and_controls(tmp_path):
    from engram.experiments.knowledge import knowledge_configs, run_knowledge_capacity
    from engram.data.dataset import prepare_dataset

    data = prepare_dataset(tmp_path / "bios", corpus="synthetic-bios", people=12, vocab_size=2048,
                           log=lambda *a: None)  # a BPE of this size keeps the in-context prompts < 256 tokens
    res = run_knowledge_capacity(tmp_path, data, sizes=("d64",), seeds=(0,), steps=2, max_people=6,
                                 log=lambda *a: None)
    arms = res["sizes"]["d64"]
    assert set(arms) == {"moe", "engram", "over_encoding", "capacity_1", "table_x0.0625", "table_x4", "engram_init1",
                         "over_encoding_init1"}
    run = json.loads((tmp_path / "runs" / "knowledge_d64_over_encoding_init1_2steps_seed0" / "run.json").read_text())
    assert run["model"]["engram"]["table_init_std"] == 1.0 and run["model"]["engram"]["use_gate"] is False
    smaller = knowledge_configs(TrainConfig(table_optimizer="sparse_adam"), PreparedData.open(data), "d64")
    assert set(smaller) == {"moe", "engram", "over_encoding", "engram_init1", "over_encoding_init1"}  # no controls
    moe, engram = arms["moe"], arms["engram"]
    assert abs(engram["params"]["total"] / moe["params"]["total"] - 1) < 0.01  # the planner's iso-parameter arm
    assert "engram_zeroed" in engram and "engram_zeroed" not in moe
    for c in ("bio", "qa_trained", "qa_held_out", "in_context"):
        assert len(engram["as_trained"]["exact_match"][c]["by_seed"]) == 1
    assert moe["bits_minus_moe"]["mean"] == 0 and res["bits_max"] > 12 * 46
    assert (tmp_path / "knowledge_capacity.png").is_file()
    recall = json.loads((tmp_path / "runs" / "knowledge_d64_engram_2steps_seed0" / "recall.json").read_text())
    assert recall["as_trained"]["evaluated_people"] == 6 and recall["as_trained"]["people"] == 12
    assert "bits" in _experiment_summary(res)


def test_memory_edits_forgets_and_writes_on_the_knowledge_runs(tmp_path):
    from engram.experiments.memory_edits import run_memory_edits
    from engram.data.dataset import prepare_dataset

    data = prepare_dataset(tmp_path / "bios", corpus="synthetic-bios", people=12, vocab_size=2048,
                           log=lambda *a: None)
    res = run_memory_edits(tmp_path, data, seeds=(0,), steps=2, arms=("engram",), targets=1, others=3,
                           write_steps=2, log=lambda *a: None)
    arm = res["arms"]["engram"]
    assert (tmp_path / "runs" / "knowledge_d128_engram_2steps_seed0" / "memory_index" / "index.json").is_file()
    cells = arm["by_seed"][0]["cells"]
    assert {(c["op"], c["policy"]) for c in cells} == {(o, p) for o in ("forget", "write") for p in ("owned", "all")}
    forget_all = next(c for c in cells if c["op"] == "forget" and c["policy"] == "all")
    assert forget_all["rows"] == forget_all["addressed"] > 0  # "all" resets every row the biographies address
    assert all(0 <= c[k] <= 1 for c in cells for k in c if k.startswith(("target_", "others_", "answers_")))
    assert 0 < res["chance"] < 0.2 and (tmp_path / "memory_edits.png").is_file()
    assert "forget_owned" in _experiment_summary(res)


def test_long_context_runs_and_reports_by_task_and_length(tmp_path):
    from engram.experiments.long_context import run_long_context
    from engram.data.dataset import prepare_dataset

    data = prepare_dataset(tmp_path / "lc", corpus="long-context", examples=12, vocab_size=400, log=lambda *a: None)
    res = run_long_context(tmp_path, data, seeds=(0,), steps=2, seq_len=256, batch_size=2, log=lambda *a: None)
    cells = res["arms"]["engram"]["cells"]
    assert {k.split("@")[0] for k in cells} == {"mq_niah", "variable_tracking"}
    assert {int(k.split("@")[1]) for k in cells} == {256, 512, 1024}
    assert all(0 <= c["mean"] <= 1 and c["mean_prompt_tokens"] > 0 for c in cells.values())
    assert "minus_moe" in cells["mq_niah@256"] and (tmp_path / "long_context.png").is_file()


def test_retrofit_facts_arms_match_parameters_and_resume(tmp_path):
    pytest.importorskip("peft")
    from engram.data.dataset import prepare_dataset
    from engram.experiments.retrofit_facts import run_retrofit_facts

    data = prepare_dataset(tmp_path / "bios", corpus="synthetic-bios", people=16, vocab_size=2048,
                           log=lambda *a: None)
    kw = dict(seeds=(0,), steps=2, base_steps=2, written=4, untouched=4, rows_per_head=211, batch_size=4,
              seq_len=64, log=lambda *a: None)
    res = run_retrofit_facts(tmp_path, data, **kw)
    arms = res["arms"]
    assert set(arms) == {"engram", "engram_2rows", "lora"}
    engram, lora = arms["engram"]["trainable_parameters"], arms["lora"]["trainable_parameters"]
    assert abs(lora / engram - 1) < 0.1 and arms["engram_2rows"]["trainable_parameters"] < engram  # equal params
    for a in arms.values():
        run = a["by_seed"][0]
        assert 0 <= run["recall_written"] <= 1 and run["held_out"]["kl"] >= 0 and run["known"]["kl"] >= 0
    assert res["written_texts"] == 4 * 5 and (tmp_path / "retrofit_facts.png").is_file()
    done = tmp_path / "runs" / "retrofit_facts" / "lora_seed0.json"
    stamp = done.stat().st_mtime_ns
    again = run_retrofit_facts(tmp_path, data, **kw)  # resumes: the finished runs are read, not redone
    assert done.stat().st_mtime_ns == stamp and again["arms"]["lora"]["by_seed"] == arms["lora"]["by_seed"]
    assert "engram_minus_control" in _experiment_summary(res)


def test_overlay_capacity_writes_measures_and_resumes(tmp_path):
    """Each write is a saved overlay folder (its bytes grow with K), measured on a fresh
    parent with that folder applied; LoRA is compared at equal bytes and recall; resumes."""
    pytest.importorskip("peft")
    from engram.data.dataset import prepare_dataset
    from engram.experiments.overlay_capacity import run_overlay_capacity, summary
    from engram.memory.overlay import Overlay

    data = prepare_dataset(tmp_path / "bios", corpus="synthetic-bios", people=24, vocab_size=2048,
                           log=lambda *a: None)
    kw = dict(seeds=(0,), ks=(2, 6), ranks=(1, 4), overlay_lrs=(1e-1,), steps=3, base_steps=2, parent_steps=2,
              rows_per_head=211, untouched=4, batch_size=4, seq_len=64, population_b=4, log=lambda *a: None)
    res = run_overlay_capacity(tmp_path, data, **kw)
    assert set(res["cells"]) == {"overlay_lr0.1", "lora_r1", "lora_r4"}
    small, large = (res["cells"]["overlay_lr0.1"][k]["by_seed"][0] for k in ("2", "6"))
    assert 0 < small["changed_rows"] < large["changed_rows"] and small["bytes"] < large["bytes"]
    folder = tmp_path / "runs" / "overlay_capacity" / "overlays" / "overlay_lr0.1_k6_seed0"
    assert Overlay.load(folder).changed_rows == large["changed_rows"]
    lora = res["cells"]["lora_r4"]["6"]["by_seed"][0]
    assert lora["bytes"] == 4 * lora["trainable_parameters"] and 0 <= lora["answered"] <= 1
    assert set(res["compare"]) == {"overlay_lr0.1 K=2", "overlay_lr0.1 K=6"}
    assert (tmp_path / "overlay_capacity.png").is_file() and any("kB/fact" in line for line in summary(res))
    done = tmp_path / "runs" / "overlay_capacity" / "lora_r1_k2_seed0.json"
    stamp = done.stat().st_mtime_ns
    again = run_overlay_capacity(tmp_path, data, **kw)
    assert done.stat().st_mtime_ns == stamp and again["cells"] == res["cells"]
