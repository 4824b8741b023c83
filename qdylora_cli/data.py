"""Training data: read records, conversations or text, tokenize with response-only labels, batch.

`load_datasets` returns lists of tokenized examples `{"input_ids": [...], "labels": [...]}` (chat
data: see chat.py); `batch_order` and `packed_batch_order` give the trainer a deterministic order
per epoch, so "epoch e, batch i" is an exact resume point; `collate` pads one batch and
`collate_packed` lays several examples side by side in each row.
"""

from __future__ import annotations

import json
import logging
import math
from bisect import bisect_left, insort
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from qdylora_cli.chat import ChatTemplate, parse_messages, resolve_template, tokenize_conversations
from qdylora_cli.config import DataConfig, LoopConfig, is_chat
from qdylora_cli.errors import QdyloraError, first_line

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
FEW_EXAMPLES = 16  # fewer training examples than this: a warning (a wrong file, or a test?)
MEGABATCH = 50  # group_by_length sorts within windows of this many batches

# The Stanford Alpaca prompt, with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(template: str, instruction: str, input_: str = "") -> str:
    """The source text of one example; the response follows it directly."""
    if template == "alpaca":
        prompt = ALPACA_PROMPT if input_ else ALPACA_PROMPT_NO_INPUT
        return prompt.format(instruction=instruction, input=input_)
    if template == "plain":
        return f"{instruction}\n{input_}\n" if input_ else f"{instruction}\n"
    raise QdyloraError(f"data.template={template!r}: expected alpaca or plain")


# --- reading ---------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise QdyloraError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise QdyloraError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None


def read_json_records(path: Path) -> list[tuple[str, Any]]:
    """Records of a JSON list or JSONL file, each with where it came from (`file:line` or `file record i`)."""
    text = _read_text(path)
    if path.suffix != ".jsonl" and text.lstrip().startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # several lines of objects: JSONL, read below
        if isinstance(whole, dict):
            raise QdyloraError(f"{path}: one JSON object, not a list of records; put the records in a JSON list "
                               "[{...}, {...}] or one per line (JSONL)")
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise QdyloraError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return [(f"{path} record {i + 1}", item) for i, item in enumerate(items)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise QdyloraError(f"{path}:{lineno}: invalid JSON line ({e.msg})") from None
    return records


def read_hf_rows(path: str, split: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset: a `save_to_disk` directory, a local data file, or a hub id."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_dir() and any((local / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise QdyloraError(f"data.hf_split={split!r}: {path} has splits {', '.join(ds)}")
                ds = ds[split]
        elif local.is_file():
            builder = {".jsonl": "json", ".txt": "text"}.get(local.suffix, local.suffix.lstrip("."))
            ds = datasets.load_dataset(builder, data_files=str(local), split="train")
        else:
            ds = datasets.load_dataset(path, split=split)  # a hub dataset: needs internet the first time
    except QdyloraError:
        raise
    except Exception as e:  # datasets raises many types; all mean "could not read this"
        raise QdyloraError(f"data.path={path!r}: cannot load a Hugging Face dataset ({first_line(e)})") from None
    return list(ds)


def _field(where: str, record: Any, name: str, key: str, required: bool = True) -> str:
    if not isinstance(record, dict):
        raise QdyloraError(f"{where}: expected a JSON object with {name!r}, got {type(record).__name__}")
    value = record.get(name)
    if value is None:
        if required:
            raise QdyloraError(f"{where}: missing field {name!r} (set {key} if it has another name)")
        return ""
    if not isinstance(value, str):
        raise QdyloraError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def read_records(cfg: DataConfig, path: str) -> list[tuple[str, Any]]:
    """Raw records of an instruction dataset (builtin, Hugging Face or JSON), each with where it came from."""
    if path == "builtin:tiny-instructions":
        from qdylora_cli.tiny import tiny_instructions

        return [(f"{path} record {i + 1}", r) for i, r in enumerate(tiny_instructions())]
    if cfg.format == "hf":
        return [(f"{path} row {i + 1}", r) for i, r in enumerate(read_hf_rows(path, cfg.hf_split))]
    return read_json_records(Path(path).expanduser())


# --- tokenizing --------------------------------------------------------------------------------------


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, sources: list[str], targets: list[str], cfg: DataConfig
) -> list[dict[str, list[int]]]:
    """Prompt tokens (with the tokenizer's BOS) then response tokens and EOS; labels -100 on the prompt.

    The prompt keeps its first source_max_len tokens, as QLoRA does; the response keeps its first
    target_max_len - 1 tokens so the EOS always fits.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise QdyloraError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end responses with")
    src_ids = tokenizer(sources, add_special_tokens=True, verbose=False)["input_ids"]
    tgt_ids = tokenizer(targets, add_special_tokens=False, verbose=False)["input_ids"]
    examples = []
    for src, tgt in zip(src_ids, tgt_ids):
        src, tgt = src[: cfg.source_max_len], tgt[: cfg.target_max_len - 1] + [eos]
        labels = src + tgt if cfg.train_on_source else [IGNORE_INDEX] * len(src) + tgt
        examples.append({"input_ids": src + tgt, "labels": labels})
    return examples


def _records(cfg: DataConfig, path: str) -> list[tuple[str, Any]]:
    records = read_records(cfg, path)
    if cfg.max_samples is not None:
        records = records[: cfg.max_samples]
    if not records:
        raise QdyloraError(f"{path}: no records (data.path must hold at least one example)")
    return records


def _instruction_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, path: str) -> list[dict | None]:
    records = _records(cfg, path)
    sources, targets = [], []
    for where, r in records:
        instruction = _field(where, r, cfg.instruction_field, "data.instruction_field")
        input_ = _field(where, r, cfg.input_field, "data.input_field", required=False)
        sources.append(format_prompt(cfg.template, instruction, input_))
        targets.append(_field(where, r, cfg.output_field, "data.output_field"))
    return tokenize_pairs(tokenizer, sources, targets, cfg)


def _chat_examples(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, path: str, template: ChatTemplate
) -> list[dict | None]:
    """One example per record, None for a conversation truncation left nothing to learn from."""
    conversations = [(where, parse_messages(where, r, cfg)) for where, r in _records(cfg, path)]
    examples, stats = tokenize_conversations(tokenizer, template, conversations, cfg)
    if stats.cut or stats.dropped:
        log.info("%s: of %d conversations, %d were cut to data.max_length=%d tokens and %d dropped "
                 "(no assistant token left to learn)", path, stats.records, stats.cut, cfg.max_length, stats.dropped)
    return examples


def _corpus_ids(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, path: str) -> list[int]:
    """The whole corpus as one token stream (a text file, or an hf dataset's text column)."""
    if cfg.format == "hf":
        rows = read_hf_rows(path, cfg.hf_split)
        text = "\n\n".join(_field(f"{path} row {i + 1}", r, cfg.text_field, "data.text_field") for i, r in enumerate(rows))
    else:
        text = _read_text(Path(path).expanduser())
    if not text.strip():
        raise QdyloraError(f"{path}: the text is empty")
    return tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]


def chunk_blocks(ids: list[int], block_size: int) -> list[dict[str, list[int]]]:
    """Consecutive blocks of block_size tokens for causal LM (every token is a label); a shorter tail is kept."""
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    blocks = [b for b in blocks if len(b) >= 2]  # one token predicts nothing
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def is_corpus(cfg: DataConfig) -> bool:
    return cfg.format == "text" or (cfg.format == "hf" and cfg.text_field is not None)


def max_sequence_length(cfg: DataConfig) -> tuple[int, str]:
    """The longest sequence these settings can make, and the keys that set it."""
    if is_corpus(cfg):
        return cfg.block_size, "data.block_size"
    if cfg.packing or is_chat(cfg):
        return cfg.max_length, "data.max_length"
    return cfg.source_max_len + cfg.target_max_len, "data.source_max_len + data.target_max_len"


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic held-out set of round(n * fraction) items (at least one when fraction > 0)."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def load_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[list[dict], list[dict]]:
    """Tokenized (train, validation) examples; validation is `val_path` or a held-out `val_fraction`.

    Text corpora hold out their tail (the last val_fraction of the tokens), so no block is split across both.
    """
    if is_corpus(cfg):
        ids = _corpus_ids(cfg, tokenizer, cfg.path)
        if cfg.val_path is not None:
            train_ids, val = ids, chunk_blocks(_corpus_ids(cfg, tokenizer, cfg.val_path), cfg.block_size)
        else:
            cut = len(ids) - round(len(ids) * cfg.val_fraction)
            train_ids, val = ids[:cut], chunk_blocks(ids[cut:], cfg.block_size)
        train = chunk_blocks(train_ids, cfg.block_size)[: cfg.max_samples]
    else:
        # One entry per record (None: dropped), so the held-out records are the ones `qdylora eval`'s
        # tasks hold out (evaluate.task_examples), whatever truncation dropped.
        examples_of: Callable[[str], list[dict | None]] = partial(_instruction_examples, cfg, tokenizer)
        if is_chat(cfg):  # one template for both files, resolved (and announced) once
            examples_of = partial(_chat_examples, cfg, tokenizer, template=resolve_template(cfg, tokenizer))
        examples = examples_of(cfg.path)
        if cfg.val_path is not None:
            train, val = examples, examples_of(cfg.val_path)
        else:
            train_idx, val_idx = split_indices(len(examples), cfg.val_fraction, seed)
            train, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
        train, val = [e for e in train if e is not None], [e for e in val if e is not None]
    if not train:
        raise QdyloraError(f"{cfg.path}: no training examples left "
                           "(check data.val_fraction, data.block_size and data.max_length)")
    if len(train) < FEW_EXAMPLES:
        log.warning("only %d training example%s in %s: is this the file you meant?", len(train),
                    "s" * (len(train) > 1), cfg.path)
    return train, val


# --- batching ----------------------------------------------------------------------------------------


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS (padding is masked out, so any id works)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise QdyloraError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
    log.info("the tokenizer has no pad token: padding with EOS (id %d)", tokenizer.eos_token_id)
    return tokenizer.eos_token_id


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with pad_id, labels with -100, attention_mask 0."""
    width = max(len(e["input_ids"]) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def eval_batches(examples: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Batches for measuring a loss: sorted by length, so similar lengths share a batch (less padding)."""
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def batch_order(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    lengths: list[int] | None = None,
) -> list[list[int]]:
    """Example indices of every batch of one epoch, a pure function of (seed, epoch).

    With group_by_length, a shuffled window of MEGABATCH batches is sorted by length and cut into
    batches (little padding), and the batches are then shuffled, so long and short ones mix in time.
    The rows of each batch are shuffled too: sorted, the first chunk of a batch (the step's lowest
    rank) would always get its longest rows.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n).tolist()
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if lengths is None or len(lengths) != n:
        raise ValueError("group_by_length needs one length per example")
    window = batch_size * MEGABATCH
    batches = []
    for start in range(0, n, window):
        group = sorted(perm[start : start + window], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    return [[batch[i] for i in rng.permutation(len(batch)).tolist()] for batch in batches]


# --- packing -------------------------------------------------------------------------------------------


def pack_rows(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Examples (taken in `order`) grouped into rows of at most `capacity` tokens, best fit.

    Each example goes into the open row with the least room that still holds it, else opens a row:
    with many short examples rows end up nearly full. A pure function of its arguments.
    """
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row) of the rows with space left, sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}")
        k = bisect_left(room, (n, -1))
        if k == len(room):
            rows.append([i])
            free, row = capacity - n, len(rows) - 1
        else:
            free, row = room.pop(k)
            rows[row].append(i)
            free -= n
        if free > 0:
            insort(room, (free, row))
    return rows


def packed_batch_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, capacity: int
) -> list[list[list[int]]]:
    """Batches of one epoch, each `batch_size` rows of example indices, a pure function of (seed, epoch).

    The examples are shuffled, packed into rows (`pack_rows`) and the rows shuffled again, so which
    examples share a row changes from epoch to epoch, and long and short rows mix in time.
    """
    rng = np.random.default_rng([seed, epoch])
    rows = pack_rows(lengths, rng.permutation(len(lengths)).tolist(), capacity)
    rows = [rows[i] for i in rng.permutation(len(rows)).tolist()]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def collate_packed(rows: list[list[dict[str, list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Several examples per row, without an attention mask: `position_ids` restart at 0 for each example.

    transformers reads a restart of the positions as the start of a new sequence and keeps attention
    inside each one (`find_packed_sequence_indices` in masking_utils; flash-attention's varlen path),
    so examples in a row never see each other, and rotary positions are those of the example alone.
    The first label of each example is -100: the last token of the one before must not learn to
    predict it. The padding at the end of a row is one more sequence of its own, with no labels.
    """
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            input_ids[r, at : at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(e["labels"][1:])
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def padding_fraction(batches: list[list[list[int]]], lengths: list[int]) -> float:
    """Share of the token slots of `batches` (rows of example indices) that hold padding."""
    real = slots = 0
    for batch in batches:
        row_lengths = [sum(lengths[i] for i in row) for row in batch]
        real += sum(row_lengths)
        slots += len(batch) * max(row_lengths)
    return 1 - real / slots if slots else 0.0


@torch.no_grad()
def check_packing(model: torch.nn.Module, examples: list[dict[str, list[int]]], device: torch.device | str) -> None:
    """Stop unless `model` keeps the examples of a packed row apart (see `collate_packed`).

    Two rows hold the same two pieces of the training data in both orders; where attention stays
    inside each piece, a piece gets the same logits in either place. Where the model ignores the
    position restarts (an architecture whose masks do not read `position_ids`, flash-attention with
    more than one row), the second piece sees the first and its logits move far more than rounding
    can. Real tokens matter: rarely seen ones (byte fallbacks, reserved ids) barely move anything.
    """
    stream = [t for e in examples[:64] for t in e["input_ids"]]
    stream = stream * (48 // len(stream) + 1)
    k = len(stream) // 3
    a, b = stream[k : k + 8], stream[2 * k : 2 * k + 8]
    rows = [[{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}],
            [{"input_ids": b, "labels": b}, {"input_ids": a, "labels": a}]]
    batch = collate_packed(rows, pad_id=0)
    was_training = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                   use_cache=False).logits.float()
    model.train(was_training)
    first = torch.cat([logits[0, :8], logits[1, :8]])  # a, then b, each at the start of its row
    second = torch.cat([logits[1, 8:], logits[0, 8:]])  # the same, each after the other piece
    change = ((first - second).abs().mean() / first.abs().mean().clamp(min=1e-6)).item()
    if change > 0.01:
        raise QdyloraError(
            f"data.packing=true: this model ({type(model).__name__}, attention "
            f"{getattr(model.config, '_attn_implementation', '?')}) lets packed examples attend to each other "
            f"(logits change by {change:.1%}); set data.packing=false")


# --- the training stream ----------------------------------------------------------------------------


class BatchStream:
    """An endless, resumable stream of batches: epoch `e` uses the order drawn from seed + e.

    With several processes, process p takes batches p, p + W, p + 2W, ... of each epoch. With
    `pack_length` (data.packing), a batch is `batch_size` rows of up to that many tokens, each row
    holding several examples (`collate_packed`); the rows are packed afresh each epoch, from the
    same (seed, epoch), so the resume point "epoch e, batch i" stays exact.
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int, group_by_length: bool,
                 pad_id: int, process: int = 0, world: int = 1, pack_length: int | None = None):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.group_by_length, self.pad_id, self.process, self.world = group_by_length, pad_id, process, world
        self.pack_length = pack_length
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.epoch, self.index = 0, 0
        self.last_tokens = 0  # tokens of the last batch, padding excluded (for tokens/s)
        self._order = self.epoch_batches(0)
        if len(self._order) < world:
            raise QdyloraError(f"the training set has {len(examples)} examples: too few for {world} processes")

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        """The batches of `epoch`, each a list of rows of example indices (one example per row unpacked)."""
        if self.pack_length is not None:
            return packed_batch_order(self.lengths, self.batch_size, self.seed, epoch, self.pack_length)
        order = batch_order(len(self.examples), self.batch_size, self.seed, epoch, self.group_by_length, self.lengths)
        return [[[i] for i in batch] for batch in order]

    def batches_per_process(self, epoch: int) -> int:
        """Micro-batches each process takes from `epoch` (packed epochs may differ by a row or so)."""
        return len(self.epoch_batches(epoch)) // self.world

    def __next__(self) -> dict[str, torch.Tensor]:
        usable = len(self._order) - len(self._order) % self.world
        if self.index >= usable:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self.epoch_batches(self.epoch)
        rows = [[self.examples[i] for i in row] for row in self._order[self.index + self.process]]
        self.index += self.world
        self.last_tokens = sum(len(e["input_ids"]) for row in rows for e in row)
        if self.pack_length is not None:
            return collate_packed(rows, self.pad_id)
        return collate([row[0] for row in rows], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self.epoch_batches(self.epoch)


def plan_steps(t: LoopConfig, batches: BatchStream, held_out: int) -> int:
    """Optimizer steps of the run: train.max_steps, or enough for train.num_epochs passes over the data.

    Logs the size of one epoch first. With num_epochs, the last step may take its last micro-batches
    from the following epoch: every example of the requested epochs is seen.
    """
    examples, grad_accum = batches.examples, t.grad_accum
    first = batches.epoch_batches(0)
    per_process = len(first) // batches.world
    loss_tokens = sum(len(e["labels"]) - 1 - e["labels"][1:].count(IGNORE_INDEX) for e in examples)
    unit = f"rows of up to {batches.pack_length} tokens (packed)" if batches.pack_length else "examples"
    log.info("data: %s training examples, %s tokens (%s with loss), %s held out; one epoch is %d batches of %d %s, "
             "%.1f%% padding: %.1f steps per epoch (train.grad_accum=%d%s)", f"{len(examples):,}",
             f"{sum(batches.lengths):,}", f"{loss_tokens:,}", f"{held_out:,}", len(first), batches.batch_size, unit, 100 * padding_fraction(first, batches.lengths),
             per_process / grad_accum, grad_accum, f", {batches.world} processes" if batches.world > 1 else "")
    if t.num_epochs is None:
        log.info("train.max_steps=%d: %.2f epochs", t.max_steps, t.max_steps * grad_accum / per_process)
        return t.max_steps
    micro = per_process + sum(batches.batches_per_process(e) for e in range(1, t.num_epochs))
    steps = math.ceil(micro / grad_accum)
    log.info("train.num_epochs=%d: %d optimizer steps", t.num_epochs, steps)
    return steps
