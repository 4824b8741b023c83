"""Validation loss of many ranks at once.

The base weights are the same for every rank, so ranks are evaluated together: the batch is
repeated once per rank and each adapter applies its own rank to its chunk (see `set_rank` with a
tuple), so every NF4 weight is dequantized once per batch for all ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from qdylora_cli.adapters import set_rank


@torch.no_grad()
def _chunk_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], ranks: Sequence[int]) -> torch.Tensor:
    """Summed token loss and token count for each rank in `ranks` on one batch: shape (len(ranks), 2)."""
    k = len(ranks)
    set_rank(model, ranks[0] if k == 1 else tuple(ranks))
    input_ids = batch["input_ids"].repeat(k, 1)
    attention_mask = batch["attention_mask"].repeat(k, 1)
    labels = batch["labels"].repeat(k, 1)[:, 1:]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    token_loss = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    ).view(k, -1)
    counts = (labels != -100).view(k, -1).sum(dim=1)
    return torch.stack([token_loss.sum(dim=1), counts.to(token_loss.dtype)], dim=1)


@torch.no_grad()
def rank_losses(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    ranks: Sequence[int],
    *,
    ranks_per_pass: int = 8,
    device: torch.device | str = "cpu",
) -> dict[int, float]:
    """Mean token loss per rank over `batches` (rank 0 = the base model alone)."""
    was_training = model.training
    model.eval()
    ranks = list(ranks)
    totals = torch.zeros(len(ranks), 2, dtype=torch.float64)
    groups = [list(range(i, min(i + ranks_per_pass, len(ranks)))) for i in range(0, len(ranks), ranks_per_pass)]
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        for idx in groups:
            totals[idx] += _chunk_losses(model, batch, [ranks[i] for i in idx]).double().cpu()
    model.train(was_training)
    return {r: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, r in enumerate(ranks)}
