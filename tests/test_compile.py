"""train.compile: decoder layers compiled without graph breaks, a bounded number of graphs whatever the
ranks, and the same training as eager.

Models are built from a config (hidden 64, 2 layers, as test_architectures.py), their linear layers NF4
as the loader makes them, adapters at every rank. Dynamo's graph breaks and graph counts do not depend
on the backend, so those tests use the "eager" backend (no code generation: fast); one test compiles
with Inductor and compares with eager, and the resume test runs the real `qdylora train` with AOTAutograd
("aot_eager": the custom NF4 operator's autograd, without code generation) on the tiny recipe.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from test_train import _tiny, assert_resumed_like_straight
from torch import nn
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM

from qdylora_cli import train
from qdylora_cli.adapters import NestedRanks, build_rank_sampler, inject_adapters, set_nested, set_rank
from qdylora_cli.compile import compile_decoder_layers, resolve_compile
from qdylora_cli.errors import QdyloraError
from qdylora_cli.loss import token_losses
from qdylora_cli.quant import NF4Linear

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
ARCHITECTURES = {
    "llama": dict(model_type="llama", intermediate_size=128, num_key_value_heads=2),
    "falcon-40b": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True,
                       bias=False, num_ln_in_parallel_attn=2),
}
R_MAX = 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(arch: str, *, dropout: float = 0.05, variant: str = "lora", mode: str = "full") -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ARCHITECTURES[arch], **SMALL))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                setattr(module, name, NF4Linear.from_linear(child, compute_dtype=torch.float32))
    inject_adapters(model, r_max=R_MAX, alpha=16, dropout=dropout, variant=variant, mode=mode)
    with torch.no_grad():  # B is zero at init: give every slice an effect, so ranks differ
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    return model


def _step(model: nn.Module, ids: torch.Tensor, rank) -> float:
    set_rank(model, rank)
    loss = token_losses(model(input_ids=ids, use_cache=False).logits, ids).sum() / ids.numel()
    loss.backward()
    return loss.item()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_100_steps_of_new_ranks_compile_a_bounded_number_of_graphs_without_breaks(arch, variant):
    model = _model(arch, variant=variant)
    assert compile_decoder_layers(model, backend="eager") == 2
    sampler = build_rank_sampler("octave", r_max=R_MAX, seed=0)
    ids = torch.randint(0, 256, (4, 32))
    drawn = set()
    for _ in range(100):  # the default schedule: 4 stratified ranks per step, one per batch chunk
        ranks = tuple(sampler.sample(4))
        drawn.add(ranks)
        _step(model, ids, ranks)
    assert len(drawn) > 20
    assert dict(counters["graph_break"]) == {}
    # Layer 0's input needs no gradient (frozen embeddings), layer 1's does: one graph each, for 100 steps.
    assert _graphs() == 2
    model.eval()
    with torch.no_grad():  # validation: one rank per pass, evaluation mode, another length
        for rank in (1, 2, R_MAX, 0):
            set_rank(model, rank)
            model(input_ids=ids[:, :20], use_cache=False)
    assert dict(counters["graph_break"]) == {}
    assert _graphs() <= 6


@pytest.mark.parametrize("kind", ["frozen", "nested"])
def test_frozen_mode_and_nested_mixtures_compile_without_breaks(kind):
    model = _model("llama", mode="frozen" if kind == "frozen" else "full")
    if kind == "nested":
        set_nested(model, NestedRanks((1, 2, 4, 8, 16)))
    compile_decoder_layers(model, backend="eager")
    ids = torch.randint(0, 256, (4, 32))
    for ranks in [(1, 3, 5, 16), (2, 2, 7, 16), (1, 4, 6, 9)]:
        _step(model, ids, ranks)
    assert dict(counters["graph_break"]) == {}
    assert _graphs() == 2


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_compiled_forward_and_gradients_equal_eager_at_every_rank(variant):
    eager, compiled = _model("llama", dropout=0.0, variant=variant), _model("llama", dropout=0.0, variant=variant)
    compile_decoder_layers(compiled, backend="aot_eager")
    ids = torch.randint(0, 256, (4, 32))
    for ranks in [(1, 2, 4, 16), (3, 3, 5, 6), 5, (0, 1, 16, 16)]:
        losses = [_step(m, ids, ranks) for m in (eager, compiled)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-6)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
                p.grad = q.grad = None


def test_inductor_compiled_training_matches_eager_in_float32():
    eager, compiled = _model("llama", dropout=0.0), _model("llama", dropout=0.0)
    compile_decoder_layers(compiled)  # Inductor: the code a user's run compiles
    ids = torch.randint(0, 256, (4, 32))
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (eager, compiled)]
    for ranks in [(1, 2, 4, 16), (2, 3, 6, 16), (1, 1, 5, 7)]:
        losses = []
        for model, opt in zip((eager, compiled), optimizers, strict=True):
            losses.append(_step(model, ids, ranks))
            opt.step()
            opt.zero_grad()
        assert abs(losses[1] - losses[0]) <= 1e-5
    assert dict(counters["graph_break"]) == {}


def test_fsdp_with_compile_is_refused_in_one_line():
    with pytest.raises(QdyloraError, match="train.compile=true does not work with FSDP"):
        resolve_compile("true", torch.device("cpu"), fsdp=True)
    assert not resolve_compile("auto", torch.device("cpu"))


def test_a_compiled_run_resumes_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "compile_decoder_layers", lambda model: compile_decoder_layers(model, "aot_eager"))
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train.run(_tiny(straight, "train.compile=true"))
    train.run(_tiny(crashed, "train.compile=true"))
    shutil.rmtree(crashed / "adapter")  # killed after step 3's checkpoint
    shutil.rmtree(crashed / "checkpoints" / "step-6")
    train.run(_tiny(crashed, "train.resume=true"))
    assert_resumed_like_straight(straight, crashed)
    assert dict(counters["graph_break"]) == {}
