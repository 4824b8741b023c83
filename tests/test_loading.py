"""Shard-by-shard loading: same model as from_pretrained + inject, bounded memory, bitsandbytes checkpoints."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, LlamaForCausalLM, MixtralConfig

from qdylora_cli.adapters import find_target_modules, inject_adapters, iter_adapters, set_rank
from qdylora_cli.config import QuantConfig
from qdylora_cli.errors import QdyloraError
from qdylora_cli.loading import checkpoint_key_renamer, load_quantized, quantize_model
from qdylora_cli.model import enable_gradient_checkpointing
from qdylora_cli.quant import NF4Linear, import_bitsandbytes

VOCAB = 512


def llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaConfig(**(kwargs | overrides))


def save_sharded(path: Path, config: LlamaConfig, shard: str = "100KB") -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, max_shard_size=shard)  # float32
    return path


def regular_load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The reference: the whole float model first, then each target layer quantized by NF4Linear itself."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    for name in find_target_modules(model, ["all-linear"]):
        parent, _, attr = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr, NF4Linear.from_linear(linear, compute_dtype=dtype))
    torch.manual_seed(1)
    inject_adapters(model, r_max=4, alpha=8)
    return model


def streamed_load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    model = load_quantized(str(path), dtype=dtype, device="cpu")
    torch.manual_seed(1)
    inject_adapters(model, r_max=4, alpha=8)
    return model


@pytest.mark.parametrize(
    "overrides", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}],
    ids=["untied", "tied", "biases"],
)
def test_streamed_model_is_bit_identical_to_the_regular_load(tmp_path, overrides):
    path = save_sharded(tmp_path / "m", llama_config(**overrides))
    assert len(list(path.glob("*.safetensors"))) > 5
    ref, new = regular_load(path, torch.bfloat16), streamed_load(path, torch.bfloat16)

    ref_state, new_state = ref.state_dict(), new.state_dict()
    assert ref_state.keys() == new_state.keys()
    for key, value in ref_state.items():  # packed NF4 codes, statistics, floats and adapters alike
        assert new_state[key].dtype == value.dtype and torch.equal(new_state[key], value), key
    for (name, b_ref), (_, b_new) in zip(ref.named_buffers(), new.named_buffers()):
        assert b_ref.dtype == b_new.dtype and torch.equal(b_ref, b_new), name  # rotary inv_freq
    assert sum(isinstance(m, NF4Linear) for m in new.modules()) == 7 * 2
    if overrides.get("tie_word_embeddings"):
        assert new.lm_head.weight is new.model.embed_tokens.weight

    set_rank(new, 4)
    set_rank(ref, 4)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, new(ids).logits)


def test_peak_memory_while_loading_stays_far_below_the_float_model(tmp_path):
    """An 86 MB float32 model in 4 MB shards: loading it must never hold the float weights."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak RSS")
    config = llama_config(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=8)
    path = save_sharded(tmp_path / "big", config, shard="4MB")
    float_mib = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    save_sharded(tmp_path / "warm", llama_config(num_hidden_layers=1))
    probe = textwrap.dedent(f"""
        import torch
        from qdylora_cli.loading import checkpoint_key_renamer, load_quantized, quantize_model

        def status(key):
            return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(key))

        load_quantized({str(tmp_path / "warm")!r}, dtype=torch.float32, device="cpu")  # imports, NF4 tables
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
        base = status("VmRSS")
        model = load_quantized({str(path)!r}, dtype=torch.float32, device="cpu")
        print(status("VmHWM") - base)
    """)
    # A fixed mmap threshold stops glibc from keeping freed multi-MB temporaries in its heap (its
    # default adapts upwards): the peak then measures live memory, not allocator fragmentation.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    peak_mib = float(out.stdout.split()[-1])
    # The quantized model is ~15 MiB (NF4 linears + float32 embeddings) plus a 4 MB shard.
    assert float_mib > 80
    assert peak_mib < 0.4 * float_mib, (peak_mib, float_mib)
    print(f"peak RSS while loading: {peak_mib:.1f} MiB for a {float_mib:.1f} MiB float32 checkpoint")


def _bnb_checkpoint(path: Path, config: LlamaConfig) -> torch.nn.Module:
    """A tiny Llama whose linear layers (not lm_head) are bitsandbytes NF4, saved as transformers would."""
    bnb = import_bitsandbytes()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data.clone())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, q.to("cpu"))  # .to quantizes
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    config.save_pretrained(path)
    return model


@pytest.mark.skipif(import_bitsandbytes() is None, reason="needs bitsandbytes")
def test_bitsandbytes_nf4_checkpoint_loads_without_requantizing(tmp_path):
    bnb = import_bitsandbytes()
    bnb_model = _bnb_checkpoint(tmp_path / "bnb", llama_config(attention_bias=True))
    model = load_quantized(str(tmp_path / "bnb"), dtype=torch.float32, device="cpu")
    assert "quantization_config" not in model.config.to_dict()

    layers = {n: m for n, m in bnb_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14
    for name, layer in layers.items():
        ours = model.get_submodule(name)
        assert isinstance(ours, NF4Linear), name
        assert torch.equal(ours.weight, layer.weight.data)  # the packed codes, as stored
        expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(ours.dequantize(), expected), name
        if layer.bias is not None:
            assert torch.equal(ours.bias, layer.bias)

    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, bnb_model(ids).logits, rtol=1e-4, atol=1e-4)
    # Adapters go on top of the loaded NF4 layers, with no second quantization.
    assert len(inject_adapters(model, r_max=4, alpha=8)) == 14


def test_training_step_with_gradient_checkpointing_matches_and_keeps_no_float_weights(tmp_path):
    path = save_sharded(tmp_path / "m", llama_config(num_hidden_layers=3))
    ids = torch.randint(0, VOCAB, (3, 20))  # 60 tokens: no activation is weight-shaped

    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], list[torch.Size]]:
        model = streamed_load(path, torch.float32)
        for _, adapter in iter_adapters(model):  # B = 0 would give A no gradient
            for b in adapter.lora_B:
                torch.nn.init.normal_(b, std=0.1, generator=torch.Generator().manual_seed(b.numel()))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        set_rank(model, 3)
        saved: list[torch.Size] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, saved

    plain, saved_plain = grads(False)
    checkpointed, saved = grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 7 * 3  # slice 3 of A and B per layer
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-6, msg=name)
    # Nothing weight-shaped is kept for backward, with or without checkpointing: NF4Linear
    # re-dequantizes there. Checkpointing keeps far less (only the decoder layers' inputs).
    weight_shapes = {torch.Size((o, i)) for o, i in [(128, 128), (64, 128), (256, 128), (128, 256)]}
    assert not weight_shapes & (set(saved) | set(saved_plain))
    assert len(saved) < len(saved_plain) / 4


def test_checkpoint_problems_are_one_line_errors(tmp_path):
    path = save_sharded(tmp_path / "m", llama_config(), shard="10GB")
    with pytest.raises(QdyloraError, match="no local directory"):
        load_quantized(str(tmp_path / "nowhere"), dtype=torch.float32, device="cpu")

    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QdyloraError, match=r"lacks 1 weights .*layers\.1\.mlp\.up_proj\.weight"):
        load_quantized(str(path), dtype=torch.float32, device="cpu")

    (path / "model.safetensors").unlink()
    with pytest.raises(QdyloraError, match="safetensors"):
        load_quantized(str(path), dtype=torch.float32, device="cpu")

    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QdyloraError, match="not as bitsandbytes NF4"):
        load_quantized(str(path), dtype=torch.float32, device="cpu")


def test_checkpoints_of_the_bare_base_model_and_quant_none(tmp_path):
    """Keys without the `model.` prefix are found; quant.type=none loads floats in the compute dtype."""
    path = save_sharded(tmp_path / "m", llama_config(), shard="10GB")
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    model = load_quantized(str(path), dtype=torch.bfloat16, quant=QuantConfig(type="none"), device="cpu")
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                       state["model.layers.0.self_attn.q_proj.weight"].bfloat16())


# --- checkpoint key mapping ----------------------------------------------------------------------------


def _save_config_built(path: Path, config) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_gpt_neox_checkpoints_load_through_transformers_key_mapping(tmp_path):
    """transformers 5 saves GPT-NeoX's `lm_head` as `embed_out` (as every Pythia checkpoint names it) and
    renames it on load; the streamed load must do the same."""
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128)
    path = _save_config_built(tmp_path / "neox", config)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    plain = load_quantized(str(path), dtype=torch.float32, quant=QuantConfig(type="none"), device="cpu").eval()
    nf4 = load_quantized(str(path), dtype=torch.float32, device="cpu").eval()
    quantized_reference = quantize_model(reference, dtype=torch.float32, device="cpu").eval()
    assert sum(isinstance(m, NF4Linear) for m in nf4.modules()) == 4 * 2
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(nf4(ids).logits, quantized_reference(ids).logits, rtol=0, atol=1e-6)
    assert torch.equal(plain.lm_head.weight, reference.lm_head.weight)


def test_keys_transformers_would_merge_are_refused_in_one_line(tmp_path):
    """Mixtral's checkpoints keep one tensor per expert, which transformers 5 stacks into one parameter:
    a stream of single tensors cannot do that, so the load stops at the first such key."""
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                           num_experts_per_tok=1, max_position_embeddings=64)
    path = _save_config_built(tmp_path / "mixtral", config)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        per_expert = any(".experts.0." in key for key in f.keys())
    if not per_expert:  # a transformers that saves the stacked layout: check the renamer directly
        model = AutoModelForCausalLM.from_config(config)
        _, converter = checkpoint_key_renamer(model)("model.layers.0.block_sparse_moe.experts.0.w1.weight")
        assert converter is not None
        return
    with pytest.raises(QdyloraError) as error:
        load_quantized(str(path), dtype=torch.float32, device="cpu")
    message = str(error.value)
    assert "\n" not in message and message.startswith("mixtral checkpoints cannot be streamed")
    assert "experts.0.w" in message


def test_transformers_4_keeps_keys_but_honours_the_class_mapping(tmp_path, monkeypatch):
    """Without transformers 5's conversion_mapping module, keys stay as they are unless the class declares
    `_checkpoint_conversion_mapping` (regex -> replacement, the first that matches applies)."""
    path = save_sharded(tmp_path / "m", llama_config(), shard="10GB")
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    save_file({k.replace("model.", "language_model.model.", 1): v for k, v in state.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)  # its import now fails, as in 4.x
    model = AutoModelForCausalLM.from_config(llama_config())
    assert checkpoint_key_renamer(model)("embed_out.weight") == ("embed_out.weight", None)
    monkeypatch.setattr(LlamaForCausalLM, "_checkpoint_conversion_mapping",
                        {"^language_model\\.model": "model", "^language_model\\.": ""}, raising=False)
    assert checkpoint_key_renamer(model)("language_model.model.norm.weight") == ("model.norm.weight", None)
    loaded = load_quantized(str(path), dtype=torch.float32, quant=QuantConfig(type="none"), device="cpu")
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, state["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(loaded.lm_head.weight, state["lm_head.weight"])
