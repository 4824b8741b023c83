"""Dynamic-rank adapters (QDyLoRA, QDyDoRA): the layer, rank control, its optimizer, model-level helpers."""

from qdylora_cli.adapters.inject import (
    adapter_state_dict,
    count_parameters,
    find_target_modules,
    inject_adapters,
    iter_adapters,
    load_adapter_state_dict,
    merge_adapters,
)
from qdylora_cli.adapters.lora import (
    DynamicRankLoRA,
    NestedRanks,
    base_weight,
    check_rank,
    rank_scale,
    trained_slices,
)
from qdylora_cli.adapters.optim import (
    RankAwareAdamW,
    adapter_parameters,
    resolve_paged,
    upgrade_per_slice_state,
)
from qdylora_cli.adapters.rank import (
    RANK_WEIGHTS,
    RankSampler,
    assign_ranks,
    build_rank_sampler,
    plain_ranks,
    ranks_by_module,
    ranks_of_rows,
    set_chunk_ranks,
    set_nested,
    set_rank,
)

__all__ = [
    "RANK_WEIGHTS",
    "DynamicRankLoRA",
    "NestedRanks",
    "RankAwareAdamW",
    "RankSampler",
    "adapter_parameters",
    "adapter_state_dict",
    "assign_ranks",
    "base_weight",
    "build_rank_sampler",
    "check_rank",
    "count_parameters",
    "find_target_modules",
    "inject_adapters",
    "iter_adapters",
    "load_adapter_state_dict",
    "merge_adapters",
    "rank_scale",
    "plain_ranks",
    "ranks_by_module",
    "ranks_of_rows",
    "resolve_paged",
    "set_chunk_ranks",
    "set_nested",
    "set_rank",
    "trained_slices",
    "upgrade_per_slice_state",
]
