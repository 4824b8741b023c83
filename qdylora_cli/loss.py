"""The language-model loss: cross-entropy of each next-token prediction, in float32, summed by the caller.

Position t predicts label t+1; labels of IGNORE_INDEX (prompt, padding, the first token of a packed
example) carry no loss. Training divides the sum by the loss tokens of its whole optimizer step, so
every token weighs the same however the tokens fall into micro-batches and processes; evaluation
divides by the loss tokens of each rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qdylora_cli.data import IGNORE_INDEX


def loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The tokens of each row (N, L) that carry a loss: (N,)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, L) float32: the loss of predicting labels[:, t + 1] from logits[:, t]; 0 where there is none.

    The labels are shifted, not the logits, so the (large) logits are never copied but for float32.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.view(labels.shape)
