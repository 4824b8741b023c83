"""Training data: read records or text, build prompts, tokenize with response-only labels, batch.

`load_datasets` returns lists of tokenized examples `{"input_ids": [...], "labels": [...]}`;
`batch_order` gives the trainer a deterministic order per epoch, so "epoch e, batch i" is an
exact resume point; `collate` pads one batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from qdylora_cli.config import DataConfig
from qdylora_cli.errors import QdyloraError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
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
        raise QdyloraError(f"data.path={path!r}: cannot load a Hugging Face dataset ({str(e).splitlines()[0]})") from None
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


def _instruction_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, path: str) -> list[dict]:
    records = read_records(cfg, path)
    if cfg.max_samples is not None:
        records = records[: cfg.max_samples]
    if not records:
        raise QdyloraError(f"{path}: no records (data.path must hold at least one example)")
    sources, targets = [], []
    for where, r in records:
        instruction = _field(where, r, cfg.instruction_field, "data.instruction_field")
        input_ = _field(where, r, cfg.input_field, "data.input_field", required=False)
        sources.append(format_prompt(cfg.template, instruction, input_))
        targets.append(_field(where, r, cfg.output_field, "data.output_field"))
    return tokenize_pairs(tokenizer, sources, targets, cfg)


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


def _is_corpus(cfg: DataConfig) -> bool:
    return cfg.format == "text" or (cfg.format == "hf" and cfg.text_field is not None)


def max_sequence_length(cfg: DataConfig) -> tuple[int, str]:
    """The longest sequence these settings can make, and the keys that set it."""
    if _is_corpus(cfg):
        return cfg.block_size, "data.block_size"
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
    if _is_corpus(cfg):
        ids = _corpus_ids(cfg, tokenizer, cfg.path)
        if cfg.val_path is not None:
            train_ids, val = ids, chunk_blocks(_corpus_ids(cfg, tokenizer, cfg.val_path), cfg.block_size)
        else:
            cut = len(ids) - round(len(ids) * cfg.val_fraction)
            train_ids, val = ids[:cut], chunk_blocks(ids[cut:], cfg.block_size)
        train = chunk_blocks(train_ids, cfg.block_size)[: cfg.max_samples]
    else:
        examples = _instruction_examples(cfg, tokenizer, cfg.path)
        if cfg.val_path is not None:
            train, val = examples, _instruction_examples(cfg, tokenizer, cfg.val_path)
        else:
            train_idx, val_idx = split_indices(len(examples), cfg.val_fraction, seed)
            train, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    if not train:
        raise QdyloraError(f"{cfg.path}: no training examples left (check data.val_fraction and data.block_size)")
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
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


class BatchStream:
    """An endless, resumable stream of training batches: epoch `e` uses the order drawn from (seed, e).

    With several processes, process p takes batches p, p + W, p + 2W, ... of each epoch. The
    position (`state_dict`: epoch and index) is an exact resume point.
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int, group_by_length: bool,
                 pad_id: int, process: int = 0, world: int = 1):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.group_by_length, self.pad_id, self.process, self.world = group_by_length, pad_id, process, world
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.epoch, self.index = 0, 0
        self._order = self._draw()
        if len(self._order) < world:
            raise QdyloraError(f"the training set has {len(examples)} examples: too few for {world} processes")

    def _draw(self) -> list[list[int]]:
        return batch_order(len(self.examples), self.batch_size, self.seed, self.epoch, self.group_by_length, self.lengths)

    def __next__(self) -> dict[str, torch.Tensor]:
        usable = len(self._order) - len(self._order) % self.world
        if self.index >= usable:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._draw()
        ids = self._order[self.index + self.process]
        self.index += self.world
        return collate([self.examples[i] for i in ids], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._draw()
