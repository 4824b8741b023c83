"""`DynamicRankLoRA`: one adapter that holds every LoRA rank 1..r_max at once (DyLoRA), on a float or NF4 base.

At rank b the layer computes `y = base(x) + (α/b)·dropout(x)·A[:b]ᵀ·B[:, :b]ᵀ` (SPEC §2); variant
`dora` rescales each output row to a learned magnitude (SPEC §3).

A is stored as r_max parameters of shape 1×in and B as r_max parameters of shape out×1 rather than
two matrices: slices a step does not use then have `grad is None`, so every optimizer (torch AdamW,
bitsandbytes) skips them entirely: no weight decay, no momentum drift on rows that got no gradient.
Zeroing gradients with `set_to_none=False` would defeat this, so train loops must not do that.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qdylora_cli.errors import QdyloraError

if TYPE_CHECKING:
    from qdylora_cli.quant import NF4Linear

MODES = ("frozen", "full")
VARIANTS = ("lora", "dora")
Rank = int | tuple[int, ...]


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

    `rank` selects what forward computes: 0 = the base alone, b = rank b, a tuple = one rank per
    equal chunk of the batch (multi-rank evaluation with one base matmul). Mode `frozen` trains
    only slice b (A row b, B column b) at rank b, the slices below being used but detached;
    `full` trains slices 1..b (with a tuple, b is its largest rank). Adapter parameters are
    float32 master weights; the adapter path computes in the input's dtype.
    """

    def __init__(
        self,
        base: nn.Linear | NF4Linear,
        r_max: int,
        alpha: float,
        dropout: float = 0.0,
        mode: str = "frozen",
        variant: str = "lora",
    ) -> None:
        super().__init__()
        if not isinstance(r_max, int) or r_max < 1:
            raise QdyloraError(f"adapter r_max must be a positive integer, got {r_max!r}")
        if mode not in MODES:
            raise QdyloraError(f"adapter mode {mode!r} is unknown; expected one of {', '.join(MODES)}")
        if variant not in VARIANTS:
            raise QdyloraError(f"adapter variant {variant!r} is unknown; expected one of {', '.join(VARIANTS)}")
        if not 0.0 <= dropout < 1.0:
            raise QdyloraError(f"adapter dropout must be in [0, 1), got {dropout}")
        base.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r_max, self.alpha, self.mode, self.variant = r_max, float(alpha), mode, variant
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        device = next(itertools.chain(base.parameters(), base.buffers())).device
        # Kaiming over the whole r_max×in matrix, as one LoRA A would be, then cut into rank slices.
        a = torch.empty(r_max, self.in_features, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.ParameterList(nn.Parameter(row.clone()) for row in a.split(1, dim=0))
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(self.out_features, 1, device=device)) for _ in range(r_max)
        )
        if variant == "dora":
            with torch.no_grad():
                w = base_weight(base)
                self.magnitude = nn.Parameter(torch.linalg.vector_norm(w, dim=1, dtype=torch.float32))
        self._rank: Rank = r_max

    @property
    def rank(self) -> Rank:
        return self._rank

    @rank.setter
    def rank(self, value: Rank) -> None:
        self._rank = check_rank(value, self.r_max)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`A[:rank]` (rank×in) and `B[:, :rank]` (out×rank), detached below `rank` in frozen mode."""
        a, b = list(self.lora_A)[:rank], list(self.lora_B)[:rank]
        if self.mode == "frozen":
            a = [p.detach() for p in a[:-1]] + a[-1:]
            b = [p.detach() for p in b[:-1]] + b[-1:]
        return torch.cat(a, dim=0), torch.cat(b, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ranks = self._rank if isinstance(self._rank, tuple) else (self._rank,)
        top = max(ranks)
        if top == 0:
            return self.base(x)
        A, B = self.factors(top)
        # Factors cast to the activations' dtype, not x to float32, so backward saves no float32 copy of x.
        h = F.linear(self.dropout(x), A.to(x.dtype))  # (..., top): all ranks share one matmul
        if len(ranks) == 1:
            h = h * (self.alpha / top)
        else:  # chunk i keeps its first ranks[i] columns, scaled by α/ranks[i]
            h = _per_chunk(h, self._rank_columns(ranks, top).to(h.dtype))
        if self.variant == "dora":
            return self._dora(x, A, B, h, ranks)
        y = self.base(x)
        return y + F.linear(h, B.to(h.dtype)).to(y.dtype)

    def _rank_columns(self, ranks: tuple[int, ...], top: int) -> torch.Tensor:
        """(len(ranks), top): α/b on the first b columns of row i (b = ranks[i]), zero elsewhere."""
        cols = torch.arange(top, device=self.lora_A[0].device)
        b = torch.tensor(ranks, device=cols.device)
        return (cols < b[:, None]) * (self.alpha / b.clamp(min=1))[:, None]

    def _dora(
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        h: torch.Tensor,
        ranks: tuple[int, ...],
    ) -> torch.Tensor:
        """`m ⊙ (W + s·BA)/‖W + s·BA‖_row` applied to x, bias added after the rescaling.

        Uses `(m/n) ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ)` so the adapted weight is never materialised. The base's
        output already contains the bias, hence `+ (1 - m/n) ⊙ bias` to leave the bias unscaled.
        """
        weight = base_weight(self.base)
        norms = self._dora_norms(weight, A, B, ranks)
        scale = self.magnitude / norms  # (k, out); the norm is a constant in backward (DoRA §4.3)
        if 0 in ranks:  # adapters off: the base output, whatever the magnitude has learnt
            scale = torch.where(torch.tensor(ranks, device=scale.device)[:, None] == 0, 1.0, scale)
        y = _base_forward(self.base, x, weight)
        y = y + F.linear(h, B.to(h.dtype)).to(y.dtype)
        bias = self.base.bias
        scale = scale.to(y.dtype)
        out = _per_chunk(y, scale)
        if bias is not None:
            out = out + _per_chunk(bias.to(y.dtype).expand_as(y), 1 - scale)
        return out

    @torch.no_grad()
    def _dora_norms(self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
        """Row norms of `W + (α/b)·B[:, :b]·A[:b]` for each rank b, shape (len(ranks), out), float32.

        Expanded as ‖W‖² + 2s·Σ B⊙(W·Aᵀ) + s²·Σ B⊙(B·A·Aᵀ) so only out×top and top×top products are
        formed, never another out×in matrix; W·Aᵀ and A·Aᵀ are shared by every rank.
        """
        # Autocast off: these small products decide every row's scale, keep them in float32.
        with torch.autocast(weight.device.type, enabled=False):
            w2 = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
            wa = F.linear(weight, A.to(weight.dtype)).float()  # out×top
            A, B = A.float(), B.float()
            aa = A @ A.T
            per_rank = {0: w2.sqrt()}  # rank-0 chunks ignore it (scale 1) but keep the stack rectangular
            for b in set(ranks) - {0}:
                s, bb = self.alpha / b, B[:, :b]
                cross = (bb * wa[:, :b]).sum(dim=1)
                quad = ((bb @ aa[:b, :b]) * bb).sum(dim=1)
                per_rank[b] = (w2 + 2 * s * cross + s * s * quad).clamp(min=1e-12).sqrt()
        return torch.stack([per_rank[b] for b in ranks])

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
            A, B = self.factors(rank)
            w = w + (self.alpha / rank) * (B @ A)
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
        """All ranks: `lora_A` (r_max×in), `lora_B` (out×r_max) and, for DoRA, `magnitude` (out)."""
        state = {
            "lora_A": torch.cat([p.detach() for p in self.lora_A], dim=0),
            "lora_B": torch.cat([p.detach() for p in self.lora_B], dim=1),
        }
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
        """Copy tensors shaped as `adapter_shapes` into the rank slices (keys and shapes checked by the caller)."""
        for i, p in enumerate(self.lora_A):
            p.copy_(state["lora_A"][i : i + 1])
        for i, p in enumerate(self.lora_B):
            p.copy_(state["lora_B"][:, i : i + 1])
        if self.variant == "dora":
            self.magnitude.copy_(state["magnitude"])

    def extra_repr(self) -> str:
        return f"r_max={self.r_max}, alpha={self.alpha}, mode={self.mode}, variant={self.variant}, rank={self._rank}"


def _per_chunk(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Multiply the i-th of k equal batch chunks of `t` (..., n) by `rows[i]`; `rows` is (k, n)."""
    k = rows.shape[0]
    if k == 1:
        return t * rows[0]
    if t.shape[0] % k:
        raise QdyloraError(f"multi-rank forward: a batch of {t.shape[0]} does not split into {k} equal chunks, one per rank")
    chunks = t.unflatten(0, (k, t.shape[0] // k))
    return (chunks * rows.view(k, *([1] * (chunks.dim() - 2)), -1)).flatten(0, 1)
