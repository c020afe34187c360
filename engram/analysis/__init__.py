"""Analysis: what the memory learned. Reads what the model returns or records; never edits the model."""

from .ablation import ablation_eval, ablation_report, engram_disabled
from .cka import cka_matrix, linear_cka, plot_cka, soft_alignment_index
from .entities import entity_gate_stats, find_entities, title_pattern
from .gates import gate_heatmap_html, gate_heatmap_png, gate_values, plot_gates
from .knowledge import answer_scores, country_capitals, probe_facts, split_stated
from .logit_lens import logit_lens_kl, plot_logit_lens
from .table_stats import plot_table_stats, summarize, table_statistics

__all__ = ["engram_disabled", "ablation_report", "ablation_eval", "gate_values", "gate_heatmap_html",
           "gate_heatmap_png", "plot_gates", "logit_lens_kl", "plot_logit_lens", "linear_cka", "cka_matrix",
           "soft_alignment_index", "plot_cka", "table_statistics", "summarize", "plot_table_stats",
           "entity_gate_stats", "find_entities", "title_pattern", "answer_scores", "country_capitals", "probe_facts",
           "split_stated"]
