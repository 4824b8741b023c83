"""Choosing the active rank: `set_rank` for a whole model and the per-step rank samplers.

DyLoRA draws one rank per optimizer step and uses it in every layer for all micro-batches of
that step. Each sampler owns a `torch.Generator` seeded from the run seed, so every process draws
the same rank and a resumed run continues the exact sequence. A new schedule is one
`RankSampler` subclass plus one line in `RANK_SAMPLERS`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qdylora_cli.adapters.lora import DynamicRankLoRA, Rank, check_rank
from qdylora_cli.errors import QdyloraError


def set_rank(model: nn.Module, rank: Rank) -> None:
    """Set the active rank of every adapter in `model` (0 = off, b, or a tuple for multi-rank evaluation).

    Checked against every adapter before any is changed, so a bad rank leaves the model as it was.
    """
    adapters = [m for m in model.modules() if isinstance(m, DynamicRankLoRA)]
    for adapter in adapters:
        check_rank(rank, adapter.r_max)
    for adapter in adapters:
        adapter.rank = rank


class RankSampler:
    """Draws the training rank of each optimizer step; its state resumes the sequence exactly.

    Subclasses implement `build` and `sample`; stateful ones also `state_dict`/`load_state_dict`.
    """

    @classmethod
    def build(cls, *, r_max: int, min_rank: int, rank: int | None, seed: int) -> RankSampler:
        """The sampler from the `rank_schedule` options (each kind uses the ones it needs)."""
        raise NotImplementedError

    def sample(self) -> int:
        """The rank for the next optimizer step."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless by default: nothing to restore."""


class UniformRank(RankSampler):
    """Uniform on min_rank..r_max inclusive, as in the official DyLoRA code (min_rank 1)."""

    def __init__(self, min_rank: int, r_max: int, seed: int = 0) -> None:
        if not 1 <= min_rank <= r_max:
            raise QdyloraError(f"rank_schedule.min_rank must be in 1..r_max={r_max}, got {min_rank}")
        self.min_rank, self.r_max = min_rank, r_max
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def build(cls, *, r_max: int, min_rank: int, rank: int | None, seed: int) -> UniformRank:
        return cls(min_rank, r_max, seed)

    def sample(self) -> int:
        return int(torch.randint(self.min_rank, self.r_max + 1, (1,), generator=self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class FixedRank(RankSampler):
    """Always the same rank: the plain QLoRA baseline (use it with mode `full`)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    @classmethod
    def build(cls, *, r_max: int, min_rank: int, rank: int | None, seed: int) -> FixedRank:
        rank = r_max if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
            raise QdyloraError(f"rank_schedule.rank must be an integer in 1..r_max={r_max}, got {rank!r}")
        return cls(rank)

    def sample(self) -> int:
        return self.rank


class WeightedRank(RankSampler):
    """Draws b in min_rank..r_max with probability proportional to `weight(b)`; subclasses define the weight."""

    def __init__(self, min_rank: int, r_max: int, seed: int = 0) -> None:
        if not 1 <= min_rank <= r_max:
            raise QdyloraError(f"rank_schedule.min_rank must be in 1..r_max={r_max}, got {min_rank}")
        self.min_rank, self.r_max = min_rank, r_max
        weights = torch.tensor([self.weight(b, min_rank, r_max) for b in range(min_rank, r_max + 1)],
                               dtype=torch.float64)
        self.probs = weights / weights.sum()  # probs[i]: the probability of rank min_rank + i
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def build(cls, *, r_max: int, min_rank: int, rank: int | None, seed: int) -> WeightedRank:
        return cls(min_rank, r_max, seed)

    @staticmethod
    def weight(b: int, min_rank: int, r_max: int) -> float:
        raise NotImplementedError

    def sample(self) -> int:
        return self.min_rank + int(torch.multinomial(self.probs, 1, generator=self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class OctaveRank(WeightedRank):
    """Each octave of ranks [2^k, 2^(k+1)) equally likely, uniform inside it; octaves are cut to min_rank..r_max.

    With r_max 16: P(1) = P(16) = 1/5, P(2) = P(3) = 1/10, P(4..7) = 1/20, P(8..15) = 1/40. Uniform
    sampling gives rank 1 only 1/16 of the steps, and in frozen mode slice 1 trains only then.
    """

    @staticmethod
    def weight(b: int, min_rank: int, r_max: int) -> float:
        low = 1 << (b.bit_length() - 1)  # the octave holding b: [low, 2·low - 1]
        return 1.0 / (min(2 * low - 1, r_max) - max(low, min_rank) + 1)


class HarmonicRank(WeightedRank):
    """P(b) ∝ 1/b (about uniform in log b): rank 1 is drawn r_max times as often as r_max."""

    @staticmethod
    def weight(b: int, min_rank: int, r_max: int) -> float:
        return 1.0 / b


RANK_SAMPLERS: dict[str, type[RankSampler]] = {
    "uniform": UniformRank,
    "fixed": FixedRank,
    "octave": OctaveRank,
    "harmonic": HarmonicRank,
}


def build_rank_sampler(kind: str, *, r_max: int, min_rank: int = 1, rank: int | None = None, seed: int = 0) -> RankSampler:
    """The sampler registered as `kind`; `fixed` uses `rank` (default r_max), the others `min_rank`."""
    if kind not in RANK_SAMPLERS:
        raise QdyloraError(f"rank_schedule.kind {kind!r} is unknown; known kinds: {', '.join(sorted(RANK_SAMPLERS))}")
    return RANK_SAMPLERS[kind].build(r_max=r_max, min_rank=min_rank, rank=rank, seed=seed)
