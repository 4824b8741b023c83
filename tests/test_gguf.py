"""`qdylora export format=gguf|gguf-lora`: GGUF files for llama.cpp and Ollama, checked by llama.cpp itself.

Without llama_cpp (CI): the layout claims are checked in torch (RoPE halves -> pairs, Falcon's qkv
regrouping), the written tensors are read back with gguf-py and compared with our merged model and
our factors, and every bad input is one line that writes nothing. With llama_cpp (llama-cpp-python,
built as README.md#serving says) the GGUFs run in llama.cpp: its logits and greedy tokens against
ours, per architecture, per GGUF type, for LoRA, DoRA, an allocation, a LoRA adapter GGUF on the
base GGUF, and (with LLAMA_CPP_SRC) our PEFT export through llama.cpp's own convert_lora_to_gguf.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHAKESPEARE, STORIES260K
from runners import qdylora
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qdylora_cli.adapters import merge_adapters, set_rank
from qdylora_cli.allocation import run_module_shapes
from qdylora_cli.chat import resolve_template
from qdylora_cli.errors import QdyloraError
from qdylora_cli.gguf import BPE_PRE_TOKENIZERS, Shape, check_architecture, row_order, write_model
from qdylora_cli.model import load_run_model
from qdylora_cli.rundir import load_run_config
from qdylora_cli.tiny import tiny_instructions

gguf = pytest.importorskip("gguf")

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama_cpp is not installed (build llama-cpp-python as README.md#serving says)")
CHECK_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_llamacpp.py"


def _check_module():
    spec = importlib.util.spec_from_file_location("check_llamacpp", CHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the layout, in torch --------------------------------------------------------------------------------


def _rope_halves(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """Hugging Face Llama: dimension i is rotated with i + d/2 (rotate_half)."""
    d = x.shape[-1]
    angle = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def _rope_pairs(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's `llama` (GGML_ROPE_TYPE_NORM): dimensions 2j and 2j+1 rotate together, by the same angle."""
    d = x.shape[-1]
    angle = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()
    return out


def test_q_and_k_rows_are_reordered_so_llama_cpp_pairs_rotate_as_hf_halves():
    """Reordered rows under llama.cpp's rotation give the same rotated vector (reordered) as Hugging Face's,
    so every q·k product, and so attention, is unchanged."""
    shape = Shape("llama", n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, pair_rotary=True)
    config = AutoConfig.for_model("llama")
    x = torch.randn(4 * 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    order = row_order("model.layers.0.self_attn.q_proj", config, shape)
    for pos in (0, 1, 7):
        hf = torch.cat([_rope_halves(h, pos) for h in x.view(4, 8)])
        ours = torch.cat([_rope_pairs(h, pos) for h in x[order].view(4, 8)])
        torch.testing.assert_close(ours, hf[order])
    assert row_order("model.layers.0.self_attn.k_proj", config, shape).numel() == 2 * 8  # kv heads
    assert row_order("model.layers.0.self_attn.v_proj", config, shape) is None
    qwen = Shape("qwen2", 1, 4, 2, 8, pair_rotary=False)  # rotates halves in llama.cpp too
    assert row_order("model.layers.0.self_attn.q_proj", AutoConfig.for_model("qwen2"), qwen) is None


def test_falcon_query_key_value_is_regrouped_as_q_then_k_then_v():
    shape = Shape("falcon", n_layers=1, n_heads=4, n_kv_heads=2, head_dim=3, pair_rotary=False)
    order = row_order("transformer.h.0.self_attention.query_key_value", AutoConfig.for_model("falcon"), shape)
    # Hugging Face groups per kv head: [q0 q1 k0 v0][q2 q3 k1 v1], 3 rows each
    labels = [f"{kind}{i}" for group in ([("q", 0), ("q", 1), ("k", 0), ("v", 0)], [("q", 2), ("q", 3), ("k", 1), ("v", 1)])
              for kind, i in group for _ in range(3)]
    got = [labels[i] for i in order.tolist()]
    assert got == [f"{k}{i}" for k, n in (("q", 4), ("k", 2), ("v", 2)) for i in range(n) for _ in range(3)]


@pytest.mark.parametrize(
    ("model_type", "fields", "message"),
    [
        ("gpt_neox", {}, "model_type 'gpt_neox' is not one qdylora writes to GGUF (llama, mistral, qwen2, falcon)"),
        ("falcon", {"alibi": True}, "this Falcon has alibi, which llama.cpp's falcon does not run"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'; llama.cpp's llama uses silu"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
         "rope_type 'yarn' is not one qdylora writes (default, linear, llama3)"),
    ],
)
def test_an_architecture_llama_cpp_cannot_run_is_refused_in_one_line(model_type, fields, message):
    with pytest.raises(QdyloraError) as e:
        check_architecture(AutoConfig.for_model(model_type, **fields))
    assert message in str(e.value) and "\n" not in str(e.value)


# --- the CLI on a tiny chat run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """The tiny recipe (byte-level BPE tokenizer, NF4) trained a few steps on conversations: a chat template to export."""
    root = tmp_path_factory.mktemp("gguf")
    tasks = tiny_instructions(80, seed=0)
    path = root / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t["instruction"] + " " + t["input"]},
                                                     {"role": "assistant", "content": t["output"]}]}) + "\n" for t in tasks))
    run_dir = root / "run"
    assert qdylora("train", "+recipe=tiny", "data=chat", f"data.path={path}", "data.val_fraction=0.1", "train.max_steps=6",
                   "train.batch_size=4", "train.eval_every=0", "train.save_every=0", f"run_dir={run_dir}") == 0
    return run_dir


def _read(path: Path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _values(tensor) -> np.ndarray:
    """A tensor read back, as float32 in its numpy (Hugging Face) shape."""
    data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])


def test_gguf_export_holds_the_merged_weights_tokenizer_and_chat_template(chat_run, capsys):
    assert qdylora("export", f"run_dir={chat_run}", "rank=4", "format=gguf", "gguf_type=f32") == 0
    out = chat_run / "export" / "rank-4-gguf-f32"
    assert f"llama-cli -m {out / 'model.gguf'}" in capsys.readouterr().out
    assert (out / "Modelfile").read_text() == "FROM ./model.gguf\n"
    fields, tensors = _read(out / "model.gguf")
    model, tokenizer, _ = load_run_model(chat_run, dtype="float32")
    set_rank(model, 4)
    merge_adapters(model, 4)
    shape = check_architecture(model.config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.n_layers)
    state = model.state_dict()
    assert len(tensors) == len(state)  # lm_head is not tied in the tiny model: written as output.weight
    for hf_name, weight in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        order = row_order(hf_name.rsplit(".", 1)[0], model.config, shape)
        expected = (weight if order is None else weight[order]).numpy()
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(_values(tensors[name]), expected, err_msg=name)
    # the byte-level BPE tokenizer, its special ids, BOS as it adds it, and the template it trained with
    assert (fields["general.architecture"], fields["tokenizer.ggml.model"], fields["qdylora.rank"]) == ("llama", "gpt2", 4)
    assert len(fields["tokenizer.ggml.tokens"]) == model.config.vocab_size == 264
    assert fields["tokenizer.ggml.tokens"][256:259] == ["<s>", "</s>", "<pad>"]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.add_bos_token"]) == (256, True)
    assert fields["tokenizer.chat_template"] == resolve_template(load_run_config(chat_run).data, tokenizer).text


def test_q8_0_keeps_norms_float32_and_rows_not_of_32_values_f16(chat_run):
    assert qdylora("export", f"run_dir={chat_run}", "rank=2", "format=gguf", "gguf_type=q8_0") == 0
    fields, tensors = _read(chat_run / "export" / "rank-2-gguf-q8_0" / "model.gguf")
    types = gguf.GGMLQuantizationType
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == types.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == types.Q8_0  # rows of 128
    assert tensors["blk.0.ffn_down.weight"].tensor_type == types.F16  # rows of 344 = 10.75 blocks


def test_gguf_lora_of_an_allocation_is_the_merged_delta_at_each_module(chat_run, capsys):
    """llama.cpp adds alpha/(each tensor's rank)·B·A (B in its row order) to each weight: that must be our
    update at the module's own rank, under the run's rank_stabilized scale, padded or not."""
    shapes, meta = run_module_shapes(chat_run)
    assert meta["scale"] == "rank_stabilized"
    allocation = {s.name: [1, 8, 3, 0, 5][i % 5] for i, s in enumerate(shapes)}
    path = chat_run / "allocation.json"
    path.write_text(json.dumps(allocation))
    assert qdylora("export", f"run_dir={chat_run}", "rank=0", "format=gguf", "gguf_type=f32") == 0
    model, _, _ = load_run_model(chat_run, dtype="float32")
    base = {name: m.base.dequantize().float() for name, m in model.named_modules() if hasattr(m, "lora_A")}
    merge_adapters(model, allocation)
    shape = check_architecture(model.config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.n_layers)
    for pad in (False, True):
        capsys.readouterr()
        assert qdylora("export", f"run_dir={chat_run}", f"allocation={path}", "format=gguf-lora", "gguf_type=f32",
                       f"pad={str(pad).lower()}") == 0
        out = next((chat_run / "export").glob(f"allocation-*-gguf-lora-f32{'-padded' if pad else ''}"))
        assert "--lora" in capsys.readouterr().out
        fields, tensors = _read(out / "adapter.gguf")
        assert (fields["general.type"], fields["adapter.type"]) == ("adapter", "lora")
        assert json.loads(fields["qdylora.allocation"]) == allocation
        base_path = chat_run / "export" / "rank-0-gguf-f32" / "model.gguf"
        assert (out / "Modelfile").read_text() == f"FROM {base_path.resolve()}\nADAPTER ./adapter.gguf\n"
        assert len(tensors) == 2 * sum(1 for b in allocation.values() if b)  # rank 0: no adapter
        for name, b in allocation.items():
            key = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
            if not b:
                assert f"{key}.lora_a" not in tensors
                continue
            a, bb = _values(tensors[f"{key}.lora_a"]), _values(tensors[f"{key}.lora_b"])
            assert a.shape[0] == bb.shape[1] == (8 if pad else b)
            delta = fields["adapter.lora.alpha"] / a.shape[0] * (bb @ a)
            order = row_order(name, model.config, shape)
            expected = model.get_submodule(name).weight - base[name]
            expected = (expected if order is None else expected[order]).detach().numpy()
            np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-6, err_msg=name)


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rank=4", "format=gguf", "gguf_type=q4_k"], "gguf_type='q4_k': expected one of f32, f16, bf16, q8_0"),
        (["rank=4", "gguf_type=f16"], "gguf_type='f16': expected null unless format=gguf or format=gguf-lora"),
        (["rank=9", "format=gguf"], "rank=9: expected a rank in 0..8 (the run's adapter.r_max)"),
        (["rank=9", "format=gguf-lora"], "rank=9: expected a rank in 1..8"),
        (["rank=0", "format=gguf-lora"], "rank=0: expected a rank in 1..8"),
        (["rank=4", "format=gguf", "dtype=float16"], "dtype='float16': expected null with format=gguf"),
        (["rank=4", "format=gguf", "pad=true"], "pad=True: expected false with rank=B"),
        (["rank=4", "format=gguf-lora", "gguf_type=bf16"],
         "format=gguf-lora needs the base GGUF it applies to and"),
        (["rank=4", "format=gguf-lora", "base_gguf=BASE4"], "rank 4 merged, not the base alone (export it with rank=0)"),
        (["rank=4", "format=gguf", "base_gguf=x.gguf"], "base_gguf='x.gguf': expected null unless format=gguf-lora"),
    ],
)
def test_bad_gguf_exports_are_one_line_and_write_nothing(chat_run, capsys, args, message):
    export = chat_run / "export"
    if "base_gguf=BASE4" in args:
        assert qdylora("export", f"run_dir={chat_run}", "rank=4", "format=gguf", "gguf_type=f32", "overwrite=true") == 0
        args = [a.replace("BASE4", str(export / "rank-4-gguf-f32" / "model.gguf")) for a in args]
    before = _names(export)
    capsys.readouterr()
    assert qdylora("export", f"run_dir={chat_run}", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert _names(export) == before and not any(n.startswith(".tmp") for n in _names(export))


@pytest.fixture(scope="module")
def dora_and_neox_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-other")
    common = ["+recipe=tiny", "train.max_steps=2", "train.eval_every=0", "train.save_every=0"]
    assert qdylora("train", *common, "adapter.variant=dora", "adapter.mode=full", f"run_dir={root / 'dora'}") == 0
    assert qdylora("train", *common, "model.config.model_type=gpt_neox", f"run_dir={root / 'neox'}") == 0
    return root / "dora", root / "neox"


def test_dora_as_a_lora_gguf_and_an_architecture_llama_cpp_lacks_are_refused(dora_and_neox_runs, capsys):
    dora, neox = dora_and_neox_runs
    assert qdylora("export", f"run_dir={dora}", "rank=2", "format=gguf-lora") == 2
    err = capsys.readouterr().err
    assert "DoRA rescales each row of the merged weight" in err and err.count("\n") == 1
    assert qdylora("export", f"run_dir={neox}", "rank=2", "format=gguf") == 2
    err = capsys.readouterr().err
    assert "model_type 'gpt_neox' is not one qdylora writes to GGUF" in err and err.count("\n") == 1
    assert not (dora / "export").exists() and not (neox / "export").exists()


# --- llama.cpp itself --------------------------------------------------------------------------------------

SMALL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
             initializer_range=0.2)  # weights large enough that a wrong layout moves the logits by whole units
ARCHITECTURES = {
    "llama": dict(model_type="llama", intermediate_size=128, num_key_value_heads=2, attention_bias=True),
    "mistral": dict(model_type="mistral", intermediate_size=128, num_key_value_heads=2, sliding_window=64),
    "qwen2": dict(model_type="qwen2", intermediate_size=128, num_key_value_heads=2),
    "llama3-rope": dict(model_type="llama", intermediate_size=128, num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "linear-rope": dict(model_type="llama", intermediate_size=128, num_key_value_heads=2,
                        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "falcon-40b": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False,
                       num_ln_in_parallel_attn=2),
    "falcon-7b": dict(model_type="falcon", new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
}
# llama.cpp's CPU GELU (Falcon's MLP) looks its value up in a table indexed by the input rounded to f16:
# ~3e-3 on these logits (spread ~1.6), whatever the layout; the others agree to float32 rounding.
ARCH_TOLERANCE = {"falcon-40b": 1e-2, "falcon-7b": 1e-2}


@needs_llama_cpp
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_each_architecture_runs_in_llama_cpp_as_in_transformers(name, tmp_path):
    if not STORIES260K.exists():
        pytest.skip(f"{STORIES260K} is absent")
    check = _check_module()
    fields = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **(SMALL | fields))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0, so that a misplaced one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    path = tmp_path / "model.gguf"
    write_model(path, model, tokenizer, "f32", name, {"rank": 0, "source_run": "-", "base_model": "-", "variant": "lora",
                                                      "quant": {}})
    ids = tokenizer(check.PROMPT)["input_ids"]
    seq = list(ids)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        for _ in range(8):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    got, greedy = check.theirs(path, ids, 8)
    assert np.abs(got - expected).max() < ARCH_TOLERANCE.get(name, 1e-4)
    assert greedy == seq[len(ids):]


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_our_tokenizers(chat_run, tmp_path):
    check = _check_module()
    text = "ROMEO:\nBut, soft! what light through yonder window breaks? 3.14 -- \u00e9t\u00e9  end"
    if SHAKESPEARE.exists():
        text = SHAKESPEARE.read_text()[:3000] + text
    # the byte-level BPE of the tiny recipe (one never-applying merge)
    assert qdylora("export", f"run_dir={chat_run}", "rank=0", "format=gguf", "gguf_type=f32", "overwrite=true") == 0
    _, tokenizer, _ = load_run_model(chat_run)
    assert check.tokenize(chat_run / "export" / "rank-0-gguf-f32" / "model.gguf", text) == tokenizer(text)["input_ids"]
    if not STORIES260K.exists():
        return
    # stories260K's sentencepiece: from its tokenizer.model, and from tokenizer.json alone (byte-fallback BPE,
    # scored by merge order), as transformers 5 saves a tokenizer
    stories = AutoModelForCausalLM.from_pretrained(STORIES260K)
    AutoTokenizer.from_pretrained(STORIES260K).save_pretrained(tmp_path / "json-only")
    for source in (STORIES260K, tmp_path / "json-only"):
        spm = AutoTokenizer.from_pretrained(source)
        path = tmp_path / "stories.gguf"
        write_model(path, stories, spm, "f32", "s", {"rank": 0, "source_run": "-", "base_model": "-", "variant": "lora",
                                                     "quant": {}})
        assert check.tokenize(path, text) == spm(text)["input_ids"], source


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """scripts/check_llamacpp.py's round trips on stories260K → tinyshakespeare (LoRA and DoRA runs)."""
    if not (STORIES260K.exists() and SHAKESPEARE.exists()):
        pytest.skip("stories260K or tinyshakespeare is absent (../shared)")
    src = os.environ.get("LLAMA_CPP_SRC")
    rows = _check_module().round_trips(tmp_path_factory.mktemp("llamacpp"), Path(src) if src else None)
    return {r["case"]: r for r in rows}


@needs_llama_cpp
def test_stories260k_gguf_exports_equal_our_model_in_llama_cpp(round_trips):
    tolerance = _check_module().TOLERANCE
    for case, r in round_trips.items():
        assert math.isfinite(r["max_abs_dlogit"]) and r["max_abs_dlogit"] <= r["tolerance"], (case, r)
        if r["tolerance"] <= tolerance["f16"]:  # f32 and f16: the same greedy text; bf16 and q8_0 may tip a near tie
            assert r["greedy_equal"], case
    expected = {"lora rank 5 gguf f32", "lora rank 5 gguf q8_0", "dora rank 5 gguf f32", "dora allocation gguf f32",
                "lora allocation gguf-lora f32 on the base", "lora rank 5 gguf-lora f32 vs the merged gguf",
                "lora allocation gguf-lora f32 padded on the base"}
    assert expected <= round_trips.keys()


@needs_llama_cpp
def test_peft_exports_through_llama_cpps_own_converter_equal_our_model(round_trips):
    if not os.environ.get("LLAMA_CPP_SRC"):
        pytest.skip("LLAMA_CPP_SRC (vendor/llama.cpp of the llama-cpp-python sdist) is unset: no convert_lora_to_gguf.py")
    converted = {c: r for c, r in round_trips.items() if "convert_lora_to_gguf" in c}
    assert len(converted) == 2  # a rank, and an allocation (rank_stabilized: each module's scale folded into B)
    for case, r in converted.items():
        assert r["max_abs_dlogit"] <= 1e-4 and r["greedy_equal"], (case, r)


@pytest.mark.parametrize("name", ["stories260K", "llama", "mistral"])
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_tensors_are_bit_identical_to_llama_cpps_own_converter(name, kind, tmp_path):
    """convert_hf_to_gguf.py (LLAMA_CPP_SRC) on the same Hugging Face model: the same names, types and bytes."""
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        pytest.skip("LLAMA_CPP_SRC (vendor/llama.cpp of the llama-cpp-python sdist) is unset: no convert_hf_to_gguf.py")
    if not STORIES260K.exists():
        pytest.skip(f"{STORIES260K} is absent")
    model_dir = STORIES260K
    if name != "stories260K":  # a tiny model of the family, saved as a user's checkpoint, with stories260K's tokenizer
        fields = dict(ARCHITECTURES[name])
        config = AutoConfig.for_model(fields.pop("model_type"), **(SMALL | fields))
        torch.manual_seed(0)
        model_dir = tmp_path / "hf"
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(STORIES260K).save_pretrained(model_dir)
    theirs_path, ours_path = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py
    done = subprocess.run([sys.executable, str(Path(src) / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", kind,
                           "--outfile", str(theirs_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    write_model(ours_path, AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                kind, name, {"rank": 0, "source_run": "-", "base_model": "-", "variant": "lora", "quant": {}})
    _, theirs = _read(theirs_path)
    fields, ours = _read(ours_path)
    assert ours.keys() == theirs.keys()
    for tensor_name, t in theirs.items():
        assert ours[tensor_name].tensor_type == t.tensor_type, tensor_name
        assert np.array_equal(np.asarray(ours[tensor_name].data), np.asarray(t.data)), tensor_name
    if name != "stories260K":
        # saved without tokenizer.model, the converter scores every token -1000 (gguf-py's LlamaHfVocab);
        # ours ranks them by merge order (test_llama_cpp_tokenizes_as_our_tokenizers)
        return
    reader = gguf.GGUFReader(str(theirs_path))
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert fields[key] == reader.fields[key].contents(), key


@needs_llama_cpp
@pytest.mark.parametrize("pattern", list(BPE_PRE_TOKENIZERS), ids=list(BPE_PRE_TOKENIZERS.values()))
def test_byte_level_bpe_with_a_known_split_tokenizes_as_ours(pattern, tmp_path):
    """A byte-level BPE trained here with Llama 3's or Qwen2's split regex: llama.cpp, told the name of
    that split (tokenizer.ggml.pre), must give the same tokens, digits and contractions included."""
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is absent")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = SHAKESPEARE.read_text()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text[:50_000]], trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    config = AutoConfig.for_model("qwen2", **(SMALL | dict(num_key_value_heads=2, intermediate_size=128)))
    path = tmp_path / "bpe.gguf"
    write_model(path, AutoModelForCausalLM.from_config(config), tokenizer, "f32", "bpe",
                {"rank": 0, "source_run": "-", "base_model": "-", "variant": "lora", "quant": {}})
    assert _read(path)[0]["tokenizer.ggml.pre"] == BPE_PRE_TOKENIZERS[pattern]
    sample = text[300_000:302_000] + " I've 12345 d'you   x\n\n\ty 'RE"
    assert _check_module().tokenize(path, sample) == tokenizer(sample)["input_ids"]
