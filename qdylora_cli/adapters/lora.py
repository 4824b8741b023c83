"""`DynamicRankLoRA`: one adapter that holds every LoRA rank 1..r_max at once (DyLoRA), on a float or NF4 base.

At rank b the layer computes `y = base(x) + s(b)·dropout(x)·A[:b]ᵀ·B[:, :b]ᵀ` (../shared/SPEC.md §2),
where the scale s(b) is one of `ADAPTER_SCALES` (`rank_scale`); variant `dora` rescales each output
row to a learned magnitude (SPEC.md §3).

A (r_max×in) and B (out×r_max) are one parameter each, as in any LoRA; the active rank is a view
(`A[:b]`, `B[:, :b]`). Slices above the active rank are not in the graph and get a zero gradient;
which slices a step *trained* is `trained_slices`, and `RankAwareAdamW` (optim.py) updates only
those, so a slice no step used never moves (no weight decay, no momentum drift).

In training, a layer may also compute a *nested mixture* at rank b (`NestedRanks`, MatryoshkaLoRA's
idea): the weighted average of the rank-r updates of every nested rank r up to b, which is one
matmul with a weight per column. Rank b itself, in evaluation, merging and export, never changes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qdylora_cli.choices import ADAPTER_MODES, ADAPTER_SCALES, ADAPTER_VARIANTS, NESTED_WEIGHTS
from qdylora_cli.errors import QdyloraError

if TYPE_CHECKING:
    from qdylora_cli.quant import NF4Linear

Rank = int | tuple[int, ...]


def rank_scale(scale: str, alpha: float, r_max: int, b: int) -> float:
    """s(b), the factor of the rank-b update (SPEC.md §2).

    `alpha_over_rank`: α/b, DyLoRA's and the papers' (rank b is a LoRA with r=b, lora_alpha=α).
    `rank_stabilized`: (α/r_max)·√(r_max/b), rsLoRA's 1/√b fall-off; equal to α/b at r_max.
    `constant`: α/r_max, so rank b is exactly the truncation of the rank-r_max update.
    """
    if scale == "alpha_over_rank":
        return alpha / b
    if scale == "rank_stabilized":
        return alpha / math.sqrt(r_max * b)
    if scale == "constant":
        return alpha / r_max
    raise QdyloraError(f"adapter.scale {scale!r} is unknown; expected one of {', '.join(ADAPTER_SCALES)}")


_NESTED_WEIGHT: dict[str, Callable[[int], float]] = {
    "one": lambda r: 1.0, "inverse": lambda r: 1.0 / r, "inverse_sqrt": lambda r: r ** -0.5,
}


@dataclass(frozen=True)
class NestedRanks:
    """A MatryoshkaLoRA-style training mixture: at rank b a layer computes the weighted average of the
    updates of the nested ranks S_b = {r in `ranks` : r < b} ∪ {b},

        Σ_{r ∈ S_b} w_r · s(r)·x·A[:r]ᵀ·B[:, :r]ᵀ,   w_r = s_r / Σ_{r' ∈ S_b} s_{r'},

    s_r from `weight` (`one`: 1, `inverse`: 1/r, `inverse_sqrt`: 1/√r) and s(r) the adapter's scale.
    Slice i (0-based) is in every rank r > i, so the sum is one matmul, `x·(A ⊙ P)ᵀ·Bᵀ` with the
    column weights P_i = Σ_{r ∈ S_b, r > i} w_r·s(r) (`columns`). Its gradient to slice i is, to
    first order in the update, the gradient of Σ_r w_r·loss(rank r): every nested rank is trained
    in every row, with no sampling, against the one forward of their average.

    Each rank r here is the rank r of evaluation and export (A[:r], B[:, :r], s(r)), so a run trained
    with a mixture exports exactly as any other; only the training forward differs. Rank b = 0
    contributes nothing.
    """

    ranks: tuple[int, ...]
    weight: str = "one"

    def __post_init__(self) -> None:
        if self.weight not in NESTED_WEIGHTS:
            raise QdyloraError(f"rank_schedule.nested_weight {self.weight!r} is unknown; expected one of "
                               f"{', '.join(NESTED_WEIGHTS)}")
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.ranks):
            raise QdyloraError(f"rank_schedule.nested_ranks: expected positive integers, got {list(self.ranks)}")
        if list(self.ranks) != sorted(set(self.ranks)):
            object.__setattr__(self, "ranks", tuple(sorted(set(self.ranks))))

    def members(self, b: int) -> list[tuple[int, float]]:
        """(r, w_r) of the mixture at rank b: the nested ranks below b, and b; weights summing to 1."""
        if b == 0:
            return []
        ranks = [r for r in self.ranks if r < b] + [b]
        raw = [_NESTED_WEIGHT[self.weight](r) for r in ranks]
        total = sum(raw)
        return [(r, w / total) for r, w in zip(ranks, raw, strict=True)]

    def columns(self, b: int, scale: Callable[[int], float], top: int) -> list[float]:
        """P at rank b over `top` columns: column i weighs Σ_{r ∈ S_b, r > i} w_r·s(r); 0 from column b on."""
        weights = [0.0] * top
        for r, w in self.members(b):
            for i in range(min(r, top)):
                weights[i] += w * scale(r)
        return weights


def trained_slices(ranks: Rank, mode: str) -> list[tuple[int, int]]:
    """The rank slices a step at `ranks` trains, as sorted disjoint [start, stop) ranges of slice indices.

    `full`: slices 0..max(ranks)-1. `frozen` (DyLoRA): slice b-1 of each rank b, the lower ones
    being used but not trained. Rank 0, or no rank at all, trains nothing.
    """
    ranks = ranks if isinstance(ranks, tuple) else (ranks,)
    if mode == "full":
        top = max(ranks, default=0)
        return [(0, top)] if top > 0 else []
    ranges: list[tuple[int, int]] = []
    for b in sorted(set(ranks) - {0}):
        if ranges and ranges[-1][1] == b - 1:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((b - 1, b))
    return ranges


def base_weight(base: nn.Linear | NF4Linear) -> torch.Tensor:
    """The base layer's float weight (out×in): an `nn.Linear`'s own, an `NF4Linear`'s dequantized."""
    return base.weight if isinstance(base, nn.Linear) else base.dequantize()


def _base_forward(base: nn.Linear | NF4Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # NF4Linear reuses the weight we already dequantized and re-dequantizes in backward instead of
    # keeping it alive; an nn.Linear's weight is its own parameter anyway.
    return base(x) if isinstance(base, nn.Linear) else base(x, weight=weight)


def check_rank(rank: object, r_max: int) -> Rank:
    """`rank` as an int or a tuple of ints, each in 0..r_max; QdyloraError otherwise."""
    ranks = tuple(rank) if isinstance(rank, (tuple, list)) else (rank,)
    if not ranks:
        raise QdyloraError("rank: an empty list of ranks; give at least one rank in 0..r_max")
    for b in ranks:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= r_max:
            raise QdyloraError(f"rank {b!r} is not an integer in 0..{r_max} (0 = adapters off, {r_max} = r_max)")
    return ranks if isinstance(rank, (tuple, list)) else ranks[0]


class DynamicRankLoRA(nn.Module):
    """A frozen linear layer (`nn.Linear` or `NF4Linear`) plus LoRA factors usable at any rank 1..r_max.

    `rank` selects what forward computes: 0 = the base alone, b = rank b, a tuple of k ranks = one
    rank per contiguous chunk of the batch (k chunks as equal as possible; multi-rank evaluation and
    several ranks per training step, with one base matmul). Mode `full` trains slices 1..b at rank
    b; `frozen` trains only slice b, each chunk's gradient reaching its own slice b alone. Adapter
    parameters are float32 master weights; the adapter path computes in the input's dtype.

    `nested` (a `NestedRanks`, set by `set_nested`; mode `full` only) makes a chunk at rank b compute
    the nested mixture instead of rank b, in training mode only: `eval()` (evaluation, generation)
    always computes rank b itself.
    """

    def __init__(
        self,
        base: nn.Linear | NF4Linear,
        r_max: int,
        alpha: float,
        dropout: float = 0.0,
        mode: str = "full",
        variant: str = "lora",
        scale: str = "alpha_over_rank",
    ) -> None:
        super().__init__()
        if not isinstance(r_max, int) or r_max < 1:
            raise QdyloraError(f"adapter r_max must be a positive integer, got {r_max!r}")
        if mode not in ADAPTER_MODES:
            raise QdyloraError(f"adapter mode {mode!r} is unknown; expected one of {', '.join(ADAPTER_MODES)}")
        if variant not in ADAPTER_VARIANTS:
            raise QdyloraError(f"adapter variant {variant!r} is unknown; expected one of {', '.join(ADAPTER_VARIANTS)}")
        rank_scale(scale, alpha, r_max, 1)  # checks the name
        if not 0.0 <= dropout < 1.0:
            raise QdyloraError(f"adapter dropout must be in [0, 1), got {dropout}")
        base.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r_max, self.alpha, self.mode, self.variant, self.scale = r_max, float(alpha), mode, variant, scale
        self.dropout = float(dropout)

        device = next(itertools.chain(base.parameters(), base.buffers())).device
        self.lora_A = nn.Parameter(torch.empty(r_max, self.in_features, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # over the whole r_max×in matrix, as LoRA's A
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r_max, device=device))
        if variant == "dora":
            with torch.no_grad():
                w = base_weight(base)
                self.magnitude = nn.Parameter(torch.linalg.vector_norm(w, dim=1, dtype=torch.float32))
        self._rank: Rank = r_max
        self._nested: NestedRanks | None = None
        self._static: _RankTensors | None = None  # set by `use_static_shapes`

    @property
    def rank(self) -> Rank:
        return self._rank

    @rank.setter
    def rank(self, value: Rank) -> None:
        self._rank = check_rank(value, self.r_max)
        self._refresh_static()

    @property
    def nested(self) -> NestedRanks | None:
        return self._nested

    @nested.setter
    def nested(self, value: NestedRanks | None) -> None:
        self._nested = value
        self._refresh_static()

    def use_static_shapes(self) -> None:
        """Compute every rank at r_max's shapes, the ranks given as tensors (column scales, the trained
        slice, rank 0) made when the rank is set. For `torch.compile`: a rank read as a Python int in
        forward is a guard, and each new rank would compile the layer again. The values are those of the
        plain path (columns above a row's rank weigh 0); the matmuls are r_max wide whatever the rank."""
        self._static = _RankTensors()
        self._refresh_static()

    def _refresh_static(self) -> None:
        if self._static is None:
            return
        ranks = self._rank if isinstance(self._rank, tuple) else (self._rank,)
        device = self.lora_A.device
        self._static.columns = self._plain_columns(ranks, self.r_max)
        self._static.mixed = None if self._nested is None else torch.tensor(
            [self._nested.columns(b, self.rank_scale, self.r_max) for b in ranks], device=device)
        self._static.slices = self._slice_columns(ranks, self.r_max) if self.mode == "frozen" else None
        self._static.off = torch.tensor(ranks, device=device)[:, None] == 0

    def rank_scale(self, b: int) -> float:
        return rank_scale(self.scale, self.alpha, self.r_max, b)

    @property
    def mixing(self) -> bool:
        """Whether forward computes nested mixtures (a `nested` set, and training mode)."""
        return self.nested is not None and self.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._static is not None:  # nothing here reads the rank as a Python value (use_static_shapes)
            t = self._static
            columns = t.mixed if self.mixing else t.columns
            return self._adapted(x, self.r_max, columns, t.slices, t.off, lambda w: self._dora_column_norms(w, columns))
        ranks = self._rank if isinstance(self._rank, tuple) else (self._rank,)
        top = max(ranks)
        if top == 0:
            return self.base(x)
        columns = self._rank_columns(ranks, top) if len(ranks) > 1 or self.mixing else None
        slices = self._slice_columns(ranks, top) if self.mode == "frozen" else None
        dora_off = self.variant == "dora" and 0 in ranks  # only DoRA reads it: its rank-0 chunks keep the base
        off = torch.tensor(ranks, device=x.device)[:, None] == 0 if dora_off else None

        def norms(weight: torch.Tensor) -> torch.Tensor:
            if self.mixing:  # the norm of the weight the mixture applies, W + B·diag(P)·A
                return self._dora_column_norms(weight, columns)
            return self._dora_norms(weight, ranks, top)

        return self._adapted(x, top, columns, slices, off, norms)

    def _adapted(self, x: torch.Tensor, top: int, columns: torch.Tensor | None, slices: torch.Tensor | None,
                 off: torch.Tensor | None, norms: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The layer's output with its update over the first `top` slices: `columns` (k, top) the scale of
        each column per chunk (None: s(top) on all), `slices` (mode frozen) the column each chunk trains,
        `off` (k, 1) the chunks at rank 0 (None: none), `norms` DoRA's row norms of the adapted weight."""
        delta = self._delta(x, top, columns, slices)
        if self.variant == "dora":
            return self._dora(x, delta, norms, off)
        y = self.base(x)
        return y + delta.to(y.dtype)

    def _delta(self, x: torch.Tensor, top: int, columns: torch.Tensor | None,
               trained: torch.Tensor | None) -> torch.Tensor:
        """The low-rank update `s(b)·dropout(x)·A[:b]ᵀ·B[:, :b]ᵀ`, each chunk at its own rank b.

        All ranks share one pair of matmuls at the largest rank `top`: chunk i keeps the first
        ranks[i] columns of the inner product, scaled by s(ranks[i]) (`columns`). Factors are cast to
        the activations' dtype, not x to float32, so backward saves no float32 copy of x.
        """
        A, B = self.lora_A[:top].to(x.dtype), self.lora_B[:, :top].to(x.dtype)
        keep = None
        if self.training and self.dropout > 0:  # one mask, however many times x is used below
            keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - self.dropout)
        frozen = self.mode == "frozen" and torch.is_grad_enabled()
        h = _dropout_linear(x, A.detach() if frozen else A, keep, self.dropout)
        if frozen:  # gradient to A only through column b-1 of a rank-b chunk (the value is unchanged)
            trained = trained.to(h.dtype)
            h_a = _dropout_linear(x.detach(), A, keep, self.dropout)
            h = h + _per_row(h_a - h_a.detach(), trained)
        h = h * self.rank_scale(top) if columns is None else _per_row(h, columns)
        delta = F.linear(h, B.detach() if frozen else B)
        if frozen:  # and to B only through column b-1
            z = F.linear(_per_row(h.detach(), trained), B)
            delta = delta + (z - z.detach())
        return delta

    def _rank_columns(self, ranks: tuple[int, ...], top: int) -> torch.Tensor:
        """(len(ranks), top): s(b) on the first b columns of row i (b = ranks[i]), zero elsewhere; while
        mixing, the nested mixture's column weights at b instead."""
        if self.mixing:
            rows = [self.nested.columns(b, self.rank_scale, top) for b in ranks]
            return torch.tensor(rows, dtype=torch.float32, device=self.lora_A.device)
        return self._plain_columns(ranks, top)

    def _plain_columns(self, ranks: tuple[int, ...], top: int) -> torch.Tensor:
        cols = torch.arange(top, device=self.lora_A.device)
        b = torch.tensor(ranks, device=cols.device)
        scales = torch.tensor([self.rank_scale(r) if r else 0.0 for r in ranks], device=cols.device)
        return (cols < b[:, None]) * scales[:, None]

    def _slice_columns(self, ranks: tuple[int, ...], top: int) -> torch.Tensor:
        """(len(ranks), top): 1 at column b-1 of row i (b = ranks[i]; none for b = 0), zero elsewhere."""
        cols = torch.arange(top, device=self.lora_A.device)
        return (cols == torch.tensor(ranks, device=cols.device)[:, None] - 1).float()

    def _dora(self, x: torch.Tensor, delta: torch.Tensor, norms: Callable[[torch.Tensor], torch.Tensor],
              off: torch.Tensor | None) -> torch.Tensor:
        """`m ⊙ (W + s·BA)/‖W + s·BA‖_row` applied to x, bias added after the rescaling.

        Uses `(m/n) ⊙ (x·Wᵀ + delta)` so the adapted weight is never materialised. The base's
        output already contains the bias, hence `+ (1 - m/n) ⊙ bias` to leave the bias unscaled.
        """
        weight = base_weight(self.base)
        scale = self.magnitude / norms(weight)  # (k, out); the norm is a constant in backward (DoRA §4.3)
        if off is not None:  # adapters off: the base output, whatever the magnitude has learnt
            scale = torch.where(off, 1.0, scale)
        y = _base_forward(self.base, x, weight)
        y = y + delta.to(y.dtype)
        out = _per_row(y, scale)
        bias = self.base.bias
        if bias is not None:
            out = out + _row_of_chunk((1 - scale) * bias.float(), y).to(y.dtype)
        return out

    def _dora_terms(self, weight: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
        """What every rank's DoRA norm shares, over the first `top` slices (call with autocast off):
        ‖W‖² per row, W·Aᵀ (out×top) and A·Aᵀ, all float32, and B[:, :top]."""
        A, B = self.lora_A[:top], self.lora_B[:, :top]
        w2 = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
        wa = F.linear(weight, A.to(weight.dtype)).float()
        return w2, wa, A @ A.T, B

    @torch.no_grad()
    def _dora_norms(self, weight: torch.Tensor, ranks: tuple[int, ...], top: int) -> torch.Tensor:
        """Row norms of `W + s(b)·B[:, :b]·A[:b]` for each rank b, shape (len(ranks), out), float32.

        Expanded as ‖W‖² + 2s·Σ B⊙(W·Aᵀ) + s²·Σ B⊙(B·A·Aᵀ) so only out×top and top×top products are
        formed, never another out×in matrix; W·Aᵀ and A·Aᵀ are shared by every rank.
        """
        # Autocast off: these small products decide every row's scale, keep them in float32.
        with torch.autocast(weight.device.type, enabled=False):
            w2, wa, aa, B = self._dora_terms(weight, top)
            per_rank = {0: w2.sqrt()}  # rank-0 chunks ignore it (scale 1) but keep the stack rectangular
            for b in set(ranks) - {0}:
                s, bb = self.rank_scale(b), B[:, :b]
                cross = (bb * wa[:, :b]).sum(dim=1)
                quad = ((bb @ aa[:b, :b]) * bb).sum(dim=1)
                per_rank[b] = (w2 + 2 * s * cross + s * s * quad).clamp(min=1e-12).sqrt()
        return torch.stack([per_rank[b] for b in ranks])

    @torch.no_grad()
    def _dora_column_norms(self, weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Row norms of `W + B·diag(c)·A` for each row c of `columns` (k, top): (k, out), float32.

        `_dora_norms` with a weight per column instead of s(b) on the first b: ‖W‖² + 2·Σ (B⊙c)⊙(W·Aᵀ)
        + Σ (B⊙c)⊙((B⊙c)·A·Aᵀ).
        """
        with torch.autocast(weight.device.type, enabled=False):
            w2, wa, aa, B = self._dora_terms(weight, columns.shape[1])
            norms = []
            for c in columns:
                bc = B * c
                cross, quad = (bc * wa).sum(dim=1), ((bc @ aa) * bc).sum(dim=1)
                norms.append((w2 + 2 * cross + quad).clamp(min=1e-12).sqrt())
        return torch.stack(norms)

    @torch.no_grad()
    def merged_linear(self, rank: int, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain `nn.Linear` equal to this layer at `rank` (0 = the base alone), bias kept.

        Merged in float32, stored in `dtype` (default: the base's compute dtype).
        """
        rank = check_rank(rank, self.r_max)
        if isinstance(rank, tuple):
            raise QdyloraError(f"merge needs one rank, got {rank}")
        weight = base_weight(self.base)
        w = weight.float()
        if rank > 0:
            w = w + self.rank_scale(rank) * (self.lora_B[:, :rank] @ self.lora_A[:rank])
            if self.variant == "dora":
                w = (self.magnitude / torch.linalg.vector_norm(w, dim=1))[:, None] * w
        bias = self.base.bias
        linear = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype or weight.dtype
        )
        linear.weight.copy_(w)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """All ranks: `lora_A` (r_max×in), `lora_B` (out×r_max) and, for DoRA, `magnitude` (out); copies."""
        state = {"lora_A": self.lora_A.detach().clone(), "lora_B": self.lora_B.detach().clone()}
        if self.variant == "dora":
            state["magnitude"] = self.magnitude.detach().clone()
        return state

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors `adapter_state` returns, without building them."""
        shapes = {"lora_A": (self.r_max, self.in_features), "lora_B": (self.out_features, self.r_max)}
        if self.variant == "dora":
            shapes["magnitude"] = (self.out_features,)
        return shapes

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors shaped as `adapter_shapes` into the factors (keys and shapes checked by the caller)."""
        self.lora_A.copy_(state["lora_A"])
        self.lora_B.copy_(state["lora_B"])
        if self.variant == "dora":
            self.magnitude.copy_(state["magnitude"])

    def extra_repr(self) -> str:
        nested = "" if self.nested is None else f", nested={list(self.nested.ranks)}/{self.nested.weight}"
        return (f"r_max={self.r_max}, alpha={self.alpha}, scale={self.scale}, mode={self.mode}, "
                f"variant={self.variant}, rank={self._rank}{nested}")


@dataclass
class _RankTensors:
    """A layer's ranks as tensors, one row per chunk (`DynamicRankLoRA.use_static_shapes`)."""

    columns: torch.Tensor | None = None  # (k, r_max) float32: s(b) on the first b columns
    mixed: torch.Tensor | None = None  # (k, r_max): the nested mixture's column weights, when one is set
    slices: torch.Tensor | None = None  # (k, r_max): 1 at column b-1 (mode frozen)
    off: torch.Tensor | None = None  # (k, 1) bool: rank 0


def _dropout_linear(x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """`dropout(x)·weightᵀ` with the dropout mask `keep` (None: no dropout)."""
    return F.linear(x, weight) if keep is None else _DropoutLinear.apply(x, weight, keep, 1 / (1 - p))


class _DropoutLinear(torch.autograd.Function):
    """(x ⊙ keep / (1-p))·Wᵀ that keeps x and the boolean mask for backward, not the dropped-out copy.

    Every adapter of a layer's input (q, k and v; gate and up) would otherwise save its own full copy
    of x; x itself is one tensor they share, and a mask is a byte per value.

    Under autocast the matmul runs in the autocast dtype whatever x and W are (on a GPU a LayerNorm
    model feeds float32 x to a bf16/fp16 step), but backward runs outside autocast: it computes in
    the dtype of `grad` (the forward matmul's), as autograd would for the casts and the linear this
    replaces, and returns each gradient in its input's dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        return F.linear(x * keep * scale, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, keep = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype) * keep * ctx.scale
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * ctx.scale).to(grad.dtype)
            grad_w = (grad.flatten(0, -2).T @ dropped.flatten(0, -2)).to(weight.dtype)
        return grad_x, grad_w, None, None


def _per_row(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Multiply the i-th of k contiguous batch chunks of `t` (N, ..., n) by `rows[i]`; `rows` is (k, n).

    Row j belongs to chunk ⌊j·k/N⌋: chunk sizes differ by at most one, and a batch of fewer than k
    rows (the short last batch of an epoch) leaves some ranks without rows. Evaluation repeats its
    batch k times, which gives k exact copies. A float32 `rows` (a scale s(b), DoRA's m/n) multiplies
    a bf16/fp16 `t` in float32, rounded once, as `t * s` with a Python float is: rounding the factor
    first would shift a whole rank's update by up to 0.4%.
    """
    factor = _row_of_chunk(rows, t)
    if factor.dtype == t.dtype:
        return t * factor
    return _MulRounded.apply(t, factor)


def chunk_of_rows(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """The chunk (0..k-1) of each of a batch's n rows when the batch runs at k ranks: row j is in ⌊j·k/n⌋."""
    return torch.arange(n, device=device) * k // n


def _row_of_chunk(rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`rows` (k, n) as a factor broadcasting over `t` (N, ..., n): batch row j gets its chunk's row."""
    k, n = rows.shape[0], t.shape[0]
    if k == 1:
        return rows[0]
    return rows[chunk_of_rows(n, k, rows.device)].view(n, *([1] * (t.dim() - 2)), -1)


class _MulRounded(torch.autograd.Function):
    """`t * factor` computed in float32 and returned in t's dtype, saving only t and factor for backward
    (a float32 copy of t would double what a DoRA layer keeps for backward)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(t if ctx.needs_input_grad[1] else None, factor)
        return (t.float() * factor).to(t.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        t, factor = ctx.saved_tensors
        grad_t = (grad.float() * factor).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_factor = (grad.float() * t.float()).sum_to_size(factor.shape) if ctx.needs_input_grad[1] else None
        return grad_t, grad_factor
