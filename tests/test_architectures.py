"""The model families users bring, each through the real CLI: train (float32, and bf16 as on a GPU), exact
resume, eval at every rank, PEFT and merged exports equal to our model at that rank.

Each architecture is a tiny model built from its config (hidden 64, 2 layers, stories260K's 512-token
vocabulary, every linear weight a multiple of NF4's 64-weight blocks) and saved with `save_pretrained`,
so it is read back as a user's checkpoint is: shard by shard, through transformers' key mapping. The
families differ where adapters and the loader meet them: biased q/k/v (qwen2), fused projections
(falcon's query_key_value, gpt_neox's, phi3's qkv_proj and gate_up_proj), LayerNorm feeding float32
into the adapters under CUDA autocast (falcon, gpt_neox), checkpoint names that differ from module
names (gpt_neox's embed_out), tied embeddings (gemma).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHAKESPEARE, STORIES260K
from gpu_semantics import gpu_semantics
from runners import qdylora
from safetensors.torch import load_file
from test_eval_export import _rows, peft_and_ours
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qdylora_cli.adapters import set_rank
from qdylora_cli.errors import QdyloraError
from qdylora_cli.model import check_tokenizer_fits, load_run_model, load_tokenizer

VOCAB = 512  # stories260K's tokenizer
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
ARCHITECTURES = {
    "llama": dict(model_type="llama", intermediate_size=128, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", intermediate_size=128, num_key_value_heads=2, sliding_window=32),
    "qwen2": dict(model_type="qwen2", intermediate_size=128, num_key_value_heads=2),  # biased q/k/v
    # Falcon-40B: grouped kv heads in one query_key_value, two LayerNorms feeding attention and MLP in parallel.
    "falcon-40b": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True,
                       bias=False, num_ln_in_parallel_attn=2),
    # Falcon-7B: one shared kv head, one LayerNorm before the parallel attention and MLP.
    "falcon-7b": dict(model_type="falcon", new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                      bias=False),
    "gpt_neox": dict(model_type="gpt_neox", intermediate_size=256),
    "phi3": dict(model_type="phi3", intermediate_size=128, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2),
    "gemma": dict(model_type="gemma", intermediate_size=128, num_key_value_heads=1, head_dim=16),
}
# transformers 5 loads a directory whose config says qwen2 with Qwen2's tokenizer class, whatever its
# tokenizer files say: stories260K's files then tokenize differently and get a pad id (512) past the
# vocabulary. Runs of those name the tokenizer themselves (model.tokenizer), as a user would.
TOKENIZER_REPLACED = {"qwen2"}
RANK = 3  # the rank exported; r_max is 4
RUN = ["model=hf", "data=text", "data.block_size=64", "data.val_fraction=0.1", "data.max_samples=16",
       "adapter.r_max=4", "adapter.alpha=8", "adapter.dropout=0.1", "optimizer.lr=1e-2", "optimizer.warmup_ratio=0",
       "rank_schedule.ranks_per_step=2", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
       "train.save_every=1", "train.eval_every=0", "train.log_every=1", "train.cpu_threads=1"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(run_dir: Path, model_dir: Path, text: Path, *extra: str) -> None:
    assert qdylora("train", *RUN, f"model.name_or_path={model_dir}", f"data.path={text}", f"run_dir={run_dir}",
                   *extra) == 0


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """The first 20k characters of tinyshakespeare: 16 blocks of 64 tokens need far less than the whole file."""
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is absent")
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text()[:20_000])
    return path


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory, text) -> dict:
    """A saved tiny model of the architecture and its float32 run (2 steps, a checkpoint after each)."""
    if not STORIES260K.exists():
        pytest.skip(f"{STORIES260K} is absent")
    name = request.param
    root = tmp_path_factory.mktemp(name)
    fields = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **(SMALL | fields))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for module_name, module in model.named_modules():  # NF4 quantizes whole blocks of 64 weights
        if isinstance(module, torch.nn.Linear):
            assert module.weight.numel() % 64 == 0, (name, module_name, module.weight.shape)
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(STORIES260K).save_pretrained(root / "model")
    run_dir = root / "run"
    extra = [f"model.tokenizer={STORIES260K}"] if name in TOKENIZER_REPLACED else []
    arch = {"name": name, "model": root / "model", "run": run_dir, "root": root, "text": text, "extra": extra}
    _train(run_dir, root / "model", text, *extra, "model.dtype=float32", "train.mixed_precision=no")
    return arch


def test_trains_in_float32_and_resumes_bit_exactly(arch):
    run_dir = arch["run"]
    records = [m for m in _metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in records] == [1, 2] and all(math.isfinite(m["loss"]) for m in records)
    straight = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    assert any(v.abs().max() > 0 for k, v in straight.items() if k.endswith("lora_B")), "B must have moved"
    # A run killed after step 1's checkpoint, resumed: the same adapter, bit for bit.
    resumed = arch["root"] / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "adapter")
    shutil.rmtree(resumed / "checkpoints" / "step-2")
    _train(resumed, arch["model"], arch["text"], *arch["extra"], "model.dtype=float32", "train.mixed_precision=no",
           "train.resume=true")
    again = load_file(str(resumed / "adapter" / "adapter.safetensors"))
    assert again.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(again[key], value), key


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_trains_under_bf16_autocast_as_on_a_gpu(arch, dtype, tmp_path, monkeypatch):
    run_dir = tmp_path / "bf16"
    with gpu_semantics(monkeypatch, "bf16"):
        _train(run_dir, arch["model"], arch["text"], *arch["extra"], f"model.dtype={dtype}",
               "train.mixed_precision=bf16", "train.save_every=0")
    records = [m for m in _metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in records] == [1, 2] and all(math.isfinite(m["loss"]) for m in records)


def test_eval_at_every_rank(arch):
    out = arch["root"] / "eval"
    assert qdylora("eval", f"run_dir={arch['run']}", "rank=all", "batch_size=2", f"out_dir={out}") == 0
    rows = _rows(out)
    assert sorted(rows) == [0, 1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows.values())


def test_peft_and_merged_exports_equal_our_model_at_that_rank(arch):
    peft = pytest.importorskip("peft")
    run_dir = arch["run"]
    assert qdylora("export", f"run_dir={run_dir}", f"rank={RANK}") == 0
    ours, theirs = peft_and_ours(peft, arch["model"], run_dir, run_dir / "export" / f"rank-{RANK}-peft", RANK)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        set_rank(ours, 0)
        assert (expected - ours(input_ids=ids).logits).abs().max() > 1e-3, "the adapter must change the output"

    assert qdylora("export", f"run_dir={run_dir}", f"rank={RANK}", "format=merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "export" / f"rank-{RANK}-merged").eval()
    quantized, _, _ = load_run_model(run_dir)
    set_rank(quantized, RANK)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, quantized(input_ids=ids).logits, rtol=1e-4,
                                   atol=1e-4)


def test_a_tokenizer_with_ids_past_the_embedding_is_refused_in_one_line(tmp_path, stories260k):
    """The qwen2 directory's own tokenizer (see TOKENIZER_REPLACED) pads with id 512 of a 512-row embedding:
    a clear refusal instead of torch's `index out of range` in the first forward."""
    config = AutoConfig.for_model("qwen2", **(SMALL | {"num_hidden_layers": 1, "intermediate_size": 128}))
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(stories260k).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    if tokenizer.pad_token_id < VOCAB:
        pytest.skip("this transformers keeps stories260K's tokenizer for a qwen2 directory")
    with pytest.raises(QdyloraError) as error:
        check_tokenizer_fits(tokenizer, model)
    assert "pad token id 512 is outside the model's 512-token embedding" in str(error.value)
    assert "\n" not in str(error.value)
    check_tokenizer_fits(load_tokenizer(str(stories260k)), model)
