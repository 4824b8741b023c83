"""Mixed precision as users train with it on a GPU, reproduced on the CPU (tests/gpu_semantics.py).

A GPU step differs from a CPU one in dtypes: CUDA autocast runs LayerNorm in float32, so Falcon,
GPT-NeoX and Phi feed float32 activations into bf16/fp16 adapters; fp16 steps go through a loss
scaler that skips overflowing steps. Each test builds that case explicitly.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from gpu_semantics import gpu_semantics
from runners import qdylora
from torch import nn

from qdylora_cli import train
from qdylora_cli.adapters import DynamicRankLoRA
from qdylora_cli.cuda_autocast import CudaAutocastPolicy
from qdylora_cli.quant import NF4Linear

LOW = [torch.bfloat16, torch.float16]


def _adapter(variant: str, dropout: float, dtype: torch.dtype, scale: str = "rank_stabilized") -> DynamicRankLoRA:
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 64), compute_dtype=dtype)
    adapter = DynamicRankLoRA(base, r_max=8, alpha=16, dropout=dropout, variant=variant, scale=scale)
    with torch.no_grad():
        adapter.lora_B.normal_(0, 0.1)  # trained-looking factors: B = 0 would hide every error in B
        if variant == "dora":
            adapter.magnitude.mul_(1.1)
    return adapter


def _by_hand(adapter: DynamicRankLoRA, x: torch.Tensor, b: int, keep: torch.Tensor | None) -> torch.Tensor:
    """The adapter at rank b under autocast, from plain ops: autograd handles every cast."""
    p = adapter.dropout
    dropped = x if keep is None else x * keep / (1 - p)
    s = adapter.rank_scale(b)
    delta = F.linear(F.linear(dropped, adapter.lora_A[:b]) * s, adapter.lora_B[:, :b])
    y = adapter.base(x)
    if adapter.variant == "lora":
        return y + delta.to(y.dtype)
    weight = adapter.base.dequantize().float()
    with torch.no_grad():
        norm = torch.linalg.vector_norm(weight + s * adapter.lora_B[:, :b] @ adapter.lora_A[:b], dim=1)
    scale = adapter.magnitude / norm
    return (scale * (y + delta.to(y.dtype)) + (1 - scale) * adapter.base.bias).to(y.dtype)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("low", LOW, ids=str)
def test_float32_input_under_autocast_matches_the_computation_by_hand(variant, dropout, low):
    """On a GPU a LayerNorm model feeds float32 into adapters whose step runs in bf16/fp16: forward and
    backward must equal the same computation written with plain ops (the dropout path crashed in backward)."""
    adapter = _adapter(variant, dropout, low)
    adapter.train()
    adapter.rank = 5
    x = torch.randn(3, 7, 128, requires_grad=True)  # float32, as CUDA's layer_norm returns it
    grad = torch.randn(3, 7, 64)

    def run(forward):
        for p in (x, *adapter.parameters()):
            p.grad = None
        torch.manual_seed(1)  # the dropout mask is the first random draw of a forward
        with torch.autocast("cpu", low):
            y = forward()
        y.backward(grad)
        return y.detach(), [p.grad.clone() for p in (x, adapter.lora_A, adapter.lora_B)] + (
            [adapter.magnitude.grad.clone()] if variant == "dora" else [])

    def reference():
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - dropout) if dropout else None
        return _by_hand(adapter, x, 5, keep)

    y, grads = run(lambda: adapter(x))
    y_ref, grads_ref = run(reference)
    assert y.dtype == torch.float32
    tol = 2e-2 if low == torch.bfloat16 else 3e-3
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


def test_frozen_mode_with_dropout_backward_under_autocast():
    adapter = _adapter("lora", 0.1, torch.bfloat16)
    adapter.mode = "frozen"
    adapter.train()
    adapter.rank = (2, 5)
    x = torch.randn(4, 3, 128, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = adapter(x)
    y.float().square().sum().backward()
    rows = adapter.lora_A.grad.abs().sum(dim=1)
    assert rows[[1, 4]].gt(0).all() and rows[[0, 2, 3, 5, 6, 7]].eq(0).all(), "frozen: slices b-1 only"


def _bias(got: torch.Tensor, exact: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The systematic relative error of `got` (its mean over `dims`): rounding noise averages out, a
    rounded factor does not."""
    return ((got.float() - exact) * exact.sign()).mean(dim=dims) / exact.abs().mean(dim=dims)


def test_several_ranks_in_one_batch_scale_each_chunk_exactly_in_bf16():
    """s(b) is applied in float32 and rounded once: a chunk of a multi-rank batch gets the update the
    same rows get alone at that rank. Rounded to bf16 first, s = 1/3 becomes 0.333984: +0.2% on every
    update of that rank."""
    adapter = _adapter("lora", 0.0, torch.bfloat16, scale="constant")
    adapter.alpha = 8 / 3  # s = alpha / r_max = 1/3, far from a bf16 number
    x = torch.randn(32, 16, 128)
    with torch.no_grad():
        exact = F.linear(F.linear(x, adapter.lora_A) / 3, adapter.lora_B)
        for ranks in [(8,), (8, 8), (8, 4)]:
            columns = adapter._rank_columns(ranks, 8) if len(ranks) > 1 else None  # as forward builds them
            delta = adapter._delta(x.bfloat16(), 8, columns, None)[: 32 // len(ranks)]
            assert abs(_bias(delta, exact[: 32 // len(ranks)], (0, 1, 2)).item()) < 5e-4, ranks


def test_dora_rescales_each_output_row_by_its_float32_factor_in_bf16():
    """DoRA's m/n multiplies the bf16 output in float32, rounded once: the best bf16 can hold. Rounding
    m/n to bf16 first (numbers near 1.1 are 0.8% apart there) shifted whole output features by up to 0.4%."""
    torch.manual_seed(1)
    base = NF4Linear.from_linear(nn.Linear(128, 64, bias=False), compute_dtype=torch.bfloat16)
    adapter = DynamicRankLoRA(base, r_max=8, alpha=16, variant="dora", scale="rank_stabilized")
    with torch.no_grad():
        adapter.lora_B.normal_(0, 0.1)
        adapter.magnitude.mul_(1.1)
    adapter.eval()
    x = torch.randn(8, 16, 128).bfloat16()
    with torch.no_grad():
        weight = base.dequantize()
        norm = adapter._dora_norms(weight, (5,), 5)[0]  # ‖W + s·B·A‖ per row, float32
        unscaled = base(x, weight=weight) + adapter._delta(x, 5, None, None)  # W·x + s·B·A·x, in bf16
        exact = (unscaled.float() * (adapter.magnitude / norm)).bfloat16()
        for rank in (5, (5, 5)):
            adapter.rank = rank
            torch.testing.assert_close(adapter(x), exact, rtol=0, atol=0, msg=f"rank {rank}")


def test_cuda_policy_runs_the_float32_list_in_float32_under_autocast():
    x = torch.randn(4, 8).bfloat16()
    w = torch.randn(6, 8)
    with CudaAutocastPolicy():
        with torch.autocast("cpu", torch.bfloat16):
            assert F.layer_norm(x, (8,)).dtype == torch.float32
            assert nn.LayerNorm(8)(x).dtype == torch.float32
            assert x.softmax(-1).dtype == torch.float32 and x.sum().dtype == torch.float32
            assert F.softmax(x, -1, dtype=torch.bfloat16).dtype == torch.bfloat16, "an explicit dtype is kept"
            assert F.linear(x.float(), w).dtype == torch.bfloat16, "matmuls stay in the low dtype"
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16, "nothing changes outside autocast"


# --- a training run's dtypes and its loss scaler ---------------------------------------------------


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TINY = ["+recipe=tiny", "train.eval_every=0", "train.save_every=0", "train.log_every=1"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_recipe_trains_with_dropout_under_gpu_autocast(tmp_path, monkeypatch, precision):
    """The issue's reproduction (float32 weights, bf16 steps, dropout) and the fp16 path of V100s."""
    dtype = "float16" if precision == "fp16" else "float32"
    with gpu_semantics(monkeypatch, precision):
        code = qdylora("train", *TINY, f"run_dir={tmp_path / 'run'}", "adapter.dropout=0.1",
                       f"model.dtype={dtype}", f"train.mixed_precision={precision}", "train.max_steps=3")
    assert code == 0
    assert all(math.isfinite(m["loss"]) for m in _metrics(tmp_path / "run"))


def test_fp16_skips_an_overflowing_step_lowers_the_scale_and_goes_on(tmp_path, monkeypatch):
    """An overflow in the first fp16 steps is ordinary: the step is skipped and the scale halves. Before,
    the next step's unscale_ raised (the scaler never saw the skipped step end)."""
    scales = []
    real_step = train.train_loop

    def watch(s, stop):
        real_update = s.accelerator.scaler.update

        def update(*args, **kwargs):
            real_update(*args, **kwargs)
            scales.append(s.accelerator.scaler.get_scale())

        monkeypatch.setattr(s.accelerator.scaler, "update", update)
        real_step(s, stop)

    monkeypatch.setattr(train, "train_loop", watch)
    real_build = train.build_training_model

    def build(*args, **kwargs):  # step 2's forward overflows
        model, meta, base = real_build(*args, **kwargs)
        calls = [0]

        def overflow(module, inputs, output):
            if module.training:
                calls[0] += 1
                if calls[0] == 2:
                    output.logits = output.logits * float("inf")
            return output

        model.register_forward_hook(overflow)
        return model, meta, base

    monkeypatch.setattr(train, "build_training_model", build)
    run_dir = tmp_path / "fp16"
    with gpu_semantics(monkeypatch, "fp16"):
        code = qdylora("train", *TINY, f"run_dir={run_dir}", "model.dtype=float16", "train.mixed_precision=fp16",
                       "train.max_steps=4", "train.grad_accum=1")
    assert code == 0
    by_step = {m["step"]: m for m in _metrics(run_dir)}
    assert by_step[2]["skipped"] and set(by_step) == {1, 2, 3, 4}
    assert len(scales) == 4 and scales[1] == scales[0] / 2, scales


def test_float16_weights_without_loss_scaling_are_refused(tmp_path, capsys):
    code = qdylora("train", *TINY, f"run_dir={tmp_path / 'run'}", "model.dtype=float16", "train.mixed_precision=no",
                   "train.max_steps=1")
    assert code == 2
    err = capsys.readouterr().err
    assert "train.mixed_precision='no' with model.dtype=float16" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _falcon_40b_2_layers(tmp_path, stories260k):
    """Falcon-40B's architecture at a width a CPU trains, saved with stories260K's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = json.loads((stories260k.parent / "configs" / "falcon-40b" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    config |= {"hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2, "num_hidden_layers": 2,
               "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}
    model_dir = tmp_path / "falcon-40b-2-layers"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(stories260k).save_pretrained(model_dir)
    return model_dir


@pytest.mark.parametrize("schedule", [
    ["rank_schedule.distill=0.5", "rank_schedule.sandwich=true"],
    ["rank_schedule.nested_ranks=powers"],
    ["adapter.variant=dora", "rank_schedule.nested_ranks=powers", "rank_schedule.distill=0.5"],
])
def test_rank_schedule_options_train_the_paper_recipe_under_fp16_loss_scaling(
        tmp_path, monkeypatch, stories260k, alpaca_1k, schedule):
    """Distillation (a no-grad teacher forward under autocast), nested mixtures and the sandwich on the
    fp16 + LayerNorm path: float32 LayerNorm output into the adapters, float16 logits, loss scaling."""
    model_dir = _falcon_40b_2_layers(tmp_path, stories260k)
    with gpu_semantics(monkeypatch, "fp16"):
        assert qdylora("train", "+recipe=falcon40b_alpaca", f"model.name_or_path={model_dir}",
                       f"run_dir={tmp_path / 'run'}", f"data.path={alpaca_1k}", "data.format=alpaca",
                       "data.max_samples=64", "train.max_steps=2", "train.grad_accum=4", "train.eval_every=0",
                       "train.save_every=0", *schedule) == 0
    assert all(math.isfinite(m["loss"]) for m in _metrics(tmp_path / "run") if "loss" in m)


def test_the_paper_recipe_on_a_two_layer_falcon_40b_trains_evaluates_and_exports(
        tmp_path, monkeypatch, stories260k, alpaca_1k):
    """`+recipe=falcon40b_alpaca` as on the paper's V100 (float16 weights, fp16 steps with loss scaling,
    dropout, gradient checkpointing), on Falcon-40B's architecture (new decoder, 8 KV heads, parallel
    attention, LayerNorm: float32 into the adapters under fp16) at a width a CPU trains; then eval and
    export read the run with no recipe."""
    model_dir = _falcon_40b_2_layers(tmp_path, stories260k)
    monkeypatch.chdir(tmp_path)
    with gpu_semantics(monkeypatch, "fp16"):
        assert qdylora("train", "+recipe=falcon40b_alpaca", f"model.name_or_path={model_dir}",
                       f"data.path={alpaca_1k}", "data.format=alpaca", "data.max_samples=64",
                       "train.max_steps=2", "train.grad_accum=4", "train.eval_every=0", "train.save_every=0") == 0
    run_dir = tmp_path / "runs" / "falcon40b_alpaca"
    assert all(math.isfinite(m["loss"]) for m in _metrics(run_dir))
    assert qdylora("eval", "rank=[1,8,64]", "max_batches=1") == 0
    assert json.loads((run_dir / "eval" / "loss-val" / "summary.json").read_text())
    assert qdylora("export", "rank=8") == 0
    exported = json.loads((run_dir / "export" / "rank-8-peft" / "adapter_config.json").read_text())
    assert exported["r"] == 8 and "query_key_value" in " ".join(exported["target_modules"])
