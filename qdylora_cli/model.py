"""Load the tokenizer and the base model (quantized by the loader), add dynamic-rank adapters; rebuild a trained run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qdylora_cli.adapters import inject_adapters, load_adapter_state_dict
from qdylora_cli.config import ModelConfig, QuantConfig, TrainConfig
from qdylora_cli.errors import QdyloraError, first_line
from qdylora_cli.loading import dtype_kwarg, load_quantized, quantize_model
from qdylora_cli.rundir import ADAPTER, ADAPTER_CONFIG, BASE_MODEL, atomic_dir, load_adapter

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise QdyloraError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer from a path or hub id (`byte` = the built-in byte tokenizer); pad falls back to EOS."""
    if name_or_path == "byte":
        from qdylora_cli.tiny import byte_tokenizer

        tokenizer = byte_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except Exception as e:  # missing, damaged (the tokenizers library raises plain Exception) or offline
            first = first_line(e)
            raise QdyloraError(f"cannot load a tokenizer from {name_or_path!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise QdyloraError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    m: ModelConfig, quant: QuantConfig, target_modules: Sequence[str], *,
    device: torch.device | None = None, quantize_device: torch.device | None = None, keep_float: bool = False,
) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """The base model without adapters, its target layers quantized as `quant` says (loading.py), and,
    with `keep_float`, the float model of a config-built one (what its run saves as `base_model/`).

    `m.config` builds fresh float weights from `m.init_seed`; `m.name_or_path` is read shard by shard
    (on `device`, default CUDA if present).
    """
    dtype = torch_dtype(m.dtype)
    if m.config is None:
        model = load_quantized(m.name_or_path, dtype=dtype, quant=quant, target_modules=target_modules, device=device,
                               quantize_device=quantize_device, trust_remote_code=m.trust_remote_code)
        return model, None
    config = dict(m.config)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.init_seed)
        float_model = AutoModelForCausalLM.from_config(hf_config, **dtype_kwarg(dtype))
    model = quantize_model(float_model, quant=quant, target_modules=target_modules, dtype=dtype, device=device,
                           quantize_device=quantize_device)
    return model, float_model if keep_float else None


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Refuse, in one line, a tokenizer whose special ids the model has no embedding for.

    Padding and BOS/EOS go into every batch; an id past the embedding would stop the first forward
    deep inside torch (`index out of range in self`). This happens when the tokenizer is not the
    model's: transformers 5, for one, loads a directory whose config says `qwen2` with Qwen2's
    tokenizer class whatever tokenizer files it holds, adding a pad token past a small vocabulary.
    """
    rows = model.get_input_embeddings().num_embeddings
    for role in ("pad", "bos", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(token_id, int) and token_id >= rows:
            raise QdyloraError(
                f"the tokenizer's {role} token id {token_id} is outside the model's {rows}-token embedding "
                f"({type(tokenizer).__name__} from {tokenizer.name_or_path!r}): it is not this model's tokenizer; "
                "name the right one with model.tokenizer"
            )


def context_length(m: ModelConfig) -> int | None:
    """The most positions the model takes (`max_position_embeddings`), from its config alone.

    None when it states no such limit, or its config cannot be read yet (a hub model not downloaded:
    loading it reports that properly).
    """
    if m.config is not None:
        return m.config.get("max_position_embeddings")
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    except Exception:  # noqa: BLE001 - any failure here is reported by the real load
        return None
    return getattr(config, "max_position_embeddings", None)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute decoder activations in backward; non-reentrant so frozen inputs need no grad."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.18
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def build_training_model(
    cfg: TrainConfig,
    *,
    device: torch.device | None = None,
    quantize_device: torch.device | None = None,
    keep_base: bool = True,
) -> tuple[PreTrainedModel, dict[str, Any], PreTrainedModel | None]:
    """The quantized model with fresh adapters, the metadata that rebuilds it later, and what to save.

    Writes nothing. A model built from a config comes back with its unquantized twin (with
    `keep_base`): `save_base_model` stores it in the run, so eval and export rebuild the run without
    the recipe. Other models are their own reference (a path or hub id): nothing to save.
    """
    m, a, q = cfg.model, cfg.adapter, cfg.quant
    model, base = load_base_model(m, q, a.target_modules, device=device, quantize_device=quantize_device,
                                  keep_float=keep_base)
    if m.config is not None:
        base_ref = BASE_MODEL
    else:
        local = Path(m.name_or_path).expanduser()
        base_ref = str(local.resolve()) if local.exists() else m.name_or_path
    adapted = inject_adapters(model, r_max=a.r_max, alpha=a.alpha, dropout=a.dropout, mode=a.mode, variant=a.variant,
                              scale=a.scale, target_modules=a.target_modules)
    meta = {
        "base_model": base_ref,
        "tokenizer": base_ref if m.config is not None else (m.tokenizer or base_ref),
        "dtype": m.dtype,
        "trust_remote_code": m.trust_remote_code,
        "target_modules": adapted,
        "r_max": a.r_max,
        "alpha": a.alpha,
        "dropout": a.dropout,
        "mode": a.mode,
        "variant": a.variant,
        "scale": a.scale,
        "quant": {"type": q.type, "double_quant": q.double_quant, "blocksize": q.blocksize},
    }
    return model, meta, base


def save_base_model(run_dir: Path, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The unquantized weights and tokenizer of a config-built model, as `run_dir/base_model` (atomic)."""
    with atomic_dir(Path(run_dir) / BASE_MODEL, overwrite=True) as tmp:
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_base_ref(ref: str, run_dir: Path) -> str:
    """Base-model references are relative to the run dir when they name its own `base_model/`."""
    candidate = Path(run_dir) / ref
    return str(candidate) if candidate.exists() else ref


def load_run_tokenizer(run_dir: Path, meta: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer a run was trained with (`meta`: its adapter_config.json)."""
    return load_tokenizer(resolve_base_ref(meta["tokenizer"], Path(run_dir)), trust_remote_code=meta["trust_remote_code"])


def load_run_model(
    run_dir: Path, *, adapter_dir: Path | None = None, dtype: str | None = None, device: torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Rebuild a trained run: base model, the same quantization and targets, and its adapter weights."""
    run_dir = Path(run_dir)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else run_dir / ADAPTER
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise QdyloraError(f"{run_dir} has no finished adapter ({adapter_dir / ADAPTER_CONFIG} is missing)")
    weights, meta = load_adapter(adapter_dir)
    tokenizer = load_run_tokenizer(run_dir, meta)
    base = ModelConfig(name_or_path=resolve_base_ref(meta["base_model"], run_dir), dtype=dtype or meta["dtype"],
                       trust_remote_code=meta["trust_remote_code"])
    model, _ = load_base_model(base, QuantConfig(**meta["quant"]), meta["target_modules"], device=device)
    inject_adapters(
        model,
        r_max=meta["r_max"],
        alpha=meta["alpha"],
        mode=meta["mode"],
        variant=meta["variant"],
        scale=meta.get("scale", "alpha_over_rank"),  # adapters saved before scales were a choice used α/b
        target_modules=meta["target_modules"],
    )
    load_adapter_state_dict(model, weights)
    model.eval()
    check_tokenizer_fits(tokenizer, model)
    return model, tokenizer, meta
