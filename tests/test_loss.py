"""The language-model loss: chunked cross-entropy equals PyTorch's, values and gradients; the distillation term by hand."""

import pytest
import torch
import torch.nn.functional as F

from qdylora_cli import loss
from qdylora_cli.data import IGNORE_INDEX


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_cross_entropy_equals_pytorch_s_in_value_and_gradient(monkeypatch, dtype):
    monkeypatch.setattr(loss, "_CHUNK_VALUES", 300)  # 6 rows of 50 per chunk: 4 chunks, the last one short
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, 3] = labels[1, 1:] = IGNORE_INDEX  # a prompt token, a row without loss
    grad = torch.randn(3, 7)
    ours = loss.token_losses(logits, labels)
    (ours_grad,) = torch.autograd.grad(ours, logits, grad)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    theirs = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view(3, 7)
    (theirs_grad,) = torch.autograd.grad(theirs, logits, grad)
    assert ours.dtype == torch.float32 and ours[1].eq(0).all() and ours[0, 2] == 0
    # Bit for bit: each chunk is F.cross_entropy, row by row, so runs trained before the chunking train the same.
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)


def test_no_float32_copy_of_the_logits_is_ever_whole():
    """With 2×2048 tokens of a 128k vocabulary the float32 logits are 2 GiB: the loss converts chunks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qdylora_cli.plan import DeviceMemory

    with FakeTensorMode():
        logits = torch.empty(2, 2048, 128256, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.zeros(2, 2048, dtype=torch.long)
        memory = DeviceMemory()
        with memory:
            memory.hold(logits, "logits")
            loss.token_losses(logits, labels).sum().backward()
    extra = max(total for total, _ in memory.peaks.values()) - 2 * 2048 * 128256 * 2
    assert extra < 2 * 2048 * 128256 * 2 + 4 * loss._CHUNK_VALUES * 4  # the gradient, and chunk temporaries


def test_distillation_loss_and_gradient_by_hand():
    """KL(teacher ‖ student) at each position that carries a loss, written out in float64 with explicit
    exponentials; its gradient to the student's logits is p - q there and 0 elsewhere; the teacher gets none."""
    torch.manual_seed(1)
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :3] = IGNORE_INDEX  # a prompt: positions 0 and 1 predict no loss token
    labels[1, 4] = IGNORE_INDEX  # padding: position 3 predicts none; the last position never does
    weight = torch.randn(2, 5)
    kl = loss.distill_losses(student, teacher, labels)
    (kl * weight).sum().backward()

    want_kl, want_grad = torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, 5, 7, dtype=torch.float64)
    for n in range(2):
        for t in range(5):
            if t + 1 == 5 or labels[n, t + 1] == IGNORE_INDEX:
                continue
            ep, eq = student[n, t].detach().double().exp(), teacher[n, t].detach().double().exp()
            p, q = ep / ep.sum(), eq / eq.sum()
            want_kl[n, t] = sum(q[v] * (q[v].log() - p[v].log()) for v in range(7))
            want_grad[n, t] = weight[n, t] * (p - q)  # d/dz of Σ q log q - Σ q (z - logsumexp z)
    assert kl.dtype == torch.float32 and (kl[want_kl == 0] == 0).all() and (kl >= 0).all()
    assert want_kl.count_nonzero() == 5  # positions 2, 3 of row 0; 0, 1, 2 of row 1
    torch.testing.assert_close(kl.double(), want_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    assert teacher.grad is None  # the teacher is detached: a constant target
    same = loss.distill_losses(teacher.detach(), teacher.detach(), labels)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-6)  # a student equal to its teacher: 0
