"""The multi-rank engine: many ranks (or per-module allocations) of one model in one forward.

The base weights are the same for every rank, so ranks run together: the batch is repeated once
per rank and each adapter applies its own rank to its chunk (`set_chunk_ranks`), so every NF4
weight is dequantized once per batch for all ranks. Losses (`rank_losses`: training's validation,
`qdylora eval`, `qdylora allocate`), generation (`generate_at_ranks`: eval's tasks, `qdylora
generate`) and multiple-choice answers (`mcq_predictions`) all batch ranks this way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

from qdylora_cli.adapters import set_chunk_ranks, set_rank
from qdylora_cli.chat import TurnEnd
from qdylora_cli.config import QuantConfig
from qdylora_cli.data import pad_token_id
from qdylora_cli.loading import load_quantized
from qdylora_cli.loss import loss_tokens, token_losses
from qdylora_cli.model import load_run_model, load_tokenizer, torch_dtype
from qdylora_cli.rundir import load_export_info
from qdylora_cli.sampling import Sampling, SharedNoiseSampler

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # a multiple-choice answer is one of these


# --- loss of many ranks at once ------------------------------------------------------------------------


@torch.no_grad()
def _chunk_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], ranks: Sequence[int | Mapping[str, int]]
) -> torch.Tensor:
    """Summed token loss and token count for each rank (or rank per module) in `ranks` on one batch: (len(ranks), 2)."""
    k = len(ranks)
    set_chunk_ranks(model, ranks)
    input_ids = batch["input_ids"].repeat(k, 1)
    attention_mask = batch["attention_mask"].repeat(k, 1)
    labels = batch["labels"].repeat(k, 1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    token_loss = token_losses(logits, labels).view(k, -1)
    counts = loss_tokens(labels).view(k, -1).sum(dim=1)
    return torch.stack([token_loss.sum(dim=1), counts.to(token_loss.dtype)], dim=1)


def groups(n: int, size: int) -> list[list[int]]:
    """Indices 0..n-1 in consecutive groups of at most `size`: the settings that share one forward."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


@torch.no_grad()
def allocation_losses(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    settings: Sequence[int | Mapping[str, int]],
    *,
    ranks_per_pass: int = 8,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Mean token loss of each setting over `batches`: a rank for every adapter (0 = the base model
    alone) or a rank per module (an allocation, see allocation.py). `ranks_per_pass` settings share a forward."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(settings), 2, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        for idx in groups(len(settings), ranks_per_pass):
            totals[idx] += _chunk_losses(model, batch, [settings[i] for i in idx]).double().cpu()
    model.train(was_training)
    return [(totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i in range(len(settings))]


def rank_losses(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    ranks: Sequence[int],
    *,
    ranks_per_pass: int = 8,
    device: torch.device | str = "cpu",
) -> dict[int, float]:
    """Mean token loss per rank over `batches` (rank 0 = the base model alone)."""
    ranks = list(ranks)
    return dict(zip(ranks, allocation_losses(model, batches, ranks, ranks_per_pass=ranks_per_pass, device=device)))


# --- generation at several ranks -----------------------------------------------------------------------


def _prompts_at_ranks(
    model: Any, tokenizer: Any, prompts: list[str], ranks: Sequence[int], device: torch.device, chat: bool = False
) -> dict[str, torch.Tensor]:
    """Set one rank per chunk and return the prompts, left-padded (every row's next token at the
    same position) and repeated once per rank. Chat prompts hold their special tokens already."""
    set_rank(model, ranks[0] if len(ranks) == 1 else tuple(ranks))
    ids = tokenizer(prompts, add_special_tokens=not chat, verbose=False)["input_ids"]
    width = max(map(len, ids))
    pad = pad_token_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return {"input_ids": input_ids.repeat(len(ranks), 1), "attention_mask": mask.repeat(len(ranks), 1)}


@torch.no_grad()
def generate_at_ranks(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    ranks: Sequence[int],
    max_new_tokens: int,
    device: torch.device,
    sampling: Sampling | None = None,
    turn_end: TurnEnd | None = None,
) -> dict[int, list[str]]:
    """Continuations of `prompts` at each rank, all ranks in one batched `generate`.

    Greedy without `sampling`; with it, sampled so that a prompt gets the same random draws at
    every rank and in any batch (sampling.py): one call for several ranks equals one call per rank.
    `turn_end`: the prompts are rendered chat; a continuation ends with the assistant's turn.
    """
    inputs = _prompts_at_ranks(model, tokenizer, prompts, ranks, device, chat=turn_end is not None)
    sampler = LogitsProcessorList([SharedNoiseSampler(sampling, prompts * len(ranks))]) if sampling else None
    stop_ids = [tokenizer.eos_token_id, *(turn_end.token_ids if turn_end else [])]
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, logits_processor=sampler,
        pad_token_id=pad_token_id(tokenizer), eos_token_id=stop_ids,
    )
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if turn_end is not None and turn_end.text:
        texts = [text.split(turn_end.text, 1)[0] for text in texts]
    n = len(prompts)
    return {r: texts[i * n : (i + 1) * n] for i, r in enumerate(ranks)}


@torch.no_grad()
def mcq_predictions(
    model: Any, tokenizer: Any, prompts: list[str], n_choices: list[int], ranks: Sequence[int], device: torch.device,
    chat: bool = False,
) -> dict[int, list[int]]:
    """The answer each rank picks, an index into its prompt's choices: the likeliest valid letter (first token)."""
    letter_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in LETTERS]
    inputs = _prompts_at_ranks(model, tokenizer, prompts, ranks, device, chat=chat)
    logits = model(**inputs).logits[:, -1].float().cpu()
    n = len(prompts)
    picks: dict[int, list[int]] = {}
    for i, r in enumerate(ranks):
        rows = logits[i * n : (i + 1) * n]
        picks[r] = [int(rows[j, letter_ids[: n_choices[j]]].argmax()) for j in range(n)]
    return picks


# --- a run or an export --------------------------------------------------------------------------------


def load_run_or_export(run_dir: Path, merged_rank: int | None, device: torch.device) -> tuple[Any, Any]:
    """The run's model with its adapters, or a merged export as the plain model it is."""
    if merged_rank is None:
        model, tokenizer, _ = load_run_model(run_dir, device=device)
        return model, tokenizer
    dtype = torch_dtype(load_export_info(run_dir)["dtype"])  # the plain float model, read like any other
    model = load_quantized(str(run_dir), dtype=dtype, quant=QuantConfig(type="none"), device=device).eval()
    return model, load_tokenizer(str(run_dir))
