"""GGUF for llama.cpp and Ollama: a merged model, or a LoRA adapter that llama.cpp applies to a base GGUF.

Written with gguf-py, llama.cpp's own Python library, in the layout llama.cpp's converters produce
(`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`; learned from, not copied):

- tensor names come from gguf-py's tensor map of the architecture (`model.layers.0.self_attn.q_proj`
  -> `blk.0.attn_q`); a tensor it has no name for is refused rather than dropped.
- llama.cpp's `llama` architecture rotates adjacent pairs of each head's dimensions, Hugging Face Llama
  rotates its two halves, so the rows of q_proj and k_proj (weights, biases, and a LoRA's B) are
  reordered per head; qwen2 and falcon rotate halves in llama.cpp too and keep their order. Falcon's
  fused query_key_value, grouped per kv head in Hugging Face, is regrouped as all q, then all k, then
  all v rows. Every such change is a permutation of output rows, so a LoRA's B gets the same one as
  the weight it adapts and `B·A` stays the delta of that weight.
- norms, biases and every 1-D tensor stay float32, as llama.cpp expects; with `q8_0` a matrix whose
  rows are not a multiple of 32 values is written f16 instead (llama.cpp's converter does the same).
- the vocabulary: a sentencepiece model as llama.cpp's `llama` tokenizer (scores from the .model
  file, or from the merge order of a byte-fallback BPE), a byte-level BPE as `gpt2` with its merges
  and the pre-tokenizer llama.cpp names after its split regex; special ids, add-BOS/EOS and the chat
  template come from the run's tokenizer.
- a LoRA adapter GGUF has `general.type=adapter`, `adapter.type=lora`, one `adapter.lora.alpha`, and
  tensors `<base tensor>.lora_a` (rank×in) and `.lora_b` (out×rank); llama.cpp scales each by
  alpha / (that tensor's rank).

`qdylora.*` keys record what was exported (rank, run, base model, quantization), so that a LoRA
export can check the base GGUF it is meant for.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from qdylora_cli.config import GGUF_TYPES
from qdylora_cli.errors import QdyloraError, first_line

# The architectures written, by Hugging Face model_type: mistral is llama.cpp's `llama` (as in its converter).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "falcon": "falcon"}
ROPE_TYPES = ("default", "linear", "llama3")

# Pre-tokenizer split regexes (as tokenizer.json writes them) and the name llama.cpp gives their split.
BPE_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}

MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
KEY_RANK = "qdylora.rank"  # -1: an allocation (qdylora.allocation holds it)


def _gguf() -> Any:
    """gguf-py, imported when a GGUF is written: the rest of qdylora works without it."""
    try:
        import gguf
        # its writer logs each file's temporary path and tensor count at INFO; our export says where it went
        logging.getLogger("gguf").setLevel(logging.WARNING)
    except ImportError:
        raise QdyloraError("format=gguf needs the gguf package (llama.cpp's gguf-py): pip install 'gguf>=0.17,<0.20'") from None
    return gguf


def _qtype(name: str) -> Any:
    return _gguf().GGMLQuantizationType[name.upper()]


def _file_type(name: str) -> Any:
    """general.file_type: what most of the tensors are (norms and biases stay float32 in any of them)."""
    types = _gguf().LlamaFileType
    return dict(zip(GGUF_TYPES, (types.ALL_F32, types.MOSTLY_F16, types.MOSTLY_BF16, types.MOSTLY_Q8_0)))[name]


# --- architecture --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the writer needs of a model config, read once and checked."""

    arch: str  # llama.cpp's architecture name
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    pair_rotary: bool  # llama.cpp's `llama`: q/k rows reordered from halves to pairs


def _rope(config: PretrainedConfig) -> dict[str, Any]:
    """RoPE settings in either of transformers' spellings (rope_parameters in 5.x, rope_scaling and rope_theta before)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def check_architecture(config: PretrainedConfig) -> Shape:
    """The model's shape for llama.cpp, or one QdyloraError line saying why it cannot be written."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise QdyloraError(f"format=gguf: model_type {model_type!r} is not one qdylora writes to GGUF "
                           f"({', '.join(ARCHITECTURES)}); export format=merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    arch = ARCHITECTURES[model_type]
    n_heads = config.num_attention_heads
    if arch == "falcon":
        problems = [what for what, bad in (("alibi", config.alibi), ("bias=true", config.bias),
                                           ("parallel_attn=false", not config.parallel_attn)) if bad]
        if problems:
            raise QdyloraError(f"format=gguf: this Falcon has {', '.join(problems)}, which llama.cpp's falcon does not run")
        # Hugging Face's Falcon: one kv head for multi_query, else num_kv_heads (the new decoder) or one per head
        n_kv = config.num_kv_heads if (config.new_decoder_architecture or not config.multi_query) else 1
        head_dim = config.hidden_size // n_heads
    else:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise QdyloraError(f"format=gguf: hidden_act {act!r}; llama.cpp's {arch} uses silu")
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    rope = _rope(config)
    if rope["rope_type"] not in ROPE_TYPES:
        raise QdyloraError(f"format=gguf: rope_type {rope['rope_type']!r} is not one qdylora writes ({', '.join(ROPE_TYPES)})")
    if arch == "falcon" and rope["rope_type"] != "default":
        raise QdyloraError(f"format=gguf: llama.cpp's falcon has no {rope['rope_type']} RoPE scaling")
    return Shape(arch, config.num_hidden_layers, n_heads, n_kv, head_dim, pair_rotary=arch == "llama")


def row_order(module: str, config: PretrainedConfig, shape: Shape) -> torch.Tensor | None:
    """The permutation llama.cpp's layout applies to the output rows of `module` (None: rows kept).

    `module` is a module name (`model.layers.0.self_attn.q_proj`); the same order serves its weight,
    its bias and a LoRA's B.
    """
    leaf = module.rsplit(".", 1)[-1]
    if shape.pair_rotary and leaf in ("q_proj", "k_proj"):
        heads = shape.n_heads if leaf == "q_proj" else shape.n_kv_heads
        # row (head, half c, j) of Hugging Face goes to (head, j, c): the halves interleaved into pairs
        return torch.arange(heads * shape.head_dim).view(heads, 2, shape.head_dim // 2).transpose(1, 2).reshape(-1)
    if shape.arch == "falcon" and leaf == "query_key_value":
        group = shape.n_heads // shape.n_kv_heads  # q heads per kv head
        rows = torch.arange((shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim)
        rows = rows.view(shape.n_kv_heads, group + 2, shape.head_dim)
        return torch.cat([rows[:, :group].reshape(-1), rows[:, group].reshape(-1), rows[:, group + 1].reshape(-1)])
    return None


def _tensor_names(shape: Shape) -> Any:
    gguf = _gguf()
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == shape.arch)
    return gguf.get_tensor_name_map(arch, shape.n_layers)


def gguf_name(names: Any, hf_name: str) -> str:
    """llama.cpp's name of the Hugging Face tensor `hf_name` (`...q_proj.weight` -> `blk.0.attn_q.weight`)."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise QdyloraError(f"format=gguf: llama.cpp has no tensor for {hf_name}")
    return name


def _tensor_type(name: str, array: np.ndarray, want: str) -> str:
    """The GGML type a tensor is stored in: float32 for norms, biases and vectors, else `want`."""
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith((".weight", ".lora_a", ".lora_b")):
        return "f32"
    if want == "q8_0" and array.shape[-1] % 32:  # Q8_0 blocks are 32 values of a row
        return "f16"
    return want


def _add_tensor(writer: Any, name: str, tensor: torch.Tensor, want: str) -> None:
    array = tensor.detach().to(torch.float32).contiguous().numpy()
    kind = _tensor_type(name, array, want)
    qtype = _qtype(kind)
    writer.add_tensor(name, _gguf().quants.quantize(array, qtype), raw_dtype=qtype)


# --- hyperparameters -------------------------------------------------------------------------------------


def _llama3_rope_factors(rope: Mapping[str, Any], head_dim: int) -> torch.Tensor:
    """Llama 3.1's frequency divisors, one per rotary pair: llama.cpp reads them as `rope_freqs`.

    Long wavelengths (beyond original_max_position_embeddings / low_freq_factor) are divided by
    `factor`, short ones (below ... / high_freq_factor) kept, the band between interpolated.
    """
    theta, factor = rope["rope_theta"], rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelength = 2 * math.pi / freqs
    smooth = (context / wavelength - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelength < context / high, 1.0, torch.where(wavelength > context / low, factor, between))
    return out.float()


def _add_hparams(writer: Any, config: PretrainedConfig, shape: Shape) -> Iterator[tuple[str, torch.Tensor]]:
    """Write the architecture's keys; yields the extra tensors some of them need (Llama 3's rope_freqs)."""
    gguf = _gguf()
    rope = _rope(config)
    writer.add_block_count(shape.n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if shape.arch == "falcon":
        writer.add_feed_forward_length(getattr(config, "ffn_hidden_size", None) or 4 * config.hidden_size)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_tensor_data_layout("jploski")  # the regrouped query_key_value, as llama.cpp's converter names it
        return
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != config.hidden_size // shape.n_heads:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(rope, shape.head_dim)


# --- vocabulary ------------------------------------------------------------------------------------------


@dataclass
class Vocab:
    model: str  # llama.cpp's tokenizer model: llama (sentencepiece) or gpt2 (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool | None = None


def _backend(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise QdyloraError("format=gguf: the run's tokenizer is not a fast (tokenizer.json) tokenizer; "
                           "llama.cpp's vocabulary is written from one")
    return json.loads(backend.to_str())


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    """tokenizer.json's merges, written either as "a b" or as ["a", "b"]."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether a sentencepiece-style tokenizer puts ▁ before the text (llama.cpp's add_space_prefix)."""
    found = False

    def visit(node: Any) -> None:
        nonlocal found
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
                found = True
            if node.get("type") == "Prepend" and node.get("prepend") == "▁":
                found = True
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(spec.get("normalizer"))
    visit(spec.get("pre_tokenizer"))
    return found


def _spm_from_model(path: str, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of a sentencepiece .model file, as llama.cpp's `llama` tokenizer reads them."""
    from sentencepiece import SentencePieceProcessor

    types = _gguf().TokenType
    sp = SentencePieceProcessor()
    sp.LoadFromFile(path)
    tokens, scores, kinds = [], [], []
    for i in range(min(sp.vocab_size(), n_vocab)):
        kind = types.NORMAL
        if sp.IsUnknown(i):
            kind = types.UNKNOWN
        elif sp.IsControl(i):
            kind = types.CONTROL
        elif sp.IsUnused(i):
            kind = types.UNUSED
        elif sp.IsByte(i):
            kind = types.BYTE
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        kinds.append(int(kind))
    return tokens, scores, kinds


def _spm_from_bpe(model: dict[str, Any], n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A byte-fallback BPE (Llama 2's tokenizer.json) as a sentencepiece vocabulary.

    llama.cpp's sentencepiece tokenizer merges, at each step, the adjacent pair whose joined text is
    the token of highest score: the score of a token made by merge k is -k, so it merges in the
    BPE's order.
    """
    types = _gguf().TokenType
    by_id = {i: t for t, i in model["vocab"].items()}
    made_by = {}
    for k, (a, b) in enumerate(_merge_pairs(model.get("merges", []))):
        made_by.setdefault(a + b, k)
    tokens, scores, kinds = [], [], []
    for i in range(min(max(by_id) + 1, n_vocab)):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        scores.append(-float(made_by.get(token, len(made_by))))
        byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        kinds.append(int(types.BYTE if byte else types.NORMAL if i in by_id else types.UNUSED))
    unk = model["vocab"].get(model.get("unk_token"))
    if unk is not None and unk < len(kinds):
        kinds[unk] = int(types.UNKNOWN)
    return tokens, scores, kinds


def _bpe_pre(spec: dict[str, Any], has_merges: bool) -> str:
    """llama.cpp's name for the byte-level BPE's pre-tokenizer split, found by its regex."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(splits) == 1 and splits[0] in BPE_PRE_TOKENIZERS:
        return BPE_PRE_TOKENIZERS[splits[0]]
    if not splits and len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        return "gpt2"  # ByteLevel's own split is GPT-2's regex
    if not has_merges:  # bytes are tokens one by one, however the text is split
        return "default"
    raise QdyloraError("format=gguf: the tokenizer's BPE pre-tokenizer is not one llama.cpp names "
                       "(GPT-2, Llama 3, Qwen2 regexes); export format=merged and convert it with convert_hf_to_gguf.py")


def build_vocab(tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> Vocab:
    """The run's tokenizer as llama.cpp's vocabulary of `n_vocab` tokens (the embedding's rows)."""
    types = _gguf().TokenType
    spec = _backend(tokenizer)
    model = spec.get("model", {})
    spm_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(spm_file, str) and spm_file.endswith(".model") and Path(spm_file).is_file():
        tokens, scores, kinds = _spm_from_model(spm_file, n_vocab)
        vocab = Vocab("llama", "default", tokens, kinds, scores, add_space_prefix=_prepends_space(spec))
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        tokens, scores, kinds = _spm_from_bpe(model, n_vocab)
        vocab = Vocab("llama", "default", tokens, kinds, scores, add_space_prefix=_prepends_space(spec))
    elif model.get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        by_id = {i: t for t, i in model["vocab"].items()}
        merges = [f"{a} {b}" for a, b in _merge_pairs(model.get("merges", []))]
        pre = _bpe_pre(spec, bool(merges))
        if not merges:
            # llama.cpp requires the key and gguf-py cannot write an empty array: one merge of two
            # special tokens' texts, which BPE never sees as symbols (they are matched whole), never applies.
            merges = [f"{tokenizer.bos_token or '<s>'} {tokenizer.eos_token or '</s>'}"]
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
        kinds = [int(types.NORMAL if i in by_id else types.UNUSED) for i in range(n_vocab)]
        vocab = Vocab("gpt2", pre, tokens, kinds, merges=merges)
    else:
        raise QdyloraError(f"format=gguf: a {model.get('type')} tokenizer is not one qdylora writes "
                           "(sentencepiece, byte-fallback or byte-level BPE)")
    # Added tokens (specials, and tokens added past the base vocabulary), then padding rows.
    while len(vocab.tokens) < n_vocab:
        i = len(vocab.tokens)
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(int(types.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(-10000.0)
    special_ids = set(tokenizer.all_special_ids)
    for i, added in tokenizer.added_tokens_decoder.items():
        if i >= n_vocab:
            raise QdyloraError(f"format=gguf: token {added.content!r} has id {i}, past the model's {n_vocab} embeddings")
        if vocab.tokens[i] == added.content and vocab.types[i] in (types.UNKNOWN, types.CONTROL, types.BYTE):
            continue  # the base vocabulary already gives it its kind (sentencepiece's <unk>, <s>, </s>)
        vocab.tokens[i] = added.content
        special = added.special or i in special_ids
        vocab.types[i] = int(types.CONTROL if special else types.USER_DEFINED)
        if vocab.scores is not None and vocab.types[i] == types.USER_DEFINED:
            vocab.scores[i] = -1000.0
    return vocab


def _add_vocab(writer: Any, tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> None:
    vocab = build_vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # Whether the tokenizer adds BOS/EOS, as it does, not as its config claims.
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


# --- writers ---------------------------------------------------------------------------------------------


def _add_provenance(writer: Any, info: Mapping[str, Any]) -> None:
    """qdylora.* keys: rank (-1 for an allocation), the run, its base model and quantization."""
    writer.add_int32(KEY_RANK, -1 if info.get("rank") is None else int(info["rank"]))
    for key in ("source_run", "base_model", "variant"):
        writer.add_string(f"qdylora.{key}", str(info[key]))
    writer.add_string("qdylora.quant", json.dumps(info["quant"], sort_keys=True))
    if info.get("allocation") is not None:
        writer.add_string("qdylora.allocation", json.dumps(info["allocation"]))


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _output_is_tied(model: PreTrainedModel) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == emb.weight.data_ptr()


def model_tensors(model: PreTrainedModel, shape: Shape) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor in llama.cpp's layout) of every weight of a plain Hugging Face model."""
    names = _tensor_names(shape)
    tied = _output_is_tied(model)
    for hf_name, tensor in model.state_dict().items():
        name = gguf_name(names, hf_name)
        if tied and name == "output.weight":  # llama.cpp uses token_embd when output is absent
            continue
        order = row_order(hf_name.rsplit(".", 1)[0], model.config, shape)
        yield name, tensor if order is None else tensor[order]


def write_model(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gguf_type: str,
                name: str, info: Mapping[str, Any]) -> None:
    """`model` (plain linears, adapters merged) with its tokenizer as one GGUF file of `gguf_type`."""
    gguf = _gguf()
    shape = check_architecture(model.config)
    # each tensor goes to a spooled temporary file as it is converted, so that only the model itself
    # and one tensor's copy are in memory, not a second copy of every weight until the end
    writer = gguf.GGUFWriter(str(path), shape.arch, use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    extra = list(_add_hparams(writer, model.config, shape))
    writer.add_file_type(_file_type(gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
    _add_provenance(writer, info)
    for tensor_name, tensor in [*extra, *model_tensors(model, shape)]:
        _add_tensor(writer, tensor_name, tensor, gguf_type)
    _finish(writer)


def write_lora(path: Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], lora_alpha: float,
               config: PretrainedConfig, gguf_type: str, name: str, info: Mapping[str, Any]) -> None:
    """A llama.cpp LoRA adapter: per module (A: rank×in, B: out×rank), scaled by lora_alpha/rank there."""
    gguf = _gguf()
    shape = check_architecture(config)
    names = _tensor_names(shape)
    writer = gguf.GGUFWriter(str(path), shape.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_alpha))
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_provenance(writer, info)
    for module, (a, b) in factors.items():
        base = gguf_name(names, f"{module}.weight")
        order = row_order(module, config, shape)
        _add_tensor(writer, f"{base}.lora_a", a, gguf_type)
        _add_tensor(writer, f"{base}.lora_b", b if order is None else b[order], gguf_type)
    _finish(writer)


def read_fields(path: Path) -> dict[str, Any]:
    """The key/value fields of a GGUF file (strings, numbers, and arrays as lists); one-line error if unreadable."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise QdyloraError(f"{path}: not a readable GGUF file ({first_line(e)})") from None
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
