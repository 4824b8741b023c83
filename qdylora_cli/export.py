"""`qdylora export`: one rank of a dynamic-rank run as a standard PEFT adapter or a merged model.

Rank b of a DyLoRA adapter is just its first b slices, `A[:b]` and `B[:, :b]`, scaled by s(b):
exactly a plain LoRA adapter with `r=b` and `lora_alpha = s(b)·b`, so that lora_alpha/r is s(b)
under every adapter.scale. Never `use_rslora`: llama.cpp's convert_lora_to_gguf.py ignores it (as
TensorRT-LLM and vLLM once did) and applies lora_alpha/r, so with plain fields every runtime
computes s(b). A PEFT export needs no model at all, only the saved factors. A merged export
rebuilds the run, adds rank b's delta to the dequantized base weights and saves a plain Hugging
Face model. A run trained on chat data also exports its tokenizer with the chat template it was
trained with.

`allocation=PATH` exports a rank per module instead (allocation.py): PEFT gets `rank_pattern` for the
modules whose rank differs from `r`, `alpha_pattern` for those whose s(b)·b differs from `lora_alpha`
(every scale but alpha_over_rank), and no adapter at all on rank-0 modules.
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
from transformers import PreTrainedTokenizerBase

from qdylora_cli.adapters import merge_adapters, rank_scale, ranks_by_module
from qdylora_cli.allocation import allocation_params, read_allocation, run_module_shapes
from qdylora_cli.chat import resolve_template
from qdylora_cli.config import ExportConfig, TrainConfig, is_chat
from qdylora_cli.errors import QdyloraError
from qdylora_cli.model import load_run_model, load_run_tokenizer, torch_dtype
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
    """out_dir, else RUN_DIR/export/rank-B-FORMAT, or allocation-Nparams-FORMAT for an allocation of N parameters."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    name = f"rank-{cfg.rank}" if cfg.allocation is None else f"allocation-{params}params"
    return Path(cfg.run_dir) / EXPORT / f"{name}-{cfg.format}"


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


def peft_adapter(
    weights: dict[str, torch.Tensor], meta: dict[str, Any], rank: int | Mapping[str, int]
) -> tuple[dict, dict]:
    """(PEFT state dict, adapter_config.json contents) of rank `rank` of a saved dynamic-rank adapter.

    Plain LoRA fields only (`use_rslora` false): lora_alpha/r is s(r). `rank` may be a rank per
    module (an allocation): `r` is then the most common rank, `rank_pattern` names the modules at
    other ranks, `alpha_pattern` those whose s(b)·b differs from `lora_alpha` (any scale but
    alpha_over_rank), and modules at rank 0 get no adapter.
    """
    ranks = ranks_by_module(meta["target_modules"], rank)
    adapted = [name for name in meta["target_modules"] if ranks[name] > 0]
    scale = meta.get("scale", "alpha_over_rank")
    state = {}
    for name in adapted:
        key, b = f"base_model.model.{name}", ranks[name]
        state[f"{key}.lora_A.weight"] = weights[f"{name}.lora_A"][:b].contiguous()
        state[f"{key}.lora_B.weight"] = weights[f"{name}.lora_B"][:, :b].contiguous()
        if meta["variant"] == "dora":
            state[f"{key}.lora_magnitude_vector"] = weights[f"{name}.magnitude"]
    # The most common rank (the larger on a tie) is `r`; the others go to the patterns.
    r = max(Counter(ranks[name] for name in adapted).most_common(), key=lambda rc: (rc[1], rc[0]))[0]
    lora_alpha = peft_lora_alpha(scale, meta["alpha"], meta["r_max"], r)
    rank_pattern, alpha_pattern = {}, {}
    for name in adapted:
        if ranks[name] != r:
            rank_pattern[peft_module_pattern(name)] = ranks[name]
            alpha = peft_lora_alpha(scale, meta["alpha"], meta["r_max"], ranks[name])
            if alpha != lora_alpha:
                alpha_pattern[peft_module_pattern(name)] = alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta["base_model"],
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "target_modules": adapted,  # full module names: matches exactly these layers
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
    """What vLLM needs to serve the adapter `config` describes: `--max-lora-rank` covering its largest rank."""
    if config["use_dora"]:
        return "vLLM does not serve DoRA adapters"
    top = max([config["r"], *config["rank_pattern"].values()])
    cap = vllm_max_lora_rank(top)
    if cap is None:
        return f"vLLM cannot serve it: rank {top} is above its largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})"
    return f"serve it with vLLM --max-lora-rank {cap} or more (its largest rank is {top})"


def _export_peft(cfg: ExportConfig, out: Path, rank: int | Mapping[str, int]) -> str:
    """Writes the adapter; returns its serving note."""
    weights, meta = load_adapter(Path(cfg.run_dir) / ADAPTER)
    state, config = peft_adapter(weights, meta, rank)
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


def _export_merged(cfg: ExportConfig, out: Path, rank: int | Mapping[str, int]) -> None:
    model, tokenizer, meta = load_run_model(Path(cfg.run_dir), device=torch.device("cpu"))
    run_cfg = load_run_config(cfg.run_dir)
    if is_chat(run_cfg.data):
        tokenizer = _with_chat_template(run_cfg, tokenizer)
    merge_adapters(model, rank)
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
    note_if_training(Path(cfg.run_dir))
    if cfg.format == "peft":
        note = _export_peft(cfg, out, rank)
        hint = f"peft.PeftModel.from_pretrained(base_model, {str(out)!r}); {note}"
    else:
        _export_merged(cfg, out, rank)
        hint = f"AutoModelForCausalLM.from_pretrained({str(out)!r})"
    what = f"rank {cfg.rank}" if cfg.allocation is None else f"the allocation in {cfg.allocation} ({params:,} adapter parameters)"
    print(f"exported {what} ({cfg.format}) to {out}\nload it with {hint}")
    return out
