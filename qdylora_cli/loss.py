"""The language-model loss: cross-entropy of each next-token prediction, in float32, summed by the caller.

Position t predicts label t+1; labels of IGNORE_INDEX (prompt, padding, the first token of a packed
example) carry no loss. Training divides the sum by the loss tokens of its whole optimizer step, so
every token weighs the same however the tokens fall into micro-batches and processes; evaluation
divides by the loss tokens of each rank. `distill_losses` is the in-place distillation term
(rank_schedule.distill): a lower rank's KL to the step's top rank, at the same positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qdylora_cli.datacache import IGNORE_INDEX


def loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The tokens of each row (N, L) that carry a loss: (N,)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, L) float32: the loss of predicting labels[:, t + 1] from logits[:, t]; 0 where there is none.

    The labels are shifted, not the logits, so the (large) logits are never copied (`_ChunkedCrossEntropy`).
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return _ChunkedCrossEntropy.apply(logits.flatten(0, 1), shifted.flatten()).view(labels.shape)


_CHUNK_VALUES = 1 << 24  # logits converted to float32 at a time (64 MiB)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of each row of `logits` (M, V) against `targets` (M,), in float32, a chunk of rows at
    a time: neither the float32 logits nor their softmax is ever whole. With Llama 3's 128k vocabulary
    at 2×2048 tokens each would be 2 GiB; F.cross_entropy keeps both (one for backward). Backward
    recomputes each chunk from the logits, kept in their own dtype.

    Each chunk is F.cross_entropy itself, forward and (through autograd, in backward) gradient: the
    operations are row by row, so the values and gradients are bit for bit those of one
    F.cross_entropy over all rows, and runs trained before the loss was chunked train the same.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        for rows in _chunks(logits):
            losses[rows] = F.cross_entropy(logits[rows].float(), targets[rows], ignore_index=IGNORE_INDEX,
                                           reduction="none")
        ctx.save_for_backward(logits, targets)
        return losses

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for rows in _chunks(logits):
            with torch.enable_grad():  # the chunk's own graph: F.cross_entropy's backward, then the cast's
                chunk = logits[rows].detach().requires_grad_()
                losses = F.cross_entropy(chunk.float(), targets[rows], ignore_index=IGNORE_INDEX, reduction="none")
                (grad_logits[rows],) = torch.autograd.grad(losses, chunk, grad[rows])
        return grad_logits, None


def _chunks(logits: torch.Tensor) -> list[slice]:
    rows = max(1, _CHUNK_VALUES // max(1, logits.shape[-1]))
    return [slice(start, start + rows) for start in range(0, len(logits), rows)]


def distill_losses(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, L) float32: KL(teacher ‖ student) of each prediction that carries a loss (0 elsewhere), in nats.

    At position t, Σ_v q_t(v)·(log q_t(v) - log p_t(v)), with p = softmax(logits[:, t]) and q =
    softmax(teacher_logits[:, t]), where labels[:, t + 1] carries a loss: the positions `token_losses`
    scores. Only the student's logits get a gradient, p - q per position (the teacher's are constants);
    only loss positions go through the float32 softmaxes.
    """
    mask = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX
    student = F.log_softmax(logits[mask].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.detach()[mask].float(), dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(dim=-1)
    return torch.zeros(labels.shape, dtype=kl.dtype, device=kl.device).index_put((mask,), kl)
