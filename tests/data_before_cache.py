"""qdylora's data path as it was before the token cache (0.1 to issue #25), kept as the reference the
cached path must equal: every record read and tokenized into Python lists, the epoch order built as
lists. Only the test of that equality uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qdylora_cli.chat import parse_messages, resolve_template, tokenize_conversations
from qdylora_cli.config import is_chat
from qdylora_cli.data import (
    MEGABATCH,
    _field,
    _read_text,
    chunk_blocks,
    collate,
    collate_packed,
    format_prompt,
    is_corpus,
    pack_rows,
    read_hf_rows,
    read_records,
    split_indices,
    tokenize_pairs,
)


def _records(cfg, path):
    records = read_records(cfg, path)
    return records[: cfg.max_samples] if cfg.max_samples is not None else records


def _instruction_examples(cfg, tokenizer, path):
    sources, targets = [], []
    for where, r in _records(cfg, path):
        sources.append(format_prompt(cfg.template, _field(where, r, cfg.instruction_field, ""),
                                     _field(where, r, cfg.input_field, "", required=False)))
        targets.append(_field(where, r, cfg.output_field, ""))
    return tokenize_pairs(tokenizer, sources, targets, cfg)


def _corpus_ids(cfg, tokenizer, path):
    if cfg.format == "hf":
        text = "\n\n".join(r[cfg.text_field] for r in read_hf_rows(path, cfg.hf_split))
    else:
        text = _read_text(Path(path).expanduser())
    return tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]


def load_datasets(cfg, tokenizer, seed):
    if is_corpus(cfg):
        ids = _corpus_ids(cfg, tokenizer, cfg.path)
        if cfg.val_path is not None:
            train_ids, val = ids, chunk_blocks(_corpus_ids(cfg, tokenizer, cfg.val_path), cfg.block_size)
        else:
            cut = len(ids) - round(len(ids) * cfg.val_fraction)
            train_ids, val = ids[:cut], chunk_blocks(ids[cut:], cfg.block_size)
        return chunk_blocks(train_ids, cfg.block_size)[: cfg.max_samples], val
    if is_chat(cfg):
        template = resolve_template(cfg, tokenizer)

        def examples_of(path):
            conversations = [(where, parse_messages(where, r, cfg)) for where, r in _records(cfg, path)]
            return tokenize_conversations(tokenizer, template, conversations, cfg)[0]
    else:
        def examples_of(path):
            return _instruction_examples(cfg, tokenizer, path)
    examples = examples_of(cfg.path)
    if cfg.val_path is not None:
        train, val = examples, examples_of(cfg.val_path)
    else:
        train_idx, val_idx = split_indices(len(examples), cfg.val_fraction, seed)
        train, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    return [e for e in train if e is not None], [e for e in val if e is not None]


def batch_order(n, batch_size, seed, epoch, group_by_length=False, lengths=None):
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n).tolist()
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    window = batch_size * MEGABATCH
    batches = []
    for start in range(0, n, window):
        group = sorted(perm[start : start + window], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    return [[batch[i] for i in rng.permutation(len(batch)).tolist()] for batch in batches]


def packed_batch_order(lengths, batch_size, seed, epoch, capacity):
    rng = np.random.default_rng([seed, epoch])
    rows = pack_rows(lengths, rng.permutation(len(lengths)).tolist(), capacity)
    rows = [rows[i] for i in rng.permutation(len(rows)).tolist()]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def batches(examples, batch_size, seed, group_by_length, pad_id, pack_length, count):
    """The first `count` batches the training stream gave, across epochs, one process."""
    lengths = [len(e["input_ids"]) for e in examples]
    out, epoch = [], 0
    while len(out) < count:
        if pack_length is not None:
            order = packed_batch_order(lengths, batch_size, seed, epoch, pack_length)
            out += [collate_packed([[examples[i] for i in row] for row in batch], pad_id) for batch in order]
        else:
            order = batch_order(len(examples), batch_size, seed, epoch, group_by_length, lengths)
            out += [collate([examples[i] for i in batch], pad_id) for batch in order]
        epoch += 1
    return out[:count]
