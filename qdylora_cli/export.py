"""`qdylora export`: one rank of a dynamic-rank run as a standard PEFT adapter or a merged model.

Rank b of a DyLoRA adapter is just its first b slices, `A[:b]` and `B[:, :b]`, scaled by s(b):
exactly a LoRA adapter with `r=b` and the `lora_alpha` (and `use_rslora`) that make PEFT compute
s(b). So a PEFT export needs no model at all, only the saved factors. A merged export rebuilds the
run, adds rank b's delta to the dequantized base weights and saves a plain Hugging Face model. A
run trained on chat data also exports its tokenizer with the chat template it was trained with.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from qdylora_cli.adapters import merge_adapters
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


def export_dir(cfg: ExportConfig) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else Path(cfg.run_dir) / EXPORT / f"rank-{cfg.rank}-{cfg.format}"


def peft_alpha(scale: str, alpha: float, r_max: int, b: int) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) for which PEFT's scale at r=b is our s(b).

    PEFT scales by lora_alpha/r, or lora_alpha/√r with use_rslora.
    """
    if scale == "alpha_over_rank":
        return alpha, False
    if scale == "rank_stabilized":  # α/√(r_max·b) = (α/√r_max)/√b
        return alpha / math.sqrt(r_max), True
    return alpha * b / r_max, False  # constant: α/r_max = (α·b/r_max)/b


def peft_adapter(weights: dict[str, torch.Tensor], meta: dict[str, Any], rank: int) -> tuple[dict, dict]:
    """(PEFT state dict, adapter_config.json contents) of rank `rank` of a saved dynamic-rank adapter."""
    state = {}
    for name in meta["target_modules"]:
        key = f"base_model.model.{name}"
        state[f"{key}.lora_A.weight"] = weights[f"{name}.lora_A"][:rank].contiguous()
        state[f"{key}.lora_B.weight"] = weights[f"{name}.lora_B"][:, :rank].contiguous()
        if meta["variant"] == "dora":
            state[f"{key}.lora_magnitude_vector"] = weights[f"{name}.magnitude"]
    lora_alpha, rslora = peft_alpha(meta.get("scale", "alpha_over_rank"), meta["alpha"], meta["r_max"], rank)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta["base_model"],
        "r": rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": list(meta["target_modules"]),  # full module names: matches exactly these layers
        "use_dora": meta["variant"] == "dora",
        "use_rslora": rslora,
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


def _export_peft(cfg: ExportConfig, out: Path) -> None:
    weights, meta = load_adapter(Path(cfg.run_dir) / ADAPTER)
    state, config = peft_adapter(weights, meta, cfg.rank)
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


def _export_merged(cfg: ExportConfig, out: Path) -> None:
    model, tokenizer, meta = load_run_model(Path(cfg.run_dir), device=torch.device("cpu"))
    run_cfg = load_run_config(cfg.run_dir)
    if is_chat(run_cfg.data):
        tokenizer = _with_chat_template(run_cfg, tokenizer)
    merge_adapters(model, cfg.rank)
    dtype = torch_dtype(cfg.dtype or meta["dtype"])
    model.to(dtype)
    info = {
        "rank": cfg.rank,
        "format": "merged",
        "dtype": cfg.dtype or meta["dtype"],
        "source_run": str(Path(cfg.run_dir).resolve()),
        "base_model": meta["base_model"],
        "variant": meta["variant"],
        # `qdylora eval` of this directory evaluates on the run's validation data with this config
        "run_config": OmegaConf.to_container(OmegaConf.structured(run_cfg), resolve=True),
    }
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2))


def run(cfg: ExportConfig) -> Path:
    """Write the export; refuses to replace an existing one unless overwrite=true. Returns its directory."""
    out = export_dir(cfg)
    if out.exists() and not cfg.overwrite:
        raise QdyloraError(f"{out} already exists; pass overwrite=true to replace it")
    check_writable(out, "out_dir")
    note_if_training(Path(cfg.run_dir))
    if cfg.format == "peft":
        _export_peft(cfg, out)
        hint = f"peft.PeftModel.from_pretrained(base_model, {str(out)!r})"
    else:
        _export_merged(cfg, out)
        hint = f"AutoModelForCausalLM.from_pretrained({str(out)!r})"
    print(f"exported rank {cfg.rank} ({cfg.format}) to {out}\nload it with {hint}")
    return out
