"""lightning-haste: HASTE group-shared fixed fan-in output layers for extreme multi-label training."""

import importlib

from . import dst, functional
from .dst import RewireStats, reset_optimizer_state_
from .gsfi import GroupSharedFanIn, bank_interleaved_order, sample_group_index
from .head_tail import HeadTailOutput

__all__ = [
    "GroupSharedFanIn",
    "HasteXMCModule",
    "SparseRegrowthCallback",
    "TopKPredictionWriter",
    "XMCDataModule",
    "HeadTailOutput",
    "RewireStats",
    "ShardedHeadTailOutput",
    "bank_interleaved_order",
    "dst",
    "functional",
    "reset_optimizer_state_",
    "sample_group_index",
    "shard_output",
]
__version__ = "0.1.0"


_LAZY = {
    "SparseRegrowthCallback": "callbacks",
    "HasteXMCModule": "module",
    "XMCDataModule": "data",
    "TopKPredictionWriter": "prediction",
    "ShardedHeadTailOutput": "sharded",
    "shard_output": "sharded",
}


def __getattr__(name: str):
    # These import Lightning / torchmetrics; load them on first use so that the layers import fast.
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lightning_haste' has no attribute {name!r}")
