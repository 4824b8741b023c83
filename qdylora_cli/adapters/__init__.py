"""Dynamic-rank adapters (QDyLoRA, QDyDoRA): the layer, rank control, and model-level helpers."""

from qdylora_cli.adapters.inject import (
    adapter_state_dict,
    count_parameters,
    find_target_modules,
    inject_adapters,
    iter_adapters,
    load_adapter_state_dict,
    merge_adapters,
)
from qdylora_cli.adapters.lora import DynamicRankLoRA, base_weight, check_rank
from qdylora_cli.adapters.rank import (
    RANK_SAMPLERS,
    FixedRank,
    RankSampler,
    UniformRank,
    build_rank_sampler,
    set_rank,
)

__all__ = [
    "RANK_SAMPLERS",
    "DynamicRankLoRA",
    "FixedRank",
    "RankSampler",
    "UniformRank",
    "adapter_state_dict",
    "base_weight",
    "build_rank_sampler",
    "check_rank",
    "count_parameters",
    "find_target_modules",
    "inject_adapters",
    "iter_adapters",
    "load_adapter_state_dict",
    "merge_adapters",
    "set_rank",
]
