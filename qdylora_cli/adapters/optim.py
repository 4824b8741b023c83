"""`RankAwareAdamW`: AdamW for dynamic-rank adapters that updates only the rank slices a step trained.

A step at rank b uses `A[:b]` and `B[:, :b]`; plain AdamW would still decay the weights of the
other slices and move them with their old momentum. Before each step the training loop says which
slices it trained (`mark_trained`, from `trained_slices`), and only those rows of A and columns of B
are updated, together with their moments. Each slice counts its own steps, so its bias correction
is the one a LoRA trained only on the steps that used it would have. Every update is a handful of
`torch._foreach_*` calls over views of the trained slices: no Python loop over slices.

Parameters carry a slice dimension: 0 for A (a slice is a row), 1 for B (a column), None for
parameters every step trains (DoRA's magnitude). Under FSDP2 each process holds rows of A and B
(dim 0); the trained rows of A are intersected with the local ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from qdylora_cli.errors import QdyloraError

Slices = Sequence[tuple[int, int]]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The process-local part of a (possibly FSDP-sharded) tensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _first_local_row(p: torch.Tensor) -> int:
    """The global index of the first row this process holds (FSDP2 shards dim 0 like torch.chunk)."""
    if not hasattr(p, "placements") or all(pl.is_replicate() for pl in p.placements):
        return 0
    if len(p.placements) != 1 or not p.placements[0].is_shard(0):
        raise QdyloraError(f"adapter parameters sharded as {p.placements} are not supported; FSDP2 shards dim 0")
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    return min(rank * -(-p.shape[0] // world), p.shape[0])


class RankAwareAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) that steps only the marked rank slices.

    `params` are (parameter, slice dim) pairs. `mark_trained(slices)` before `step()` names the
    slices; an unmarked step trains every slice (plain AdamW).
    """

    def __init__(
        self,
        params: Iterable[tuple[nn.Parameter, int | None]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        pairs = list(params)
        group = {"params": [p for p, _ in pairs], "slice_dims": [d for _, d in pairs]}
        super().__init__([group], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.trained: list[tuple[int, int]] | None = None

    def mark_trained(self, slices: Slices) -> None:
        """The slices ([start, stop) ranges) the coming `step()` updates; none (an empty list): nothing moves."""
        self.trained = list(slices)

    def _ranges(self, p: torch.Tensor, dim: int | None) -> list[tuple[int, int]]:
        """The trained [start, stop) slice ranges of `p` in global indices; for dim None, [(0, 1)] or []."""
        if self.trained is None:
            return [(0, 1 if dim is None else p.shape[dim])]
        if dim is None:  # trained by every step that trained any slice
            return [(0, 1)] if self.trained else []
        return self.trained

    def _count(self, p: torch.Tensor, dim: int | None, steps: torch.Tensor) -> None:
        """One more step for every trained slice, this process's or not: under FSDP2 each process holds
        only some rows of A but the same counts for all of them, so any process's copy (the one a full
        optimizer state dict saves) is right for every row."""
        for start, stop in self._ranges(p, dim):
            if dim is None:
                steps.add_(1.0)
            elif dim == 0:
                steps[start:stop].add_(1.0)
            else:
                steps[:, start:stop].add_(1.0)

    def _views(self, p: torch.Tensor, dim: int | None, state: dict[str, torch.Tensor]) -> Iterator[tuple]:
        """(param, grad, exp_avg, exp_avg_sq, step count) views of every trained slice range of `p` held here."""
        tensors = [_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
        steps = state["slice_steps"]
        if dim is None:
            if self._ranges(p, dim):
                yield (*tensors, steps)
            return
        offset = _first_local_row(p) if dim == 0 else 0
        held = tensors[0].shape[0] if dim == 0 else p.shape[1]
        for start, stop in self._ranges(p, dim):
            lo, hi = max(start, offset), min(stop, offset + held)
            if lo >= hi:
                continue
            if dim == 0:
                yield (*(t[lo - offset : hi - offset] for t in tensors), steps[lo:hi])
            else:
                yield (*(t[:, lo:hi] for t in tensors), steps[:, lo:hi])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            views: list[tuple] = []
            for p, dim in zip(group["params"], group["slice_dims"], strict=True):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    # One count per slice, shaped to broadcast over it: (r, 1) for A, (1, r) for B.
                    shape = () if dim is None else (p.shape[0], 1) if dim == 0 else (1, p.shape[1])
                    state["slice_steps"] = torch.zeros(shape, dtype=torch.float32, device=_local(p).device)
                self._count(p, dim, state["slice_steps"])
                views += self._views(p, dim, state)
            if views:
                _adamw(*map(list, zip(*views, strict=True)), group)
        self.trained = None
        return loss


def _adamw(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list, group: dict) -> None:
    """One AdamW update of every view, each with the bias correction of its own slices' step counts
    (already counting this step)."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bias1 = torch._foreach_pow(beta1, steps)  # β1^t -> 1 - β1^t, per slice
    torch._foreach_neg_(bias1)
    torch._foreach_add_(bias1, 1.0)
    bias2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias2)
    torch._foreach_add_(bias2, 1.0)
    torch._foreach_sqrt_(bias2)
    # p -= lr · m / (1 - β1^t) / (√v / √(1 - β2^t) + ε), as torch.optim.AdamW computes it
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2)
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, bias1)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


def adapter_parameters(adapters: Iterable[nn.Module]) -> list[tuple[nn.Parameter, int | None]]:
    """(parameter, slice dim) of every adapter, in the order `RankAwareAdamW` and its checkpoints use."""
    pairs: list[tuple[nn.Parameter, int | None]] = []
    for adapter in adapters:
        pairs += [(adapter.lora_A, 0), (adapter.lora_B, 1)]
        if adapter.variant == "dora":
            pairs.append((adapter.magnitude, None))
    return pairs


def upgrade_per_slice_state(state_dict: dict[str, Any], adapters: Sequence[nn.Module]) -> dict[str, Any]:
    """An optimizer state saved by qdylora 0.1 (one parameter per rank slice), in `RankAwareAdamW`'s layout.

    0.1 registered, per adapter in module order, r_max rows of A, r_max columns of B and DoRA's
    magnitude, stepped by torch's AdamW (or bitsandbytes' 32-bit AdamW on CUDA). Slices no step had
    trained have no state: zero moments and a step count of 0. Already-upgraded states pass through.
    """
    groups = state_dict["param_groups"]
    if "slice_dims" in groups[0]:
        return state_dict
    old = state_dict["state"]
    expected = sum(2 * a.r_max + (a.variant == "dora") for a in adapters)
    if len(groups) != 1 or len(groups[0]["params"]) != expected:
        raise QdyloraError(
            f"the checkpoint's optimizer state holds {sum(len(g['params']) for g in groups)} tensors; "
            f"this model's adapters need {expected}: it belongs to another model or setting"
        )

    def part(index: int, key: str) -> torch.Tensor | None:
        entry = old.get(index)
        if entry is None:
            return None
        if key == "step":
            return torch.as_tensor(entry["step"], dtype=torch.float32)
        legacy = {"exp_avg": "state1", "exp_avg_sq": "state2"}[key]
        value = entry.get(key, entry.get(legacy))
        if value is None or not value.is_floating_point():
            raise QdyloraError("the checkpoint's optimizer state is 8-bit (bitsandbytes), which this version cannot "
                               "resume; start a new run (the finished adapter still evaluates and exports)")
        return value.float()

    new_state: dict[int, dict[str, torch.Tensor]] = {}
    dims: list[int | None] = []
    index = 0
    for adapter in adapters:
        for dim, shape in ((0, (1, adapter.in_features)), (1, (adapter.out_features, 1))):
            slices = range(index, index + adapter.r_max)
            index += adapter.r_max
            zero = torch.zeros(shape)
            new_state[len(dims)] = {
                key: torch.cat([part(i, key) if i in old else zero for i in slices], dim=dim)
                for key in ("exp_avg", "exp_avg_sq")
            }
            counts = torch.stack([part(i, "step") if i in old else torch.zeros(()) for i in slices])
            new_state[len(dims)]["slice_steps"] = counts.view(-1, 1) if dim == 0 else counts.view(1, -1)
            dims.append(dim)
        if adapter.variant == "dora":
            if index in old:
                new_state[len(dims)] = {key: part(index, key) for key in ("exp_avg", "exp_avg_sq")}
                new_state[len(dims)]["slice_steps"] = part(index, "step")
            dims.append(None)
            index += 1
    saved = groups[0]
    group = {k: saved[k] for k in ("lr", "betas", "eps", "weight_decay", "initial_lr") if k in saved}
    group["betas"] = tuple(group["betas"])
    group |= {"params": list(range(len(dims))), "slice_dims": dims}
    return {"state": new_state, "param_groups": [group]}
