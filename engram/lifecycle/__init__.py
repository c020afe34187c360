"""The memory's lifecycle on training runs: index what the tables hold, locate a phrase, forget
it, write a fact, replay an edit; overlays (`overlays`): show, verify, merge, drop. Row-level machinery lives in `engram.memory` (row_index,
editing); this package loads runs, measures, and saves edited runs beside them."""

from .memory_ops import EditError, forget, index_run, locate, replay, text_loss, write

__all__ = ["EditError", "index_run", "locate", "forget", "write", "replay", "text_loss"]
