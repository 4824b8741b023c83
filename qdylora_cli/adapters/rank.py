"""Choosing the active ranks: `set_rank` for a whole model, and the rank schedules of training.

A schedule is a distribution P(b) over the ranks. Each optimizer step draws k ranks from it
(`ranks_per_step`); with k > 1 the draw is stratified (one rank from each k-quantile of P), so a
step always covers low and high ranks. With the sandwich rule, min_rank and r_max are two of the k
ranks of every step and the other k - 2 are drawn so. `matryoshka` always draws r_max: with nested
ranks (`set_nested`) each row then trains the mixture of all of them. The sampler owns a `torch.Generator` seeded from the run
seed, so every process draws the same ranks and a resumed run continues the exact sequence. A new
schedule is one weight function, one line in `RANK_WEIGHTS` and its name in `choices.RANK_SCHEDULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qdylora_cli.adapters.lora import DynamicRankLoRA, NestedRanks, Rank, check_rank, chunk_of_rows
from qdylora_cli.errors import QdyloraError


def check_module_ranks(names: Sequence[str], ranks: Mapping[str, Any]) -> None:
    """A rank per module names every adapted module in `names` and no other."""
    missing, unknown = sorted(set(names) - set(ranks)), sorted(set(ranks) - set(names))
    if missing or unknown:
        raise QdyloraError(
            f"a rank per module must name every adapted module and no other: {len(missing)} missing "
            f"(e.g. {', '.join(missing[:3]) or '-'}), {len(unknown)} unknown (e.g. {', '.join(unknown[:3]) or '-'})"
        )


def ranks_by_module(names: Sequence[str], rank: Rank | Mapping[str, Rank]) -> dict[str, Rank]:
    """`rank` for each module in `names`: one rank for all, or a mapping that must name exactly these modules."""
    if isinstance(rank, Mapping):
        check_module_ranks(names, rank)
        return {name: rank[name] for name in names}
    return dict.fromkeys(names, rank)


def set_rank(model: nn.Module, rank: Rank | Mapping[str, Rank]) -> None:
    """Set the active rank of the adapters in `model` (0 = off, b, or a tuple: one rank per batch chunk).

    One rank sets every adapter; a mapping of module name -> rank gives each adapter its own (an
    allocation) and must name every adapter of the model. Checked against every adapter before any
    is changed, so a bad rank leaves the model as it was.
    """
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, DynamicRankLoRA)}
    ranks = ranks_by_module(list(adapters), rank)
    checked = {name: check_rank(ranks[name], adapter.r_max) for name, adapter in adapters.items()}
    for name, adapter in adapters.items():
        adapter.rank = checked[name]


def ranks_of_rows(rank: Rank, n: int) -> torch.Tensor:
    """The rank each row of an n-row batch runs at when the batch runs at `rank` (one rank, or one per chunk)."""
    ranks = rank if isinstance(rank, tuple) else (rank,)
    return torch.tensor(ranks)[chunk_of_rows(n, len(ranks))]


def set_chunk_ranks(model: nn.Module, choices: Sequence[int | Mapping[str, int]]) -> None:
    """Chunk i of the next batch runs at `choices[i]`: one rank for every adapter, or a rank per module.

    This is how several ranks, or several allocations, share one forward pass: each adapter gets the
    tuple of its ranks across the choices (an int when they agree, which skips the per-chunk scaling).
    """
    if not choices:
        raise QdyloraError("no ranks to evaluate")
    if not any(isinstance(c, Mapping) for c in choices):
        set_rank(model, choices[0] if len(choices) == 1 else tuple(choices))
        return
    names = [name for name, m in model.named_modules() if isinstance(m, DynamicRankLoRA)]
    for c in choices:
        if isinstance(c, Mapping):
            check_module_ranks(names, c)
    per_module: dict[str, Rank] = {}
    for name in names:
        ranks = tuple(c[name] if isinstance(c, Mapping) else c for c in choices)
        per_module[name] = ranks[0] if len(set(ranks)) == 1 else ranks
    set_rank(model, per_module)


def _uniform(b: int, min_rank: int, r_max: int) -> float:
    """Uniform on min_rank..r_max, as in the official DyLoRA code (min_rank 1)."""
    return 1.0


def _octave(b: int, min_rank: int, r_max: int) -> float:
    """Each octave of ranks [2^k, 2^(k+1)) equally likely, uniform inside it; octaves cut to min_rank..r_max.

    With r_max 16: P(1) = P(16) = 1/5, P(2) = P(3) = 1/10, P(4..7) = 1/20, P(8..15) = 1/40. Uniform
    sampling gives rank 1 only 1/16 of the steps.
    """
    low = 1 << (b.bit_length() - 1)  # the octave holding b: [low, 2·low - 1]
    return 1.0 / (min(2 * low - 1, r_max) - max(low, min_rank) + 1)


def _harmonic(b: int, min_rank: int, r_max: int) -> float:
    """P(b) ∝ 1/b (about uniform in log b): rank 1 is drawn r_max times as often as r_max."""
    return 1.0 / b


def _mixed(b: int, min_rank: int, r_max: int) -> float:
    """Half of the draws by `octave`, half `uniform`: more of the ranks between the powers of two.

    With r_max 16: P(1) = P(16) = 0.131, P(2..3) = 0.081, P(4..7) = 0.056, P(8..15) = 0.044.
    """
    octaves = len({r.bit_length() for r in range(min_rank, r_max + 1)})
    return 0.5 * _octave(b, min_rank, r_max) / octaves + 0.5 / (r_max - min_rank + 1)


def _matryoshka(b: int, min_rank: int, r_max: int) -> float:
    """Always r_max: with nested ranks every row trains their mixture (MatryoshkaLoRA), nothing is sampled."""
    return 1.0 if b == r_max else 0.0


RANK_WEIGHTS: dict[str, Callable[[int, int, int], float]] = {
    "uniform": _uniform,
    "octave": _octave,
    "harmonic": _harmonic,
    "mixed": _mixed,
    "matryoshka": _matryoshka,
}


class RankSampler:
    """Draws the ranks of each optimizer step from P(b) ∝ weight(b) on `low`..r_max; resumable.

    `sandwich`: every step's k ranks are `low`, r_max and k - 2 stratified draws (k >= 2), so every
    slice trains in every step (mode full) and the extremes always get their share of the rows.
    """

    def __init__(self, weights: list[float], low: int, seed: int = 0, sandwich: bool = False) -> None:
        self.low, self.r_max = low, low + len(weights) - 1
        w = torch.tensor(weights, dtype=torch.float64)
        self.probs = w / w.sum()  # probs[i]: the probability of rank low + i
        self.cdf = self.probs.cumsum(0)
        self.generator = torch.Generator().manual_seed(seed)
        self.sandwich = sandwich

    def sample(self, k: int = 1) -> list[int]:
        """k ranks, ascending: the i-th is drawn from the i-th of k equal slices of the probability mass
        (sandwich: `low` and r_max, and k - 2 drawn so between them)."""
        if self.sandwich:
            if k < 2:
                raise QdyloraError(f"rank_schedule.sandwich needs rank_schedule.ranks_per_step >= 2, got {k}")
            return [self.low, *self._stratified(k - 2), self.r_max]
        return self._stratified(k)

    def _stratified(self, k: int) -> list[int]:
        u = (torch.arange(k, dtype=torch.float64) + torch.rand(k, dtype=torch.float64, generator=self.generator)) / k
        index = torch.searchsorted(self.cdf, u, right=True).clamp(max=len(self.probs) - 1)
        return [self.low + int(i) for i in index]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:  # 0.1's fixed schedule saved no state: it drew nothing at random
            self.generator.set_state(state["generator"])


def build_rank_sampler(kind: str, *, r_max: int, min_rank: int = 1, rank: int | None = None, seed: int = 0,
                       sandwich: bool = False) -> RankSampler:
    """The schedule `kind` on min_rank..r_max; `fixed` always draws `rank` (default r_max): a plain QLoRA run.
    `sandwich`: see `RankSampler` (not with `fixed`, which has one rank)."""
    if kind == "fixed":
        rank = r_max if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
            raise QdyloraError(f"rank_schedule.rank must be an integer in 1..r_max={r_max}, got {rank!r}")
        return RankSampler([1.0], rank, seed)
    if kind not in RANK_WEIGHTS:
        known = ", ".join(sorted([*RANK_WEIGHTS, "fixed"]))
        raise QdyloraError(f"rank_schedule.kind {kind!r} is unknown; known kinds: {known}")
    if not 1 <= min_rank <= r_max:
        raise QdyloraError(f"rank_schedule.min_rank must be in 1..r_max={r_max}, got {min_rank}")
    weight = RANK_WEIGHTS[kind]
    return RankSampler([weight(b, min_rank, r_max) for b in range(min_rank, r_max + 1)], min_rank, seed,
                       sandwich=sandwich)


def set_nested(model: nn.Module, nested: NestedRanks | None) -> None:
    """Every adapter of `model` trains the nested mixture `nested` (None: plain ranks again); see `NestedRanks`."""
    adapters = [m for m in model.modules() if isinstance(m, DynamicRankLoRA)]
    if nested is not None:
        for adapter in adapters:
            if adapter.mode != "full":
                raise QdyloraError("nested ranks (rank_schedule.nested_ranks) need adapter.mode=full: a mixture "
                                   "trains every slice of its ranks")
            if max(nested.ranks) > adapter.r_max:
                raise QdyloraError(f"rank_schedule.nested_ranks: rank {max(nested.ranks)} is above "
                                   f"adapter.r_max={adapter.r_max}")
    for adapter in adapters:
        adapter.nested = nested


@contextmanager
def plain_ranks(model: nn.Module) -> Iterator[None]:
    """Within: every adapter computes its plain rank even in training mode (nested mixtures off), after:
    each adapter's mixture as before. The distillation teacher is the top rank as evaluated and
    exported, not the top rank's training mixture."""
    adapters = [m for m in model.modules() if isinstance(m, DynamicRankLoRA)]
    saved = [a.nested for a in adapters]
    for adapter in adapters:
        adapter.nested = None
    try:
        yield
    finally:
        for adapter, nested in zip(adapters, saved, strict=True):
            adapter.nested = nested


def assign_ranks(ranks: list[int], processes: int, micro_batches: int, batch_size: int) -> list[list[Rank]]:
    """Share a step's k ranks among its processes × micro-batches × chunks of each micro-batch.

    Returns, per process, the rank of each micro-batch: an int, or a tuple (one rank per equal
    chunk of its rows) when a micro-batch holds several ranks. Each rank gets the same share of the
    step's examples; every process computes the same split and keeps its own part.
    """
    k = len(ranks)
    chunks = next((c for c in range(1, batch_size + 1)
                   if batch_size % c == 0 and processes * micro_batches * c % k == 0), None)
    if chunks is None:
        raise QdyloraError(
            f"rank_schedule.ranks_per_step={k} cannot share a step of {processes} process(es) × "
            f"{micro_batches} micro-batch(es) × {batch_size} example(s) equally; choose a divisor of "
            f"{processes * micro_batches * batch_size} (e.g. train.grad_accum or train.batch_size a multiple of it)"
        )
    slots = processes * micro_batches * chunks
    rank_of = [ranks[s * k // slots] for s in range(slots)]  # slot order: process, micro-batch, chunk
    per_process = []
    for p in range(processes):
        micro = []
        for m in range(micro_batches):
            first = (p * micro_batches + m) * chunks
            group = tuple(rank_of[first : first + chunks])
            micro.append(group[0] if chunks == 1 else group)
        per_process.append(micro)
    return per_process
