"""Dynamic-rank adapters: the rank-b formula for every scale, frozen/full gradients, multi-rank
forwards and their gradients, still slices under the rank-aware optimizer, DoRA, merging, rank
samplers, and injection into small Llamas."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qdylora_cli.adapters import (
    DynamicRankLoRA,
    NestedRanks,
    RankAwareAdamW,
    adapter_parameters,
    adapter_state_dict,
    assign_ranks,
    build_rank_sampler,
    count_parameters,
    inject_adapters,
    iter_adapters,
    load_adapter_state_dict,
    merge_adapters,
    rank_scale,
    set_nested,
    set_rank,
    trained_slices,
)
from qdylora_cli.config import QuantConfig
from qdylora_cli.errors import QdyloraError
from qdylora_cli.loading import quantize_model
from qdylora_cli.quant import NF4Linear

R_MAX, ALPHA = 6, 4.0


def make_adapter(variant="lora", mode="frozen", bias=True, base="linear", seed=0, dropout=0.0,
                 scale="alpha_over_rank"):
    """An adapter on a 24→32 layer with random B (a fresh B is zero, which would hide mistakes)."""
    torch.manual_seed(seed)
    linear = nn.Linear(24, 32, bias=bias)
    if base == "nf4":
        linear = NF4Linear.from_linear(linear, blocksize=64)
    adapter = DynamicRankLoRA(linear, R_MAX, ALPHA, dropout=dropout, mode=mode, variant=variant, scale=scale)
    with torch.no_grad():
        adapter.lora_B.normal_(0, 0.3)
        if variant == "dora":
            adapter.magnitude.mul_(torch.rand(32) + 0.5)
    return adapter


def weights(adapter):
    w = adapter.base.weight if isinstance(adapter.base, nn.Linear) else adapter.base.dequantize()
    A, B = adapter.adapter_state()["lora_A"], adapter.adapter_state()["lora_B"]
    return w, adapter.base.bias, A, B


SCALE_BY_HAND = {  # SPEC §2, written out for R_MAX and ALPHA
    "alpha_over_rank": lambda b: ALPHA / b,
    "rank_stabilized": lambda b: (ALPHA / R_MAX) * math.sqrt(R_MAX / b),
    "constant": lambda b: ALPHA / R_MAX,
}


def lora_by_hand(adapter, x, b, scale="alpha_over_rank"):
    w, bias, A, B = weights(adapter)
    y = F.linear(x, w, bias)
    return y if b == 0 else y + SCALE_BY_HAND[scale](b) * x @ A[:b].T @ B[:, :b].T


def dora_by_hand(adapter, x, b, detach_norm=True, params=None):
    """DoRA written from its definition: W' = m ⊙ V/‖V‖_row with V = W + s·B[:, :b]A[:b]; bias unscaled."""
    w, bias, A, B = weights(adapter)
    m = adapter.magnitude
    if params is not None:
        A, B, m = params
    if b == 0:
        return F.linear(x, w, bias)
    v = w + (ALPHA / b) * B[:, :b] @ A[:b]
    norm = v.norm(dim=1, keepdim=True)
    return F.linear(x, m[:, None] * v / (norm.detach() if detach_norm else norm), bias)


# ---- the layer ----


def test_fresh_adapter_is_the_base_and_a_is_kaiming_over_the_whole_matrix():
    torch.manual_seed(0)
    linear = nn.Linear(24, 32)
    adapter = DynamicRankLoRA(linear, R_MAX, ALPHA)
    A, B = adapter.adapter_state()["lora_A"], adapter.adapter_state()["lora_B"]
    assert A.shape == (R_MAX, 24) and B.shape == (32, R_MAX)
    assert A.abs().max() <= 1 / math.sqrt(24) and A.std() > 0.5 / math.sqrt(3 * 24)
    assert not B.any()
    x = torch.randn(3, 24)
    torch.testing.assert_close(adapter(x), linear(x))
    assert not any(p.requires_grad for p in adapter.base.parameters())


@pytest.mark.parametrize("scale", list(SCALE_BY_HAND))
@pytest.mark.parametrize("base", ["linear", "nf4"])
@pytest.mark.parametrize("b", [0, 1, 3, R_MAX])
def test_rank_b_output_is_the_lora_formula_at_every_scale(base, b, scale):
    adapter = make_adapter(base=base, scale=scale)
    adapter.rank = b
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(adapter(x), lora_by_hand(adapter, x, b, scale), atol=1e-5, rtol=1e-5)


def test_scales_agree_at_r_max_and_differ_below():
    for b in range(1, R_MAX + 1):
        for name, by_hand in SCALE_BY_HAND.items():
            assert rank_scale(name, ALPHA, R_MAX, b) == pytest.approx(by_hand(b), rel=1e-12)
    assert len({rank_scale(name, ALPHA, R_MAX, R_MAX) for name in SCALE_BY_HAND}) == 1
    assert len({rank_scale(name, ALPHA, R_MAX, 2) for name in SCALE_BY_HAND}) == 3
    with pytest.raises(QdyloraError, match="adapter.scale 'alpha/b' is unknown"):
        rank_scale("alpha/b", ALPHA, R_MAX, 1)


def _grad_slices(adapter, b):
    """The rank slices (1-based) whose rows of A and columns of B got a nonzero gradient."""
    adapter.rank = b
    adapter(torch.randn(4, 24)).pow(2).sum().backward()
    a = adapter.lora_A.grad.abs().sum(dim=1) > 0
    bb = adapter.lora_B.grad.abs().sum(dim=0) > 0
    assert a.tolist() == bb.tolist()
    return [i + 1 for i, has in enumerate(a.tolist()) if has]


def test_frozen_mode_trains_only_slice_b_and_full_mode_slices_1_to_b():
    for b in (1, 3, R_MAX):
        assert _grad_slices(make_adapter(mode="frozen"), b) == [b]
        assert _grad_slices(make_adapter(mode="full"), b) == list(range(1, b + 1))
    assert trained_slices(3, "frozen") == [(2, 3)] and trained_slices(3, "full") == [(0, 3)]
    assert trained_slices((1, 2, 5, 2), "frozen") == [(0, 2), (4, 5)]
    assert trained_slices((1, 2, 5), "full") == [(0, 5)] and trained_slices(0, "full") == []


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_multi_rank_gradient_is_the_sum_of_each_chunks_single_rank_gradient(mode, variant):
    """Several ranks per step: chunk i trains at ranks[i], and the gradient is the sum of those runs' gradients."""
    ranks = (2, 5, 2, R_MAX)
    x = torch.randn(len(ranks) * 3, 24)
    target = torch.randn(len(ranks) * 3, 32)
    adapter = make_adapter(mode=mode, variant=variant)
    params = [p for p in adapter.parameters() if p.requires_grad]
    adapter.rank = ranks
    (adapter(x) - target).pow(2).sum().backward()
    together = [p.grad.clone() for p in params]
    adapter.zero_grad(set_to_none=True)
    for i, b in enumerate(ranks):
        adapter.rank = b
        rows = slice(3 * i, 3 * (i + 1))
        (adapter(x[rows]) - target[rows]).pow(2).sum().backward()
    for got, want in zip(together, [p.grad for p in params]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def per_slice_reference(adapter):
    """The 0.1 design the optimizer replaces: one parameter per rank slice, stepped by torch's AdamW."""
    a = [nn.Parameter(row.clone()) for row in adapter.lora_A.detach().split(1, dim=0)]
    b = [nn.Parameter(col.clone()) for col in adapter.lora_B.detach().split(1, dim=1)]
    extra = [nn.Parameter(adapter.magnitude.detach().clone())] if adapter.variant == "dora" else []
    return a, b, extra


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_rank_aware_adamw_equals_adamw_on_one_parameter_per_slice(mode, variant):
    """Packed factors + RankAwareAdamW move exactly as per-slice parameters under torch AdamW would:
    same moments, per-slice bias correction, weight decay only on trained slices."""
    adapter = make_adapter(mode=mode, variant=variant)
    a, b, extra = per_slice_reference(adapter)
    reference = torch.optim.AdamW([*a, *b, *extra], lr=1e-2, weight_decay=0.1)
    ours = RankAwareAdamW(adapter_parameters([adapter]), lr=1e-2, weight_decay=0.1)
    for ranks in [(4,), (2,), (6,), (2, 5), (1,), (5,), (3, 3)]:
        x = torch.randn(4 * len(ranks), 24)
        adapter.rank = ranks if len(ranks) > 1 else ranks[0]
        adapter(x).pow(2).mean().backward()
        grads = [adapter.lora_A.grad, adapter.lora_B.grad]
        # The reference gets the same gradient on exactly the slices the step trained (None elsewhere).
        trained = {i for start, stop in trained_slices(ranks, mode) for i in range(start, stop)}
        for i in range(R_MAX):
            a[i].grad = grads[0][i : i + 1].clone() if i in trained else None
            b[i].grad = grads[1][:, i : i + 1].clone() if i in trained else None
        if extra:
            extra[0].grad = adapter.magnitude.grad.clone()
        ours.mark_trained(trained_slices(ranks, mode))
        ours.step()
        reference.step()
        ours.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        torch.testing.assert_close(adapter.lora_A.detach(), torch.cat([p.detach() for p in a]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.lora_B.detach(), torch.cat([p.detach() for p in b], 1), rtol=1e-5, atol=1e-6)
        if extra:
            torch.testing.assert_close(adapter.magnitude.detach(), extra[0].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_optimizer_steps_leave_untouched_slices_bit_identical(mode):
    adapter = make_adapter(mode=mode, variant="dora")
    opt = RankAwareAdamW(adapter_parameters([adapter]), lr=1e-2, weight_decay=0.1)
    for b in (4, 2, 6, 2, 1, 5):  # earlier steps leave momentum in slices a later step does not use
        adapter.rank = b
        before_a, before_b = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
        adapter(torch.randn(8, 24)).pow(2).mean().backward()
        opt.mark_trained(trained_slices(b, mode))
        opt.step()
        opt.zero_grad(set_to_none=True)
        touched = {b} if mode == "frozen" else set(range(1, b + 1))
        for i in range(R_MAX):
            same_a = torch.equal(before_a[i], adapter.lora_A[i])
            same_b = torch.equal(before_b[:, i], adapter.lora_B[:, i])
            assert (same_a, same_b) == ((False, False) if i + 1 in touched else (True, True)), (b, i)


@pytest.mark.parametrize("base", ["linear", "nf4"])
@pytest.mark.parametrize("bias", [True, False])
def test_dora_output_is_the_dora_formula(base, bias):
    adapter = make_adapter(variant="dora", base=base, bias=bias)
    x = torch.randn(2, 5, 24)
    for b in (0, 1, 4, R_MAX):
        adapter.rank = b
        torch.testing.assert_close(adapter(x), dora_by_hand(adapter, x, b), atol=1e-5, rtol=1e-5)


def test_fresh_dora_is_the_base():
    torch.manual_seed(0)
    linear = nn.Linear(24, 32)
    adapter = DynamicRankLoRA(linear, R_MAX, ALPHA, variant="dora")
    torch.testing.assert_close(adapter.magnitude, linear.weight.norm(dim=1))
    x = torch.randn(3, 24)
    torch.testing.assert_close(adapter(x), linear(x))


def test_dora_norm_is_a_constant_in_backward():
    adapter = make_adapter(variant="dora", mode="full")
    adapter.rank = 4
    x = torch.randn(6, 24, requires_grad=True)
    target = torch.randn(6, 32)
    (adapter(x) - target).pow(2).sum().backward()
    got = [adapter.lora_A.grad[:4], adapter.lora_B.grad[:, :4], adapter.magnitude.grad, x.grad]

    _, _, A, B = weights(adapter)
    leaves = [A.clone().requires_grad_(), B.clone().requires_grad_(), adapter.magnitude.detach().clone().requires_grad_()]
    x2 = x.detach().clone().requires_grad_()
    grads = {}
    for detach in (True, False):
        y = dora_by_hand(adapter, x2, 4, detach_norm=detach, params=leaves)
        grads[detach] = torch.autograd.grad((y - target).pow(2).sum(), [*leaves, x2])
    want = [grads[True][0][:4], grads[True][1][:, :4], grads[True][2], grads[True][3]]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # ...and the detached gradient really differs from the exact one, so the check has teeth.
    assert not torch.allclose(grads[True][0], grads[False][0], atol=1e-4)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("base", ["linear", "nf4"])
def test_merged_linear_equals_the_adapter(variant, base):
    adapter = make_adapter(variant=variant, base=base)
    x = torch.randn(7, 24)
    for b in (0, 2, R_MAX):
        adapter.rank = b
        merged = adapter.merged_linear(b)
        assert type(merged) is nn.Linear and merged.bias is not None
        torch.testing.assert_close(merged(x), adapter(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("base", ["linear", "nf4"])
def test_multi_rank_forward_equals_single_rank_forwards(variant, base):
    adapter = make_adapter(variant=variant, base=base)
    ranks = (1, 0, 4, R_MAX, 4)
    x = torch.randn(3, 5, 24)
    adapter.rank = ranks
    together = adapter(x.repeat(len(ranks), 1, 1))
    for i, b in enumerate(ranks):
        adapter.rank = b
        torch.testing.assert_close(together[3 * i : 3 * (i + 1)], adapter(x), atol=1e-5, rtol=1e-5)


def test_multi_rank_chunks_differ_by_at_most_one_row():
    adapter = make_adapter()
    x = torch.randn(5, 24)
    adapter.rank = (1, 3)  # rows 0-2 (chunk 0: ⌊j·2/5⌋ = 0 for j < 3) at rank 1, rows 3-4 at rank 3
    together = adapter(x)
    for rows, b in ((slice(0, 3), 1), (slice(3, 5), 3)):
        adapter.rank = b
        torch.testing.assert_close(together[rows], adapter(x[rows]), atol=1e-5, rtol=1e-5)
    adapter.rank = (1, 2, 3)  # fewer rows than ranks (an epoch's short last batch): rows 0 and 1 take ranks 1 and 2
    x = x[:2]
    together = adapter(x)
    for row, b in ((0, 1), (1, 2)):
        adapter.rank = b
        torch.testing.assert_close(together[row], adapter(x[row : row + 1])[0], atol=1e-5, rtol=1e-5)


def test_multi_rank_dequantizes_the_base_once(monkeypatch):
    adapter = make_adapter(variant="dora", base="nf4")
    calls = []
    real = NF4Linear.dequantize
    monkeypatch.setattr(NF4Linear, "dequantize", lambda self: calls.append(1) or real(self))
    adapter.rank = (1, 2, 3, 6)
    adapter(torch.randn(8, 24))
    assert len(calls) == 1


def test_checkpointed_forward_with_dropout_matches_the_plain_one():
    adapter = make_adapter(mode="full", dropout=0.3, variant="dora")
    adapter.rank = 5
    x = torch.randn(4, 24)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(1)
        y = checkpoint(adapter, x, use_reentrant=False) if use_checkpoint else adapter(x)
        y.pow(2).sum().backward()
        grads.append((y.detach(), [adapter.lora_A.grad[:5].clone()]))
        adapter.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_dropout_is_one_mask_on_the_input_with_the_exact_gradient(mode):
    adapter = make_adapter(mode=mode, dropout=0.3)
    adapter.rank = 4
    x = torch.randn(5, 24, requires_grad=True)
    torch.manual_seed(7)
    adapter(x).pow(2).sum().backward()
    got = [adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone(), x.grad.clone()]

    torch.manual_seed(7)  # the same draw, written out: dropout(x)·A[:4]ᵀ·B[:, :4]ᵀ
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.7)
    w, bias, A, B = weights(adapter)
    A, B, x2 = A.requires_grad_(), B.requires_grad_(), x.detach().clone().requires_grad_()
    ref = F.linear(x2, w, bias) + (ALPHA / 4) * (x2 * keep / 0.7) @ A[:4].T @ B[:, :4].T
    ref.pow(2).sum().backward()
    want = [A.grad, B.grad, x2.grad]
    if mode == "frozen":  # only slice 4 trains
        want[0] = torch.zeros_like(A.grad).index_copy_(0, torch.tensor([3]), A.grad[3:4])
        want[1] = torch.zeros_like(B.grad).index_copy_(1, torch.tensor([3]), B.grad[:, 3:4])
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, atol=1e-5, rtol=1e-5)


def test_dropout_keeps_a_mask_for_backward_not_a_copy_of_the_input():
    """q, k and v adapt the same input: backward keeps that input once and a byte-per-value mask each."""
    layers = [make_adapter(dropout=0.1, seed=i, bias=False) for i in range(3)]
    for layer in layers:
        layer.train()
    x = torch.randn(64, 24, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t):
        if t.numel() == x.numel():  # x, a copy of it, or a mask over it
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = [layer(x) for layer in layers]
    activations = sum(saved.values())
    # x (4 bytes a value) once and three masks (1 byte): 7 bytes a value; copies of x would be 12 or more.
    assert activations <= 7 * x.numel(), activations / x.numel()
    sum(o.sum() for o in outputs).backward()
    assert x.grad is not None


def test_bad_ranks_and_options_are_clear_errors():
    adapter = make_adapter()
    for bad in (-1, R_MAX + 1, 2.0, True, (), (1, R_MAX + 1)):
        with pytest.raises(QdyloraError, match="rank"):
            adapter.rank = bad
    with pytest.raises(QdyloraError, match="mode"):
        DynamicRankLoRA(nn.Linear(4, 4), 2, 1.0, mode="half")
    with pytest.raises(QdyloraError, match="variant"):
        DynamicRankLoRA(nn.Linear(4, 4), 2, 1.0, variant="vera")
    with pytest.raises(QdyloraError, match="r_max"):
        DynamicRankLoRA(nn.Linear(4, 4), 0, 1.0)
    with pytest.raises(QdyloraError, match="one rank"):
        adapter.merged_linear((1, 2))


# ---- nested mixtures (MatryoshkaLoRA) ----

NESTED_S = {"one": lambda r: 1.0, "inverse": lambda r: 1.0 / r, "inverse_sqrt": lambda r: r ** -0.5}


def mixture_by_hand(adapter, x, b, ranks, weight, scale, params=None):
    """Σ_{r ∈ S_b} w_r · s(r)·x·A[:r]ᵀ·B[:, :r]ᵀ on the base, S_b = {r in ranks : r < b} ∪ {b}, w ∝ s_r, summing to 1."""
    w, bias, A, B = weights(adapter)
    if params is not None:
        A, B = params
    members = [r for r in ranks if r < b] + [b]
    total = sum(NESTED_S[weight](r) for r in members)
    y = F.linear(x, w, bias)
    for r in members:
        y = y + NESTED_S[weight](r) / total * SCALE_BY_HAND[scale](r) * x @ A[:r].T @ B[:, :r].T
    return y


@pytest.mark.parametrize("scale", list(SCALE_BY_HAND))
@pytest.mark.parametrize("weight", list(NESTED_S))
@pytest.mark.parametrize("base", ["linear", "nf4"])
def test_nested_mixture_is_the_weighted_average_of_the_nested_updates(base, weight, scale):
    """Training forward: x·(A ⊙ P)ᵀ·Bᵀ equals the average of the rank-r updates written out, one chunk per rank
    b (b in S or not), with its gradient; in eval mode the same adapter computes plain rank b."""
    adapter = make_adapter(mode="full", base=base, scale=scale)
    S = (1, 2, 4, R_MAX)
    set_nested(adapter, NestedRanks(S, weight))
    ranks = (R_MAX, 3, 1, 4)
    x = torch.randn(len(ranks) * 2, 5, 24)
    adapter.train()
    adapter.rank = ranks
    got = adapter(x)
    A = adapter.lora_A.detach().clone().requires_grad_()
    B = adapter.lora_B.detach().clone().requires_grad_()
    want = torch.cat([mixture_by_hand(adapter, x[2 * i:2 * i + 2], b, S, weight, scale, params=(A, B))
                      for i, b in enumerate(ranks)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    target = torch.randn_like(got)
    (got - target).pow(2).sum().backward()
    (want - target).pow(2).sum().backward()
    torch.testing.assert_close(adapter.lora_A.grad, A.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(adapter.lora_B.grad, B.grad, atol=1e-4, rtol=1e-4)
    adapter.eval()  # evaluation, merging and export: rank b itself, whatever the training mixture was
    for b in (1, 3, R_MAX):
        adapter.rank = b
        torch.testing.assert_close(adapter(x), lora_by_hand(adapter, x, b, scale), atol=1e-5, rtol=1e-5)


def test_nested_column_weights_by_hand():
    """P_i = Σ_{r ∈ S, r > i} w_r·s(r) for S = 1, 2, 4, 8, 16, s_r = 1, α 16, rank-stabilized s(r) = 4/√r."""
    nested = NestedRanks((16, 1, 4, 2, 8, 4))  # sorted and deduplicated
    assert nested.ranks == (1, 2, 4, 8, 16)
    s = {r: 4 / math.sqrt(r) for r in (1, 2, 4, 8, 16)}
    columns = nested.columns(16, lambda r: s[r], 16)
    by_hand = [sum(s[r] for r in (1, 2, 4, 8, 16) if r > i) / 5 for i in range(16)]
    assert columns == pytest.approx(by_hand, rel=1e-12)
    assert columns[0] == pytest.approx((4 + 2 * math.sqrt(2) + 2 + math.sqrt(2) + 1) / 5)
    assert columns[8:] == pytest.approx([0.2] * 8)
    # At rank 6 (not in S): S_6 = 1, 2, 4, 6 with weights 1/r over their sum; nothing from column 6 on.
    inverse = NestedRanks((1, 2, 4, 8, 16), "inverse")
    w = {r: (1 / r) / (1 + 1 / 2 + 1 / 4 + 1 / 6) for r in (1, 2, 4, 6)}
    assert inverse.members(6) == pytest.approx(list(w.items()))
    assert inverse.columns(6, lambda r: 1.0, 8) == pytest.approx(
        [1.0, 1 - w[1], w[4] + w[6], w[4] + w[6], w[6], w[6], 0.0, 0.0])
    assert nested.members(0) == [] and nested.columns(0, lambda r: 1.0, 4) == [0.0] * 4


@pytest.mark.parametrize("base", ["linear", "nf4"])
def test_nested_dora_is_dora_of_the_mixed_weight(base):
    """DoRA on a mixture: m ⊙ V/‖V‖_row with V = W + B·diag(P)·A, the norm a constant in backward."""
    adapter = make_adapter(variant="dora", mode="full", base=base, scale="rank_stabilized")
    S = (1, 2, 4, R_MAX)
    set_nested(adapter, NestedRanks(S))
    adapter.train()
    x = torch.randn(2, 3, 24)
    w, bias, A, B = weights(adapter)
    for b in (1, 3, R_MAX):
        adapter.rank = b
        P = torch.tensor(adapter.nested.columns(b, adapter.rank_scale, R_MAX))
        v = w + (B * P) @ A
        want = F.linear(x, adapter.magnitude[:, None] * v / v.norm(dim=1, keepdim=True), bias)
        torch.testing.assert_close(adapter(x), want, atol=1e-5, rtol=1e-5)


def test_nested_steps_leave_the_slices_above_the_step_bit_identical():
    """A chunk at rank b mixes ranks up to b only: slices above the step's top rank get no gradient, are not
    marked trained, and never move."""
    adapter = make_adapter(mode="full")
    set_nested(adapter, NestedRanks((1, 2, 4, R_MAX)))
    opt = RankAwareAdamW(adapter_parameters([adapter]), lr=1e-2, weight_decay=0.1)
    for ranks in ((1, 4), (2, 3), (R_MAX, 1), (1, 2)):
        adapter.rank = ranks
        before_a, before_b = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
        adapter(torch.randn(8, 24)).pow(2).mean().backward()
        top = max(ranks)
        assert not adapter.lora_A.grad[top:].any() and not adapter.lora_B.grad[:, top:].any()
        opt.mark_trained(trained_slices(ranks, "full"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(before_a[top:], adapter.lora_A[top:]) and torch.equal(before_b[:, top:], adapter.lora_B[:, top:])
        assert not torch.equal(before_a[:top], adapter.lora_A[:top])


def test_nested_ranks_need_full_mode_and_fit_r_max():
    with pytest.raises(QdyloraError, match="adapter.mode=full"):
        set_nested(make_adapter(mode="frozen"), NestedRanks((1, 2)))
    with pytest.raises(QdyloraError, match="above adapter.r_max"):
        set_nested(make_adapter(mode="full"), NestedRanks((1, R_MAX + 1)))
    with pytest.raises(QdyloraError, match="nested_weight 'sqrt' is unknown"):
        NestedRanks((1, 2), "sqrt")
    with pytest.raises(QdyloraError, match="positive integers"):
        NestedRanks((0, 2))
    adapter = make_adapter(mode="full")
    set_nested(adapter, NestedRanks((1, 2)))
    set_nested(adapter, None)
    adapter.train()
    adapter.rank = 3
    x = torch.randn(2, 24)
    torch.testing.assert_close(adapter(x), lora_by_hand(adapter, x, 3))


# ---- rank control and samplers ----


def test_set_rank_sets_every_adapter_or_none():
    model = nn.Sequential(make_adapter(), nn.ReLU(), DynamicRankLoRA(nn.Linear(32, 8), 3, 1.0))
    set_rank(model, (0, 2))
    assert model[0].rank == (0, 2) and model[2].rank == (0, 2)
    with pytest.raises(QdyloraError, match=r"0\.\.3"):
        set_rank(model, 5)  # fits the first adapter (r_max 6) but not the second
    assert model[0].rank == (0, 2)


def test_uniform_sampler_covers_its_range_and_resumes_exactly():
    sampler = build_rank_sampler("uniform", r_max=8, min_rank=3, seed=7)
    draws = [sampler.sample()[0] for _ in range(600)]
    assert set(draws) == set(range(3, 9))
    assert max(draws.count(b) for b in range(3, 9)) < 2 * min(draws.count(b) for b in range(3, 9))
    state = sampler.state_dict()
    rest = [sampler.sample(3) for _ in range(20)]
    resumed = build_rank_sampler("uniform", r_max=8, min_rank=3, seed=123)
    resumed.load_state_dict(state)
    assert [resumed.sample(3) for _ in range(20)] == rest
    # Every process built from the same seed draws the same ranks.
    twins = [build_rank_sampler("uniform", r_max=8, seed=5) for _ in range(2)]
    assert [twins[0].sample(4) for _ in range(3)] == [twins[1].sample(4) for _ in range(3)]


def test_several_ranks_per_step_are_stratified():
    """k ranks: one from each k-quantile of P(b), so every step spans low and high ranks."""
    sampler = build_rank_sampler("uniform", r_max=16, seed=0)
    for _ in range(200):
        assert [(b - 1) // 4 for b in sampler.sample(4)] == [0, 1, 2, 3]  # one rank from each quarter of 1..16
    octave = build_rank_sampler("octave", r_max=16, seed=0)  # quintiles: 1 | 2-3 | 4-7 | 8-15 | 16
    for _ in range(200):
        assert [1 << (b.bit_length() - 1) for b in octave.sample(5)] == [1, 2, 4, 8, 16]
    assert build_rank_sampler("fixed", r_max=8, rank=3).sample(4) == [3, 3, 3, 3]


def test_ranks_are_shared_equally_among_processes_micro_batches_and_chunks():
    assert assign_ranks([1, 5, 9, 16], 1, 1, 8) == [[(1, 5, 9, 16)]]  # one micro-batch of 8: chunks of 2
    assert assign_ranks([1, 5, 9, 16], 1, 8, 1) == [[1, 1, 5, 5, 9, 9, 16, 16]]  # a rank per 2 micro-batches
    assert assign_ranks([1, 5, 9, 16], 1, 2, 4) == [[(1, 5), (9, 16)]]
    assert assign_ranks([1, 5, 9, 16], 2, 1, 4) == [[(1, 5)], [(9, 16)]]  # each process its own share
    assert assign_ranks([3], 2, 2, 1) == [[3, 3], [3, 3]]
    with pytest.raises(QdyloraError, match=r"ranks_per_step=3 cannot share .* 1 micro-batch\(es\) × 4 example"):
        assign_ranks([1, 2, 3], 1, 1, 4)


def test_fixed_sampler_and_registry_errors():
    assert [build_rank_sampler("fixed", r_max=8).sample() for _ in range(2)] == [[8], [8]]
    with pytest.raises(QdyloraError, match="fixed.*uniform"):
        build_rank_sampler("cosine", r_max=8)
    with pytest.raises(QdyloraError, match="min_rank"):
        build_rank_sampler("uniform", r_max=8, min_rank=0)
    with pytest.raises(QdyloraError, match="rank_schedule.rank"):
        build_rank_sampler("fixed", r_max=8, rank=9)


# ---- injection into causal LMs ----


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="eager", initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


def _train(model, ids, steps=20, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.01)
    sampler = build_rank_sampler("uniform", r_max=R_MAX, seed=seed)
    model.train()
    losses = []
    for _ in range(steps):
        set_rank(model, sampler.sample()[0])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _check_injected_model(model, ids, n_linear, variant, quant_error):
    """Quantize (as the loader does) and inject adapters; check rank 0, training, and multi-rank logits.
    Returns the adapted model and names."""
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    dequantized = copy.deepcopy(model)
    model = quantize_model(model, dtype=torch.float32)
    names = inject_adapters(model, r_max=R_MAX, alpha=ALPHA, variant=variant)
    assert len(names) == n_linear and "lm_head" not in names
    assert [n for n, _ in iter_adapters(model)] == names
    assert all(isinstance(a.base, NF4Linear) for _, a in iter_adapters(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(R_MAX * (a.in_features + a.out_features) + (a.out_features if variant == "dora" else 0)
                            for _, a in iter_adapters(model))

    # Rank 0 is exactly the float model holding the dequantized weights, and near the original.
    with torch.no_grad():
        for name, adapter in iter_adapters(model):
            dequantized.get_submodule(name).weight.copy_(adapter.base.dequantize())
        set_rank(model, 0)
        quantized = model(input_ids=ids).logits
        torch.testing.assert_close(quantized, dequantized(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert (quantized - reference).abs().mean() < quant_error * reference.std()

    losses = _train(model, ids)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses

    set_rank(model, (0, 1, R_MAX))
    with torch.no_grad():
        together = model(input_ids=ids.repeat(3, 1)).logits
    for i, b in enumerate((0, 1, R_MAX)):
        set_rank(model, b)
        with torch.no_grad():
            torch.testing.assert_close(together[i * len(ids) : (i + 1) * len(ids)], model(input_ids=ids).logits,
                                       atol=1e-4, rtol=1e-4)
    return model, names


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_tiny_llama_injection_keeps_the_model_and_trains(variant):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    # Random weights of std 0.1 through 14 NF4 layers drift further than a trained model does.
    model, _ = _check_injected_model(model, ids, 2 * 7, variant, quant_error=0.4)

    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable  # NF4 weights count as out×in

    # Round trip through the adapter state dict into a freshly injected model.
    state = adapter_state_dict(model)
    assert all(k.endswith((".lora_A", ".lora_B", ".magnitude")) for k in state)
    assert state["model.layers.0.mlp.down_proj.lora_A"].shape == (R_MAX, 172)
    fresh = quantize_model(tiny_llama())
    inject_adapters(fresh, r_max=R_MAX, alpha=ALPHA, variant=variant)
    load_adapter_state_dict(fresh, state)
    set_rank(model, 3)
    set_rank(fresh, 3)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
        adapted = model(input_ids=ids).logits
    merge_adapters(model, 3)
    assert not list(iter_adapters(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_with_dropout_gives_the_same_gradients():
    grads = []
    for use_checkpointing in (False, True):
        model = quantize_model(tiny_llama())
        inject_adapters(model, r_max=R_MAX, alpha=ALPHA, dropout=0.2, mode="full", variant="dora")
        for _, adapter in iter_adapters(model):
            nn.init.normal_(adapter.lora_B, std=0.1)
        if use_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.18
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        set_rank(model, 4)
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        calls = []
        model.get_submodule("model.layers.0.mlp.up_proj").register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(3)
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) == 1 + use_checkpointing  # checkpointing really recomputed the layer
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers property
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_rank_b_is_the_peft_adapter_with_r_b_and_the_same_alpha(variant):
    """SPEC §2: an adapter taken at rank b is a plain PEFT LoRA (or DoRA) with r=b, lora_alpha=α."""
    peft = pytest.importorskip("peft")
    b = 3
    ours = tiny_llama()
    inject_adapters(ours, r_max=R_MAX, alpha=ALPHA, variant=variant)
    with torch.no_grad():  # as if trained: B nonzero, magnitudes moved
        for _, adapter in iter_adapters(ours):
            adapter.lora_B.normal_(0, 0.1)
            if variant == "dora":
                adapter.magnitude.mul_(1.2)
    config = peft.LoraConfig(r=b, lora_alpha=ALPHA, target_modules="all-linear", use_dora=variant == "dora")
    theirs = peft.get_peft_model(tiny_llama(), config).eval()
    adapters = dict(iter_adapters(ours))
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if name in adapters:
                state = adapters[name].adapter_state()
                module.lora_A["default"].weight.copy_(state["lora_A"][:b])
                module.lora_B["default"].weight.copy_(state["lora_B"][:, :b])
                if variant == "dora":
                    module.lora_magnitude_vector["default"].weight.copy_(state["magnitude"])
    set_rank(ours, b)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_target_patterns_and_their_errors():
    model = tiny_llama()
    names = inject_adapters(model, r_max=2, alpha=2, target_modules=["q_proj", "model.layers.1.mlp.*"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert all(isinstance(a.base, nn.Linear) for _, a in iter_adapters(model))
    with pytest.raises(QdyloraError, match="already has adapters"):
        inject_adapters(model, r_max=2, alpha=2)
    with pytest.raises(QdyloraError, match=r"'qproj' matches no linear layer.*q_proj"):
        inject_adapters(tiny_llama(), r_max=2, alpha=2, target_modules=["q_proj", "qproj"])
    with pytest.raises(QdyloraError, match="quant.type 'int3' is unknown"):
        quantize_model(tiny_llama(), quant=QuantConfig(type="int3"))


def test_layers_are_wrapped_as_they_are():
    """The loader quantizes (loading.fill_model); injection only wraps: an NF4 layer stays the same object,
    a float one stays float (quant.type=none)."""
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj = NF4Linear.from_linear(attn.q_proj, compute_dtype=torch.float32)
    quantized = attn.q_proj
    names = inject_adapters(model, r_max=2, alpha=2, target_modules=["q_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert attn.q_proj.base is quantized
    assert type(model.model.layers[1].self_attn.q_proj.base) is nn.Linear


def test_loading_adapter_weights_that_do_not_fit_is_a_clear_error():
    model = tiny_llama()
    inject_adapters(model, r_max=R_MAX, alpha=ALPHA)
    state = adapter_state_dict(model)
    key = "model.layers.0.self_attn.q_proj.lora_A"
    with pytest.raises(QdyloraError, match=f"1 missing.*{key}"):
        load_adapter_state_dict(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(QdyloraError, match="1 unexpected.*extra.lora_A"):
        load_adapter_state_dict(model, {**state, "extra.lora_A": state[key]})
    with pytest.raises(QdyloraError, match=r"wrong shape.*\(3, 64\).*r_max"):
        load_adapter_state_dict(model, {**state, key: state[key][:3]})
    with pytest.raises(QdyloraError, match="rank"):
        merge_adapters(model, R_MAX + 1)


def test_stories260k_injection(stories260k):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    float_total = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    model, names = _check_injected_model(model, ids, 5 * 7, "lora", quant_error=0.1)
    assert "model.layers.4.mlp.down_proj" in names
    trainable, total = count_parameters(model)
    assert trainable == sum(R_MAX * (a.in_features + a.out_features) for _, a in iter_adapters(model))
    assert total == float_total + trainable
