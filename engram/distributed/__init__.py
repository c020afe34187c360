"""Training on many processes with torch.distributed: row-sharded tables over all-to-all,
DDP or FSDP2 for the backbone, resharding DCP checkpoints. Applied from outside the model."""

from . import checkpoint, runtime
from .parallelize import Parallel, parallelize, shard_tables
from .runtime import init_distributed, is_main, launched_by_torchrun
from .sharded_table import ShardedTable, row_block

__all__ = ["Parallel", "ShardedTable", "init_distributed", "is_main", "launched_by_torchrun", "parallelize",
           "row_block", "shard_tables"]
