"""Retrofit as a fact store: new people's facts written into a pretrained model by an Engram
adapter with zero-initialized tables, by its control with 2 rows per head (no memory to speak
of), and by LoRA with as many trainable parameters as the Engram adapter; then the recall of
the written facts, and what writing them cost the rest.

The SmolLM2 retrofit (docs/results.md) gained from the gated projections, not the tables: the
2-rows control won at 40 steps on open text, where no single fact can be counted. Here facts can:
- base: a small Llama (transformers' `LlamaForCausalLM`) pretrained here, with a plain `Trainer`,
  on the biographies and QA documents of population A (all but the last `written` people of the
  synthetic-bios dataset). It knows the format and A's facts, and has never seen B. SmolLM2-135M
  takes ~6 s a step on this machine, too slow for 3 arms x 3 seeds of hundreds of steps;
- written: population B's training biographies (5 per person), trained into each arm with the
  base frozen, the same steps, batch and learning rate (`EngramTrainer` for the Engram arms:
  tables at lr x5 without decay, the paper's recipe; `Trainer` for LoRA);
- measured: closed-book exact match on B (the written facts) and on a sample of A (untouched
  people), against the base; mean loss and KL(base || arm) per token on text the writing should
  leave alone: A's held-out-template biographies, and a sample of A's training documents (what
  the base knows by heart). The base memorizes its training text, so on held-out phrasings a
  change that blurs it can lower the loss: KL is the measure of damage, the loss only its sign.
Each (arm, seed) is one JSON in OUT/runs/retrofit_facts/ (with the base), so an interrupted run resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.bios_recall import bios_recall
from ..data.corpora import read_extra_records, read_records
from ..data.dataset import PreparedData
from ..data.synthetic_bios import ATTRIBUTES, attribute_choices
from ..durable import atomic_write_text
from .common import figure, paired, spread, write_results

ARMS = ("engram", "engram_2rows", "lora")
LAYERS = [1]  # Engram before decoder layer 1 of 4
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Blocks(torch.utils.data.Dataset):
    """Documents joined by eos and cut into blocks of `seq_len` tokens (labels = inputs)."""

    def __init__(self, tokenizer, texts: list[str], seq_len: int, eos: int) -> None:
        ids: list[int] = []
        for text in texts:
            ids += tokenizer.encode(text, add_special_tokens=False).ids + [eos]
        n = len(ids) // seq_len
        self.blocks = torch.tensor(ids[:n * seq_len]).view(n, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _args(out: Path, steps: int, lr: float, seed: int, batch_size: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=lr, weight_decay=0.0, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                             logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], seed=seed,
                             data_seed=seed, use_cpu=True, disable_tqdm=False)


def _pretrain_base(folder: Path, data: PreparedData, texts: list[str], *, steps: int, seq_len: int,
                   batch_size: int, log) -> Path:
    """The base Llama, trained once (kept in `folder`; reused when it is there)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    if (folder / "config.json").is_file():
        return folder
    from ..data.tokenizer import special_ids

    ids = special_ids(data.tokenizer)
    config = LlamaConfig(vocab_size=data.tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=seq_len, tie_word_embeddings=True, pad_token_id=ids["pad"],
                         bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    log(f"pretraining the base Llama ({sum(p.numel() for p in model.parameters()):,} parameters) for {steps} steps")
    start = time.perf_counter()
    Trainer(model=model, args=_args(folder.parent / "base_trainer", steps, 3e-3, 0, batch_size),
            train_dataset=_Blocks(data.tokenizer, texts, seq_len, ids["eos"])).train()
    model.save_pretrained(folder)
    atomic_write_text(folder / "pretraining.json", json.dumps({"steps": steps, "seconds": time.perf_counter() - start}))
    return folder


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _with_arm(base: Path, arm: str, data: PreparedData, *, rows: int, lora_rank: int | None, seed: int):
    """The base with the arm's adapter (base weights frozen)."""
    from transformers import LlamaForCausalLM

    from ..hf.retrofit import add_engram

    model = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    if arm == "lora":
        import peft

        config = peft.LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
        return peft.get_peft_model(model, config)
    return add_engram(model, layers=LAYERS, tokenizer=data.tokenizer, rows_per_head=rows if arm == "engram" else 2,
                      n_head_per_ngram=4, n_embed_per_ngram=64, table_init_std=0.0, seed=seed)


def _lora_rank_matching(base: Path, data: PreparedData, params: int) -> int:
    """The LoRA rank whose trainable parameters come closest to `params`."""
    per_rank = _trainable(_with_arm(base, "lora", data, rows=0, lora_rank=1, seed=0))
    return max(1, round(params / per_rank))


@torch.no_grad()
def _held_out(model, base_model, tokenizer, texts: list[str], seq_len: int, eos: int) -> dict[str, float]:
    """Mean next-token loss of `model` and of the base, and KL(base || model) per token."""
    blocks = _Blocks(tokenizer, texts, seq_len, eos).blocks
    loss = base_loss = kl = 0.0
    n = 0
    for lo in range(0, len(blocks), 16):
        x = blocks[lo:lo + 16]
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), -1)
        base_logp = torch.log_softmax(base_model(input_ids=x).logits[:, :-1].double(), -1)
        target = x[:, 1:, None]
        loss -= float(logp.gather(-1, target).sum())
        base_loss -= float(base_logp.gather(-1, target).sum())
        kl += float((base_logp.exp() * (base_logp - logp)).sum())
        n += target.numel()
    return {"loss": loss / n, "base_loss": base_loss / n, "loss_change": (loss - base_loss) / n, "kl": kl / n}


def _recall(model, tokenizer, people, probes, who: list[int]) -> float:
    r = bios_recall(model, tokenizer, people, probes, only=who, conditions=("bio",))
    return float(r["conditions"]["bio"]["exact_match"])


def _one_run(path: Path, base: Path, arm: str, data: PreparedData, people, probes, split, *, seed: int, steps: int,
             lr: float, rows: int, lora_rank: int, seq_len: int, batch_size: int, log) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import LlamaForCausalLM, Trainer

    from ..data.tokenizer import special_ids
    from ..hf.trainer import EngramTrainer

    eos = special_ids(data.tokenizer)["eos"]
    model = _with_arm(base, arm, data, rows=rows, lora_rank=lora_rank, seed=seed)
    trainable = _trainable(model)
    train = _Blocks(data.tokenizer, split["write_texts"], seq_len, eos)
    trainer_class = Trainer if arm == "lora" else EngramTrainer
    start = time.perf_counter()
    trainer = trainer_class(model=model, args=_args(path.parent / f"trainer_{arm}", steps, lr, seed, batch_size),
                            train_dataset=train)
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    base_model = LlamaForCausalLM.from_pretrained(base).eval()
    result = {"arm": arm, "seed": seed, "trainable_parameters": trainable, "trainable_bytes": 4 * trainable,
              "train_seconds": seconds, "final_train_loss": trainer.state.log_history[-2].get("loss"),
              "recall_written": _recall(model, data.tokenizer, people, probes, split["written"]),
              "recall_untouched": _recall(model, data.tokenizer, people, probes, split["untouched"]),
              "held_out": _held_out(model, base_model, data.tokenizer, split["held_out_texts"], seq_len, eos),
              "known": _held_out(model, base_model, data.tokenizer, split["known_texts"], seq_len, eos)}
    log(f"  {arm} seed {seed}: {trainable:,} trainable, written recall {result['recall_written']:.3f}, untouched "
        f"{result['recall_untouched']:.3f}, KL held-out {result['held_out']['kl']:.4f} / known "
        f"{result['known']['kl']:.4f}, loss held-out {result['held_out']['loss_change']:+.4f} / known "
        f"{result['known']['loss_change']:+.4f} ({seconds:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def run_retrofit_facts(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 300,
                       base_steps: int = 1500, written: int = 100, untouched: int = 100, rows_per_head: int = 2003,
                       lr: float = 2e-3, seq_len: int = 128, batch_size: int = 16, log=print) -> dict[str, Any]:
    """Pretrain the base (once), then write population B with each arm over `seeds`."""
    out = Path(out_dir)
    data = PreparedData.open(data_dir)
    people, probes = read_extra_records(data_dir, "people"), read_extra_records(data_dir, "probes")
    if written + 2 > len(people):
        raise ValueError(f"the dataset has {len(people)} people; writing {written} leaves too few for the base")
    docs, val = read_records(data_dir, "train"), read_records(data_dir, "val")
    first_b = len(people) - written
    rng = np.random.default_rng(0)
    split = {"written": list(range(first_b, len(people))),
             "untouched": sorted(rng.choice(first_b, size=min(untouched, first_b), replace=False).tolist()),
             "write_texts": [d["text"] for d in docs if d.get("person", -1) >= first_b and d.get("kind") == "bio"],
             "held_out_texts": [d["text"] for d in val if d.get("person", -1) < first_b],
             "known_texts": [d["text"] for d in docs if d.get("person", -1) < first_b][:300]}
    work = out / "runs" / "retrofit_facts"
    base = _pretrain_base(work / "base", data, [d["text"] for d in docs if d.get("person", -1) < first_b],
                          steps=base_steps, seq_len=seq_len, batch_size=batch_size, log=log)
    from transformers import LlamaForCausalLM

    base_model = LlamaForCausalLM.from_pretrained(base).eval()
    base_recall = {"written": _recall(base_model, data.tokenizer, people, probes, split["written"]),
                   "untouched": _recall(base_model, data.tokenizer, people, probes, split["untouched"])}
    engram_params = _trainable(_with_arm(base, "engram", data, rows=rows_per_head, lora_rank=None, seed=0))
    lora_rank = _lora_rank_matching(base, data, engram_params)
    choices = attribute_choices()
    results: dict[str, Any] = {
        "experiment": "retrofit_facts", "data": str(data_dir), "seeds": list(seeds), "steps": steps,
        "base_steps": base_steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
        "rows_per_head": rows_per_head, "layers": LAYERS, "lora_rank": lora_rank, "lora_targets": LORA_TARGETS,
        "written_people": written, "written_texts": len(split["write_texts"]), "untouched_people": len(split["untouched"]),
        "chance": float(np.mean([1 / choices[a] for a in ATTRIBUTES])), "base": base_recall,
        "base_parameters": sum(p.numel() for p in base_model.parameters()), "arms": {}}
    log(f"base recall: written people {base_recall['written']:.3f}, untouched {base_recall['untouched']:.3f}; "
        f"Engram adapter {engram_params:,} trainable parameters, LoRA rank {lora_rank}")
    for arm in ARMS:
        runs = [_one_run(work / f"{arm}_seed{s}.json", base, arm, data, people, probes, split, seed=s, steps=steps,
                         lr=lr, rows=rows_per_head, lora_rank=lora_rank, seq_len=seq_len, batch_size=batch_size,
                         log=log) for s in seeds]
        results["arms"][arm] = {
            "by_seed": runs, "trainable_parameters": runs[0]["trainable_parameters"],
            "recall_written": spread([r["recall_written"] for r in runs]),
            "recall_untouched": spread([r["recall_untouched"] for r in runs]),
            "untouched_change": paired([r["recall_untouched"] for r in runs], [base_recall["untouched"]] * len(runs)),
            "held_out_loss_change": spread([r["held_out"]["loss_change"] for r in runs]),
            "held_out_kl": spread([r["held_out"]["kl"] for r in runs]),
            "known_loss_change": spread([r["known"]["loss_change"] for r in runs]),
            "known_kl": spread([r["known"]["kl"] for r in runs])}
    results["engram_minus_control"] = paired([r["recall_written"] for r in results["arms"]["engram"]["by_seed"]],
                                             [r["recall_written"] for r in results["arms"]["engram_2rows"]["by_seed"]])
    results["engram_minus_lora"] = paired([r["recall_written"] for r in results["arms"]["engram"]["by_seed"]],
                                          [r["recall_written"] for r in results["arms"]["lora"]["by_seed"]])
    write_results(out, results, _plot)
    return results


LABELS = {"engram": "Engram, zero rows", "engram_2rows": "2-row control", "lora": "LoRA"}


def _plot(results: dict[str, Any], path: Path) -> None:
    arms = list(results["arms"])
    fig, axes = figure((17, 3.8), ncols=4)
    colors = ["#48c", "#888", "#c84"]
    names = [f"{LABELS[a]}\n{results['arms'][a]['trainable_parameters'] / 1e3:.0f}k params" for a in arms]
    panels = [("recall_written", "written facts: exact match", results["base"]["written"]),
              ("recall_untouched", "untouched people: exact match", results["base"]["untouched"]),
              ("held_out_kl", "KL(base || arm) per token: held-out phrasings of A", None),
              ("known_kl", "KL(base || arm) per token: A's training text", None)]
    for ax, (key, title, base) in zip(axes, panels):
        values = [results["arms"][a][key] for a in arms]
        ax.bar(range(len(arms)), [v["mean"] for v in values], yerr=[v["std"] for v in values], capsize=3, color=colors)
        if base is not None:
            ax.axhline(base, color="k", ls="--", lw=0.8, label="base model")
            ax.axhline(results["chance"], color="#c44", ls=":", lw=0.8, label="chance")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(arms)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"writing {results['written_people']} new people into a pretrained Llama "
                 f"({results['base_parameters'] / 1e6:.1f}M), {results['steps']} steps, {len(results['seeds'])} seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def summary(result: dict[str, Any]) -> list[str]:
    lines = [f"base: written people {result['base']['written']:.3f}, untouched {result['base']['untouched']:.3f} "
             f"(chance {result['chance']:.3f})"]
    for arm, a in result["arms"].items():
        lines.append(f"{arm}: {a['trainable_parameters']:,} params; written {a['recall_written']['mean']:.3f} "
                     f"± {a['recall_written']['std']:.3f}; untouched change {a['untouched_change']['mean']:+.3f}; "
                     f"KL held-out {a['held_out_kl']['mean']:.3f}, known {a['known_kl']['mean']:.3f}; loss change "
                     f"held-out {a['held_out_loss_change']['mean']:+.3f}, known {a['known_loss_change']['mean']:+.3f}")
    for key in ("engram_minus_control", "engram_minus_lora"):
        d = result[key]
        lines.append(f"{key}: written recall {d['mean']:+.3f} ± {d['std']:.3f}")
    return lines


__all__ = ["run_retrofit_facts", "summary"]
