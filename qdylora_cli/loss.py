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

from qdylora_cli.data import IGNORE_INDEX


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
    recomputes each chunk's softmax from the logits, kept in their own dtype, and the saved logsumexp.
    The values are F.cross_entropy's: logsumexp(x) - x[target].
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        picked = torch.where(valid, targets, 0)
        lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        losses = torch.empty_like(lse)
        for rows in _chunks(logits):
            chunk = logits[rows].float()
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            losses[rows] = lse[rows] - chunk.gather(1, picked[rows, None]).squeeze(1)
        ctx.save_for_backward(logits, picked, valid, lse)
        return losses.masked_fill_(~valid, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, picked, valid, lse = ctx.saved_tensors
        grad = grad.float() * valid
        grad_logits = torch.empty_like(logits)
        for rows in _chunks(logits):
            softmax = (logits[rows].float() - lse[rows, None]).exp_()  # d loss / d logits = softmax - one_hot
            softmax.scatter_add_(1, picked[rows, None], torch.full_like(lse[rows, None], -1.0))
            grad_logits[rows] = softmax.mul_(grad[rows, None])
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
