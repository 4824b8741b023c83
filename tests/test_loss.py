"""The language-model loss: chunked cross-entropy equals PyTorch's, values and gradients."""

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
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_grad.float(), theirs_grad.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 8e-3)


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
