"""Controlled experiments behind `engram experiment NAME`: arms over seeds, resumable, results as
JSON + PNG. One module per family: comparisons (Engram vs MoE vs dense, the rho sweep),
ablations (one change per arm, boundary resets, table size, OverEncoding), probes (knowledge
probes, gates on entities), knowledge (capacity on synthetic biographies), long_context (RULER-style
retrieval against context length), memory_edits (forget and rewrite facts in the tables),
retrofit_facts (facts written into a pretrained model: Engram adapter, its control, LoRA),
overlay_capacity (K facts written as memory overlays, against LoRA).
`run(name, out, data, **options)` runs one; `summary(result)` is a few human lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from . import ablations, comparisons, knowledge, long_context, memory_edits, overlay_capacity, probes, retrofit_facts

EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "engram_vs_moe": comparisons.run_engram_vs_moe,
    "rho_sweep": comparisons.run_rho_sweep,
    "ablations": ablations.run_ablations,
    "boundary_reset": ablations.run_boundary_reset,
    "table_size": ablations.run_table_size,
    "knowledge_probes": probes.run_knowledge_probes,
    "entity_gates": probes.run_entity_gates,
    "knowledge_capacity": knowledge.run_knowledge_capacity,
    "long_context": long_context.run_long_context,
    "memory_edits": memory_edits.run_memory_edits,
    "retrofit_facts": retrofit_facts.run_retrofit_facts,
    "overlay_capacity": overlay_capacity.run_overlay_capacity,
}
# The dataset each experiment builds when none is given (`engram data build` options).
DEFAULT_DATA: dict[str, dict[str, Any]] = {
    "knowledge_capacity": {"corpus": "synthetic-bios", "people": 500, "vocab_size": 2048},
    "memory_edits": {"corpus": "synthetic-bios", "people": 500, "vocab_size": 2048},
    "retrofit_facts": {"corpus": "synthetic-bios", "people": 500, "vocab_size": 2048},
    "overlay_capacity": {"corpus": "synthetic-bios", "people": 500, "vocab_size": 2048},
    "long_context": {"corpus": "long-context", "examples": 3000, "vocab_size": 2048}}
_SUMMARIES = {"engram_vs_moe": comparisons.summary, "rho_sweep": comparisons.summary, "ablations": ablations.summary,
              "boundary_reset": ablations.summary, "table_size": ablations.summary, "knowledge_probes": probes.summary,
              "entity_gates": probes.summary, "knowledge_capacity": knowledge.summary,
              "long_context": long_context.summary, "memory_edits": memory_edits.summary,
              "retrofit_facts": retrofit_facts.summary, "overlay_capacity": overlay_capacity.summary}


def run(name: str, out_dir: str | Path, data_dir: str | Path, **options) -> dict[str, Any]:
    """Run (or resume) experiment `name`; returns its results, also written to out_dir/NAME.json."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name](out_dir, data_dir, **options)


def summary(result: dict[str, Any]) -> str:
    """A few human lines of an experiment's results (the JSON has everything)."""
    return "\n".join(_SUMMARIES[result["experiment"]](result))


__all__ = ["DEFAULT_DATA", "EXPERIMENTS", "run", "summary"]
