"""`qdylora export`: one rank of a dynamic-rank run as a PEFT adapter, a merged model, or GGUF for llama.cpp.

Rank b of a DyLoRA adapter is just its first b slices, `A[:b]` and `B[:, :b]`, scaled by s(b):
exactly a plain LoRA adapter with `r=b` and `lora_alpha = s(b)·b`, so that lora_alpha/r is s(b)
under every adapter.scale. Never `use_rslora`: llama.cpp's convert_lora_to_gguf.py ignores it (as
TensorRT-LLM and vLLM once did) and applies lora_alpha/r, so with plain fields every runtime
computes s(b). A PEFT export needs no model at all, only the saved factors. A merged export
rebuilds the run, adds rank b's delta to the dequantized base weights and saves a plain Hugging
Face model. A run trained on chat data also exports its tokenizer with the chat template it was
trained with.

`allocation=PATH` exports a rank per module instead (allocation.py): PEFT gets `rank_pattern` for the
modules whose rank differs from `r` and one `lora_alpha`, each module's own scale being folded into
its B (lora_factors), so that runtimes reading only lora_alpha and each tensor's rank (llama.cpp)
compute it exactly; `pad=true` stores every module at the largest rank for runtimes that need one
rank (vLLM). Modules at rank 0 get no adapter.

`format=gguf` writes the merged model as one GGUF file (gguf.py) for llama.cpp and Ollama, `rank=0`
the dequantized base; `format=gguf-lora` writes llama.cpp's LoRA adapter GGUF of a rank, for that
base GGUF, so that one base serves several ranks side by side.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from qdylora_cli.adapters import merge_adapters, rank_scale, ranks_by_module
from qdylora_cli.allocation import allocation_params, read_allocation, run_module_shapes
from qdylora_cli.chat import resolve_template
from qdylora_cli.config import DEFAULT_GGUF_TYPE, ExportConfig, TrainConfig, is_chat
from qdylora_cli.errors import QdyloraError, first_line
from qdylora_cli.gguf import (
    ADAPTER_FILE,
    KEY_RANK,
    MODEL_FILE,
    check_architecture,
    read_fields,
    write_lora,
    write_model,
)
from qdylora_cli.model import load_run_model, load_run_tokenizer, resolve_base_ref, torch_dtype
from qdylora_cli.rundir import (
    ADAPTER,
    BASE_MODEL,
    EXPORT,
    EXPORT_INFO,
    atomic_dir,
    check_writable,
    load_adapter,
    load_run_config,
    note_if_training,
)

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def export_dir(cfg: ExportConfig, params: int | None = None) -> Path:
    """out_dir, else RUN_DIR/export/rank-B-FORMAT, or allocation-Nparams-FORMAT for an allocation of N parameters.

    GGUF formats add their gguf_type (rank-8-gguf-f16), a padded allocation `-padded`.
    """
    if cfg.out_dir:
        return Path(cfg.out_dir)
    name = f"rank-{cfg.rank}" if cfg.allocation is None else f"allocation-{params}params"
    kind = cfg.format + (f"-{gguf_type(cfg)}" if cfg.format.startswith("gguf") else "")
    return Path(cfg.run_dir) / EXPORT / f"{name}-{kind}{'-padded' if cfg.pad else ''}"


# vLLM refuses an adapter whose rank is above its --max-lora-rank, which must be one of these.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def peft_lora_alpha(scale: str, alpha: float, r_max: int, b: int) -> float:
    """The `lora_alpha` of a plain LoRA with r=b whose scale lora_alpha/r is our s(b): s(b)·b.

    `alpha_over_rank` gives α itself (what s(b)·b is, without its rounding), the same at every rank.
    """
    if scale == "alpha_over_rank":
        return float(alpha)
    return rank_scale(scale, alpha, r_max, b) * b


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts for an adapter of rank `rank`; None above all of them."""
    return next((cap for cap in VLLM_MAX_LORA_RANKS if cap >= rank), None)


def peft_module_pattern(name: str) -> str:
    """A `rank_pattern`/`alpha_pattern` key for exactly module `name`.

    PEFT matches a key as the regex `(.*\\.)?(KEY)$` against module names, so the escaped full name
    matches that module alone: `layers.1.` never matches `layers.11.`, nor `.` another character.
    """
    return re.escape(name)


def lora_factors(
    weights: dict[str, torch.Tensor], meta: dict[str, Any], rank: int | Mapping[str, int], pad: bool = False
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float, dict[str, int]]:
    """Plain LoRA factors of rank `rank` of a saved dynamic-rank adapter: ({module: (A, B)}, r, lora_alpha, ranks).

    A runtime computes `(lora_alpha / ρ)·B·A` with ρ the stored rank of each module's tensors. We
    need `s(b)·B[:, :b]·A[:b]` for a module at rank b, so B carries the factor `s(b)·ρ/lora_alpha`,
    which is exactly 1 for every module at rank r (all of them, for one rank). An allocation thus
    needs one global lora_alpha and no alpha_pattern: llama.cpp (which reads only lora_alpha and each
    tensor's rank) and PEFT compute the same. `pad` stores every module at the largest rank R, A's
    extra rows and B's extra columns zero, so the update is unchanged and `r = R` is the only rank
    in the file: what vLLM needs, which reads neither rank_pattern nor alpha_pattern and scales every
    module by lora_alpha/r. `r` is the most common rank (the larger on a tie), or R with `pad`;
    modules at rank 0 get no factors.
    """
    ranks = ranks_by_module(meta["target_modules"], rank)
    adapted = [name for name in meta["target_modules"] if ranks[name] > 0]
    scale, alpha, r_max = meta.get("scale", "alpha_over_rank"), meta["alpha"], meta["r_max"]
    if pad:
        r = max(ranks[name] for name in adapted)
    else:  # the most common rank (the larger on a tie) is `r`; the others go to rank_pattern
        r = max(Counter(ranks[name] for name in adapted).most_common(), key=lambda rc: (rc[1], rc[0]))[0]
    lora_alpha = peft_lora_alpha(scale, alpha, r_max, r)
    factors = {}
    for name in adapted:
        b = ranks[name]
        stored = r if pad else b
        a_b = weights[f"{name}.lora_A"][:b]
        b_b = weights[f"{name}.lora_B"][:, :b]
        # s(b)·ρ/lora_alpha, written so that it is exactly 1.0 at b = r: peft_lora_alpha(b) is s(b)·b
        factor = peft_lora_alpha(scale, alpha, r_max, b) / lora_alpha * (stored / b)
        if factor != 1.0:
            b_b = b_b * factor  # rounded once, in the adapter's float32
        if stored > b:
            a_b = torch.cat([a_b, a_b.new_zeros(stored - b, a_b.shape[1])])
            b_b = torch.cat([b_b, b_b.new_zeros(b_b.shape[0], stored - b)], dim=1)
        factors[name] = (a_b.contiguous(), b_b.contiguous())
    return factors, r, lora_alpha, {name: ranks[name] for name in adapted}


def peft_adapter(
    weights: dict[str, torch.Tensor], meta: dict[str, Any], rank: int | Mapping[str, int], pad: bool = False
) -> tuple[dict, dict]:
    """(PEFT state dict, adapter_config.json contents) of rank `rank` of a saved dynamic-rank adapter.

    Plain LoRA fields only (`use_rslora` false): lora_alpha/r is s(r). `rank` may be a rank per
    module (an allocation): `r` is then the most common rank and `rank_pattern` names the modules at
    other ranks, whose B carries the difference in scale (lora_factors), so there is no
    `alpha_pattern`; modules at rank 0 get no adapter. `pad` writes every module at the largest rank
    instead, with no rank_pattern either.
    """
    factors, r, lora_alpha, ranks = lora_factors(weights, meta, rank, pad)
    state = {}
    for name, (a, b) in factors.items():
        key = f"base_model.model.{name}"
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = a, b
        if meta["variant"] == "dora":
            state[f"{key}.lora_magnitude_vector"] = weights[f"{name}.magnitude"]
    rank_pattern = {peft_module_pattern(name): ranks[name] for name in factors if not pad and ranks[name] != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta["base_model"],
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},  # each module's scale is in its B: one lora_alpha serves all
        "lora_dropout": 0.0,
        "target_modules": list(factors),  # full module names: matches exactly these layers
        "use_dora": meta["variant"] == "dora",
        "use_rslora": False,  # lora_alpha/r already is s(b); runtimes that ignore this field agree
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return state, config


def _with_chat_template(run_cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A run trained on chat data: its tokenizer carries the template it was trained with (the built-in
    ChatML for one that had none), so `apply_chat_template` formats prompts as in training."""
    tokenizer.chat_template = resolve_template(run_cfg.data, tokenizer).text
    return tokenizer


def serving_note(config: Mapping[str, Any]) -> str:
    """What vLLM needs to serve the adapter `config` describes: `--max-lora-rank` covering its largest rank,
    and a uniform rank: vLLM reads no rank_pattern and scales every module by lora_alpha/r."""
    if config["use_dora"]:
        return "vLLM does not serve DoRA adapters"
    top = max([config["r"], *config["rank_pattern"].values()])
    cap = vllm_max_lora_rank(top)
    if cap is None:
        return f"vLLM cannot serve it: rank {top} is above its largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})"
    note = f"serve it with vLLM --max-lora-rank {cap} or more (its largest rank is {top})"
    if config["rank_pattern"]:
        note += ("; only once exported with pad=true: vLLM reads no rank_pattern and would scale every layer "
                 "by lora_alpha/r")
    return note


def _export_peft(cfg: ExportConfig, out: Path, rank: int | Mapping[str, int]) -> str:
    """Writes the adapter; returns its serving note."""
    weights, meta = load_adapter(Path(cfg.run_dir) / ADAPTER)
    state, config = peft_adapter(weights, meta, rank, pad=cfg.pad)
    if meta["base_model"] == BASE_MODEL:  # built from a config: the run keeps the model it trained on
        config["base_model_name_or_path"] = str((Path(cfg.run_dir) / BASE_MODEL).resolve())
    run_cfg = load_run_config(cfg.run_dir)
    chat = is_chat(run_cfg.data)
    tokenizer = _with_chat_template(run_cfg, load_run_tokenizer(Path(cfg.run_dir), meta)) if chat else None
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return serving_note(config)


def _merged_model(cfg: ExportConfig, rank: int | Mapping[str, int], dtype: str | None = None) -> tuple[Any, Any, dict]:
    """The run with rank `rank` merged into plain linears, and its tokenizer (with the chat template it trained with)."""
    model, tokenizer, meta = load_run_model(Path(cfg.run_dir), dtype=dtype, device=torch.device("cpu"))
    run_cfg = load_run_config(cfg.run_dir)
    if is_chat(run_cfg.data):
        tokenizer = _with_chat_template(run_cfg, tokenizer)
    merge_adapters(model, rank)
    return model, tokenizer, meta


def _export_merged(cfg: ExportConfig, out: Path, rank: int | Mapping[str, int]) -> None:
    model, tokenizer, meta = _merged_model(cfg, rank)
    run_cfg = load_run_config(cfg.run_dir)
    dtype = torch_dtype(cfg.dtype or meta["dtype"])
    model.to(dtype)
    info = {
        "rank": cfg.rank,  # null for an allocation
        "format": "merged",
        "dtype": cfg.dtype or meta["dtype"],
        "source_run": str(Path(cfg.run_dir).resolve()),
        "base_model": meta["base_model"],
        "variant": meta["variant"],
        # `qdylora eval` of this directory evaluates on the run's validation data with this config
        "run_config": OmegaConf.to_container(OmegaConf.structured(run_cfg), resolve=True),
    }
    if cfg.allocation is not None:
        info["allocation"] = dict(rank)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2))


# --- GGUF (llama.cpp, Ollama) ----------------------------------------------------------------------------

MODELFILE = "Modelfile"  # Ollama's: `ollama create NAME -f Modelfile`


def gguf_type(cfg: ExportConfig) -> str:
    return cfg.gguf_type or DEFAULT_GGUF_TYPE


def _gguf_name(cfg: ExportConfig) -> str:
    """The model name written into a GGUF: the run's folder and what of it was exported."""
    return Path(cfg.run_dir).resolve().name + (f"-rank{cfg.rank}" if cfg.allocation is None else "-allocation")


def _gguf_info(cfg: ExportConfig, meta: Mapping[str, Any], rank: int | Mapping[str, int]) -> dict[str, Any]:
    """What the GGUF's qdylora.* keys record: enough for a LoRA export to recognise its base."""
    return {"rank": cfg.rank, "source_run": str(Path(cfg.run_dir).resolve()), "base_model": meta["base_model"],
            "variant": meta["variant"], "quant": meta["quant"],
            "allocation": dict(rank) if isinstance(rank, Mapping) else None}


def _base_config(run_dir: Path, meta: Mapping[str, Any]) -> PretrainedConfig:
    """The run's base model config, without loading its weights."""
    try:
        return AutoConfig.from_pretrained(resolve_base_ref(meta["base_model"], run_dir), trust_remote_code=meta["trust_remote_code"])
    except (OSError, ValueError) as e:
        raise QdyloraError(f"cannot read the base model's config ({meta['base_model']}): {first_line(e)}") from None


def base_gguf_path(cfg: ExportConfig) -> Path:
    """The base GGUF a gguf-lora export applies to: base_gguf, else the run's rank-0 gguf export of that gguf_type."""
    if cfg.base_gguf:
        return Path(cfg.base_gguf).expanduser()
    return Path(cfg.run_dir) / EXPORT / f"rank-0-gguf-{gguf_type(cfg)}" / MODEL_FILE


def check_base_gguf(cfg: ExportConfig, meta: Mapping[str, Any]) -> Path:
    """The base GGUF for a gguf-lora export, checked to be the dequantized base of this run's model."""
    path = base_gguf_path(cfg)
    if not path.is_file():
        raise QdyloraError(
            f"format=gguf-lora needs the base GGUF it applies to and {path} does not exist: export it first with "
            f"`qdylora export run_dir={cfg.run_dir} rank=0 format=gguf gguf_type={gguf_type(cfg)}`, or give base_gguf=PATH")
    fields = read_fields(path)
    if fields.get("general.type") != "model" or KEY_RANK not in fields:
        raise QdyloraError(f"base_gguf={str(path)!r}: not a model GGUF written by qdylora export format=gguf")
    if fields[KEY_RANK] != 0:
        what = "an allocation" if fields[KEY_RANK] == -1 else f"rank {fields[KEY_RANK]}"
        raise QdyloraError(f"base_gguf={str(path)!r}: {what} merged, not the base alone (export it with rank=0)")
    same_base = fields.get("qdylora.base_model") == str(meta["base_model"]) and fields.get(
        "qdylora.quant") == json.dumps(meta["quant"], sort_keys=True)
    if meta["base_model"] == BASE_MODEL:  # built from a config: only its own run has these weights
        same_base = same_base and fields.get("qdylora.source_run") == str(Path(cfg.run_dir).resolve())
    if not same_base:
        raise QdyloraError(f"base_gguf={str(path)!r}: the base of another model or quantization than this run's "
                           f"({meta['base_model']})")
    return path


def _export_gguf(cfg: ExportConfig, out: Path, rank: int | Mapping[str, int]) -> Path:
    """One GGUF of the merged model (rank 0: the dequantized base) and an Ollama Modelfile; returns the .gguf."""
    # float32 merge: gguf_type alone decides how the weights are rounded
    model, tokenizer, meta = _merged_model(cfg, rank, dtype="float32")
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        write_model(tmp / MODEL_FILE, model, tokenizer, gguf_type(cfg), _gguf_name(cfg), _gguf_info(cfg, meta, rank))
        (tmp / MODELFILE).write_text(f"FROM ./{MODEL_FILE}\n")
    return out / MODEL_FILE


def _export_gguf_lora(cfg: ExportConfig, out: Path, rank: int | Mapping[str, int], base: Path,
                      config: PretrainedConfig) -> Path:
    """llama.cpp's LoRA adapter GGUF of `rank` for the base GGUF `base`, and a Modelfile naming both."""
    weights, meta = load_adapter(Path(cfg.run_dir) / ADAPTER)
    factors, _, lora_alpha, _ = lora_factors(weights, meta, rank, pad=cfg.pad)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        write_lora(tmp / ADAPTER_FILE, factors, lora_alpha, config, gguf_type(cfg), _gguf_name(cfg),
                   _gguf_info(cfg, meta, rank))
        (tmp / MODELFILE).write_text(f"FROM {base.resolve()}\nADAPTER ./{ADAPTER_FILE}\n")
    return out / ADAPTER_FILE


def run(cfg: ExportConfig) -> Path:
    """Write the export; refuses to replace an existing one unless overwrite=true. Returns its directory."""
    rank: int | dict[str, int] = cfg.rank
    params = None
    if cfg.allocation is not None:  # read and checked before anything is written
        shapes, meta = run_module_shapes(cfg.run_dir)
        rank = read_allocation(cfg.allocation, shapes, meta["r_max"])
        params = allocation_params(shapes, rank)
    out = export_dir(cfg, params)
    if out.exists() and not cfg.overwrite:
        raise QdyloraError(f"{out} already exists; pass overwrite=true to replace it")
    check_writable(out, "out_dir")
    base = config = None
    if cfg.format in ("gguf", "gguf-lora"):  # everything llama.cpp needs is checked before the model loads
        meta = run_module_shapes(cfg.run_dir)[1]  # the adapter's metadata, no weights read
        config = _base_config(Path(cfg.run_dir), meta)
        check_architecture(config)
        if cfg.format == "gguf-lora":
            if meta["variant"] == "dora":
                raise QdyloraError("format=gguf-lora: DoRA rescales each row of the merged weight, which a llama.cpp "
                                   "LoRA adapter cannot express; export format=gguf (the merged model) instead")
            base = check_base_gguf(cfg, meta)
    note_if_training(Path(cfg.run_dir))
    if cfg.format == "peft":
        note = _export_peft(cfg, out, rank)
        hint = f"peft.PeftModel.from_pretrained(base_model, {str(out)!r}); {note}"
    elif cfg.format == "gguf":
        path = _export_gguf(cfg, out, rank)
        hint = f"llama-cli -m {path}, or with Ollama: ollama create NAME -f {out / MODELFILE}"
    elif cfg.format == "gguf-lora":
        path = _export_gguf_lora(cfg, out, rank, base, config)
        hint = f"llama-cli -m {base} --lora {path}, or with Ollama: ollama create NAME -f {out / MODELFILE}"
    else:
        _export_merged(cfg, out, rank)
        hint = f"AutoModelForCausalLM.from_pretrained({str(out)!r})"
    what = f"rank {cfg.rank}" if cfg.allocation is None else f"the allocation in {cfg.allocation} ({params:,} adapter parameters)"
    kind = cfg.format + (f" {gguf_type(cfg)}" if cfg.format.startswith("gguf") else "") + (", padded" if cfg.pad else "")
    print(f"exported {what} ({kind}) to {out}\nload it with {hint}")
    return out
