"""Dynamic-rank adapters: the rank-b formula, frozen/full gradients, still slices under optimizers,
DoRA, multi-rank evaluation, merging, rank samplers, and injection into small Llamas."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qdylora_cli.adapters import (
    DynamicRankLoRA,
    FixedRank,
    UniformRank,
    adapter_state_dict,
    build_rank_sampler,
    count_parameters,
    inject_adapters,
    iter_adapters,
    load_adapter_state_dict,
    merge_adapters,
    set_rank,
)
from qdylora_cli.errors import QdyloraError
from qdylora_cli.quant import NF4Linear

R_MAX, ALPHA = 6, 4.0


def make_adapter(variant="lora", mode="frozen", bias=True, base="linear", seed=0, dropout=0.0):
    """An adapter on a 24→32 layer with random B (a fresh B is zero, which would hide mistakes)."""
    torch.manual_seed(seed)
    linear = nn.Linear(24, 32, bias=bias)
    if base == "nf4":
        linear = NF4Linear.from_linear(linear, blocksize=64)
    adapter = DynamicRankLoRA(linear, R_MAX, ALPHA, dropout=dropout, mode=mode, variant=variant)
    with torch.no_grad():
        for p in adapter.lora_B:
            p.normal_(0, 0.3)
        if variant == "dora":
            adapter.magnitude.mul_(torch.rand(32) + 0.5)
    return adapter


def weights(adapter):
    w = adapter.base.weight if isinstance(adapter.base, nn.Linear) else adapter.base.dequantize()
    A, B = adapter.adapter_state()["lora_A"], adapter.adapter_state()["lora_B"]
    return w, adapter.base.bias, A, B


def lora_by_hand(adapter, x, b):
    w, bias, A, B = weights(adapter)
    y = F.linear(x, w, bias)
    return y if b == 0 else y + (ALPHA / b) * x @ A[:b].T @ B[:, :b].T


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


@pytest.mark.parametrize("base", ["linear", "nf4"])
@pytest.mark.parametrize("b", [0, 1, 3, R_MAX])
def test_rank_b_output_is_the_lora_formula(base, b):
    adapter = make_adapter(base=base)
    adapter.rank = b
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(adapter(x), lora_by_hand(adapter, x, b), atol=1e-5, rtol=1e-5)


def _grad_slices(adapter, b):
    adapter.rank = b
    adapter(torch.randn(4, 24)).pow(2).sum().backward()
    a = [p.grad is not None for p in adapter.lora_A]
    bb = [p.grad is not None for p in adapter.lora_B]
    assert a == bb
    return [i + 1 for i, has in enumerate(a) if has]


def test_frozen_mode_trains_only_slice_b_and_full_mode_slices_1_to_b():
    for b in (1, 3, R_MAX):
        assert _grad_slices(make_adapter(mode="frozen"), b) == [b]
        assert _grad_slices(make_adapter(mode="full"), b) == list(range(1, b + 1))


def make_optimizer(which, params):
    if which == "torch-adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    bnb = pytest.importorskip("bitsandbytes")
    if which == "bnb-adamw":
        return bnb.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1, min_8bit_size=1)


@pytest.mark.parametrize("which", ["torch-adamw", "bnb-adamw", "bnb-adamw8bit"])
@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_optimizer_steps_leave_untouched_slices_bit_identical(which, mode):
    adapter = make_adapter(mode=mode, variant="dora")
    opt = make_optimizer(which, [p for p in adapter.parameters() if p.requires_grad])
    for b in (4, 2, 6, 2, 1, 5):  # earlier steps leave momentum in slices a later step does not use
        adapter.rank = b
        before_a = [p.detach().clone() for p in adapter.lora_A]
        before_b = [p.detach().clone() for p in adapter.lora_B]
        adapter(torch.randn(8, 24)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        touched = {b} if mode == "frozen" else set(range(1, b + 1))
        for i in range(R_MAX):
            same_a = torch.equal(before_a[i], adapter.lora_A[i])
            same_b = torch.equal(before_b[i], adapter.lora_B[i])
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
    got = [torch.cat([p.grad for p in adapter.lora_A[:4]]), torch.cat([p.grad for p in adapter.lora_B[:4]], 1),
           adapter.magnitude.grad, x.grad]

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


def test_multi_rank_needs_a_batch_that_splits_evenly():
    adapter = make_adapter()
    adapter.rank = (1, 2)
    with pytest.raises(QdyloraError, match="equal chunks"):
        adapter(torch.randn(3, 24))


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
        grads.append((y.detach(), [p.grad.clone() for p in adapter.lora_A[:5]]))
        adapter.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


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
    draws = [sampler.sample() for _ in range(600)]
    assert set(draws) == set(range(3, 9))
    assert max(draws.count(b) for b in range(3, 9)) < 2 * min(draws.count(b) for b in range(3, 9))
    state = sampler.state_dict()
    rest = [sampler.sample() for _ in range(20)]
    resumed = UniformRank(3, 8, seed=123)
    resumed.load_state_dict(state)
    assert [resumed.sample() for _ in range(20)] == rest
    # Every process built from the same seed draws the same ranks.
    assert [UniformRank(1, 8, 5).sample() for _ in range(3)] == [UniformRank(1, 8, 5).sample() for _ in range(3)]


def test_fixed_sampler_and_registry_errors():
    assert isinstance(build_rank_sampler("fixed", r_max=8, rank=4), FixedRank)
    assert [build_rank_sampler("fixed", r_max=8).sample() for _ in range(2)] == [8, 8]
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
    sampler = UniformRank(1, R_MAX, seed)
    model.train()
    losses = []
    for _ in range(steps):
        set_rank(model, sampler.sample())
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _check_injected_model(model, ids, n_linear, variant, quant_error):
    """Inject NF4 + adapters; check rank 0, training, and multi-rank logits. Returns the adapted names."""
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    dequantized = copy.deepcopy(model)
    names = inject_adapters(model, r_max=R_MAX, alpha=ALPHA, variant=variant, compute_dtype=torch.float32)
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
    return names


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_tiny_llama_injection_keeps_the_model_and_trains(variant):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    # Random weights of std 0.1 through 14 NF4 layers drift further than a trained model does.
    _check_injected_model(model, ids, 2 * 7, variant, quant_error=0.4)

    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable  # NF4 weights count as out×in

    # Round trip through the adapter state dict into a freshly injected model.
    state = adapter_state_dict(model)
    assert all(k.endswith((".lora_A", ".lora_B", ".magnitude")) for k in state)
    assert state["model.layers.0.mlp.down_proj.lora_A"].shape == (R_MAX, 172)
    fresh = tiny_llama()
    inject_adapters(fresh, r_max=R_MAX, alpha=ALPHA, variant=variant, compute_dtype=torch.float32)
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
        model = tiny_llama()
        inject_adapters(model, r_max=R_MAX, alpha=ALPHA, dropout=0.2, mode="full", variant="dora",
                        compute_dtype=torch.float32)
        for _, adapter in iter_adapters(model):
            for p in adapter.lora_B:
                nn.init.normal_(p, std=0.1)
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
    inject_adapters(ours, r_max=R_MAX, alpha=ALPHA, variant=variant, quant="none")
    with torch.no_grad():  # as if trained: B nonzero, magnitudes moved
        for _, adapter in iter_adapters(ours):
            for p in adapter.lora_B:
                p.normal_(0, 0.1)
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
    names = inject_adapters(model, r_max=2, alpha=2, target_modules=["q_proj", "model.layers.1.mlp.*"], quant="none")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert all(isinstance(a.base, nn.Linear) for _, a in iter_adapters(model))
    with pytest.raises(QdyloraError, match="already has adapters"):
        inject_adapters(model, r_max=2, alpha=2)
    with pytest.raises(QdyloraError, match=r"'qproj' matches no linear layer.*q_proj"):
        inject_adapters(tiny_llama(), r_max=2, alpha=2, target_modules=["q_proj", "qproj"])
    with pytest.raises(QdyloraError, match="quant"):
        inject_adapters(tiny_llama(), r_max=2, alpha=2, quant="int3")


def test_layers_already_in_nf4_are_wrapped_as_they_are():
    """The streaming loader quantizes targets while reading shards; injection must not quantize them twice."""
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj = NF4Linear.from_linear(attn.q_proj, compute_dtype=torch.float32)
    quantized = attn.q_proj
    names = inject_adapters(model, r_max=2, alpha=2, target_modules=["q_proj"], compute_dtype=torch.float32)
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert attn.q_proj.base is quantized
    assert isinstance(model.model.layers[1].self_attn.q_proj.base, NF4Linear)


def test_loading_adapter_weights_that_do_not_fit_is_a_clear_error():
    model = tiny_llama()
    inject_adapters(model, r_max=R_MAX, alpha=ALPHA, quant="none")
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
    names = _check_injected_model(model, ids, 5 * 7, "lora", quant_error=0.1)
    assert "model.layers.4.mlp.down_proj" in names
    trainable, total = count_parameters(model)
    assert trainable == sum(R_MAX * (a.in_features + a.out_features) for _, a in iter_adapters(model))
    assert total == float_total + trainable
