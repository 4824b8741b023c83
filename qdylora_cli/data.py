"""Training data: read records, conversations or text, tokenize with response-only labels, batch.

`prepare_datasets` tokenizes each source once and keeps the result on disk (datacache.py: Arrow files
keyed by the source, the tokenizer and the settings), or finds it there; `open_datasets` maps those
files as `Examples`, read by index (`load_datasets` does both). `batch_order` and
`packed_batch_order` give the trainer a deterministic order per epoch, so "epoch e, batch i" is an
exact resume point; `collate` pads one batch and `collate_packed` lays several examples side by side
in each row.

Records are tokenized in batches as they are read, in `data.num_proc` processes for a JSONL file or a
dataset (each a contiguous part, so a bad record is still named by `file:line`); the examples are the
same, token for token, as tokenizing every record at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from qdylora_cli.chat import ChatTemplate, parse_messages, resolve_template, tokenize_conversations
from qdylora_cli.config import DataConfig, LoopConfig, is_chat
from qdylora_cli.datacache import (  # IGNORE_INDEX lives there now; `from qdylora_cli.data import` it still works
    IGNORE_INDEX,
    Entry,
    Examples,
    ShardWriter,
    TokenizeProgress,
    TokenSpans,
    default_num_proc,
    digest_of,
    entry_name,
    file_fingerprint,
    prepare_entry,
    read_token_array,
    record_spans,
    run_shards,
    stat_of,
    tokenizer_fingerprint,
    write_token_array,
)
from qdylora_cli.errors import QdyloraError, first_line

log = logging.getLogger(__name__)

FEW_EXAMPLES = 16  # fewer training examples than this: a warning (a wrong file, or a test?)
MEGABATCH = 50  # group_by_length sorts within windows of this many batches
TOKENIZE_BATCH = 1000  # records tokenized (and written) together
MIN_SHARD_BYTES = 4 << 20  # a JSONL file is split among processes in parts of at least this size
MIN_SHARD_ROWS = 5000  # a list or a dataset: parts of at least this many records

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
    """Records of a JSON list or JSONL file, each with where it came from (`file:line` or `file record i`).

    All in memory: for prompts and task records. Training data is read in parts (`_JsonSource`).
    """
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


def read_hf_dataset(path: str, split: str) -> Any:
    """A Hugging Face dataset (memory-mapped): a `save_to_disk` directory, a local data file, or a hub id."""
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
    return ds


def read_hf_rows(path: str, split: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset (see `read_hf_dataset`), all in memory."""
    return list(read_hf_dataset(path, split))


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


# --- sources read in parts (one per tokenizing process) ---------------------------------------------------


@dataclass
class _Lines:
    """Part of a JSONL file: bytes [start, end), beginning at line number `line`."""

    start: int
    end: int
    line: int


@dataclass
class _Rows:
    """Records [start, end) of a list or a dataset."""

    start: int
    end: int


@dataclass
class _Job:
    """Everything a tokenizing process needs; forked processes inherit it (spawned ones get it pickled)."""

    cfg: DataConfig
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate | None  # chat data: the template every conversation is rendered with
    shown: str  # the path as the user wrote it, for messages
    kind: str  # jsonl, list or hf
    file: str | None = None  # jsonl: the file
    records: list[tuple[str, Any]] | None = None  # list: (where, record) pairs
    dataset: Any = None  # hf: a datasets.Dataset
    limit: int | None = None  # data.max_samples: the records read (then the part is the whole source)


def _first_lines(path: Path) -> tuple[str, list[str]]:
    """The file's first non-blank character and (up to) its first two non-blank lines, read lazily."""
    lines: list[str] = []
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace")
            if line.strip():
                lines.append(line)
                if len(lines) == 2:
                    break
    return (lines[0].lstrip()[:1] if lines else ""), lines


def _json_source(path: Path, shown: str) -> str:
    """`list` (a JSON list, parsed whole as before) or `jsonl` (read line by line), with the errors of
    `read_json_records` for a file that is one JSON object."""
    if not path.is_file():
        raise QdyloraError(f"{shown}: no such file")
    first, lines = _first_lines(path)
    if path.suffix != ".jsonl" and first == "[":
        return "list"
    if path.suffix != ".jsonl" and first == "{":
        # One object is refused; several lines of objects are JSONL. A first line that is a whole object
        # followed by more lines is JSONL without parsing the rest; otherwise the whole text decides.
        try:
            one = json.loads(lines[0])
        except json.JSONDecodeError:
            one = None
        if one is None or len(lines) < 2:
            read_json_records(path)  # raises for one JSON object (and for bad UTF-8, as before)
    return "jsonl"


def _line_parts(path: Path, parts: int) -> list[_Lines]:
    """`parts` byte ranges of about equal size, each starting at a line, with their first line numbers."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(size * k // parts)
            f.readline()
            if bounds[-1] < f.tell() < size:
                bounds.append(f.tell())
        bounds.append(size)
        lines, counted = [1], 0
        f.seek(0)
        for end in bounds[1:-1]:  # newlines before each boundary: one sequential pass
            while counted < end:
                chunk = f.read(min(1 << 24, end - counted))
                lines[-1] += chunk.count(b"\n")
                counted += len(chunk)
            lines.append(lines[-1])
    return [_Lines(a, b, n) for a, b, n in zip(bounds[:-1], bounds[1:], lines)]


def _iter_jsonl(job: _Job, part: _Lines) -> Iterator[tuple[str, Any, int]]:
    """(where, record, bytes read of the part) for each non-blank line, with read_json_records' errors."""
    with open(job.file, "rb") as f:
        f.seek(part.start)
        pos, lineno = part.start, part.line
        while pos < part.end:
            raw = f.readline()
            if not raw:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise QdyloraError(f"{job.shown}:{lineno}: not valid UTF-8 (byte {pos + e.start}); "
                                   "save the file as UTF-8") from None
            pos += len(raw)
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QdyloraError(f"{job.shown}:{lineno}: invalid JSON line ({e.msg})") from None
                yield f"{job.shown}:{lineno}", record, pos - part.start
            lineno += 1


def _iter_rows(job: _Job, part: _Rows) -> Iterator[tuple[str, Any, int]]:
    if job.kind == "list":
        for i in range(part.start, part.end):
            where, record = job.records[i]
            yield where, record, i + 1 - part.start
        return
    for first in range(part.start, part.end, TOKENIZE_BATCH):
        columns = job.dataset[first : min(first + TOKENIZE_BATCH, part.end)]
        names = list(columns)
        for i, values in enumerate(zip(*columns.values())):
            yield f"{job.shown} row {first + i + 1}", dict(zip(names, values)), first + i + 1 - part.start


def _records_of(job: _Job, part: _Lines | _Rows) -> Iterator[tuple[str, Any, int]]:
    records = _iter_jsonl(job, part) if isinstance(part, _Lines) else _iter_rows(job, part)
    return islice(records, job.limit) if job.limit is not None else records


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


def _tokenize_records(job: _Job, batch: list[tuple[str, Any]]) -> tuple[list[dict | None], int, int]:
    """The examples of a batch of records (None: a conversation truncation left nothing to learn from),
    and how many were cut and dropped."""
    cfg = job.cfg
    if job.template is not None:
        conversations = [(where, parse_messages(where, r, cfg)) for where, r in batch]
        examples, stats = tokenize_conversations(job.tokenizer, job.template, conversations, cfg)
        return examples, stats.cut, stats.dropped
    sources, targets = [], []
    for where, r in batch:
        instruction = _field(where, r, cfg.instruction_field, "data.instruction_field")
        input_ = _field(where, r, cfg.input_field, "data.input_field", required=False)
        sources.append(format_prompt(cfg.template, instruction, input_))
        targets.append(_field(where, r, cfg.output_field, "data.output_field"))
    return tokenize_pairs(job.tokenizer, sources, targets, cfg), 0, 0


def _tokenize_part(job: _Job, part: _Lines | _Rows, out: Path, report: Any) -> dict[str, Any]:
    """Tokenize one part of a source into one shard file, a batch of records at a time (a worker's job)."""
    writer = ShardWriter(out)
    records = cut = dropped = 0
    batch: list[tuple[str, Any]] = []

    def flush(done: int) -> None:
        nonlocal records, cut, dropped
        examples, c, d = _tokenize_records(job, batch)
        writer.write(examples)
        records, cut, dropped = records + len(batch), cut + c, dropped + d
        batch.clear()
        report(records, done)

    try:
        done = 0
        try:
            for where, record, done in _records_of(job, part):
                batch.append((where, record))
                if len(batch) == TOKENIZE_BATCH:
                    flush(done)
        except QdyloraError:
            # A line that does not read (JSON, UTF-8): the records before it are checked first, so the
            # error named is the first in the file whichever step finds it.
            if batch:
                flush(done)
            raise
        if batch:
            flush(done)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"records": records, "cut": cut, "dropped": dropped, "tokens": writer.tokens,
            "done": part.end - part.start}


def _corpus_ids(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, path: str) -> list[int]:
    """The whole corpus as one token stream (a text file, or an hf dataset's text column).

    One tokenizer call over the whole text, as always: pieces tokenized apart could differ at the seams.
    """
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


def _block_spans(ids: np.ndarray, start: int, end: int, block_size: int) -> TokenSpans:
    """`chunk_blocks` of ids[start:end] as spans of the (mapped) token array: no copy of any block."""
    starts = np.arange(start, end, block_size, dtype=np.int64)
    ends = np.minimum(starts + block_size, end)
    keep = ends - starts >= 2  # one token predicts nothing
    return TokenSpans(ids, starts[keep], ends[keep])


def is_corpus(cfg: DataConfig) -> bool:
    return cfg.format == "text" or (cfg.format == "hf" and cfg.text_field is not None)


def max_sequence_length(cfg: DataConfig) -> tuple[int, str]:
    """The longest sequence these settings can make, and the keys that set it."""
    if is_corpus(cfg):
        return cfg.block_size, "data.block_size"
    if cfg.packing or is_chat(cfg):
        return cfg.max_length, "data.max_length"
    return cfg.source_max_len + cfg.target_max_len, "data.source_max_len + data.target_max_len"


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if fraction <= 0 or n < 2:
        return np.arange(n), np.zeros(0, np.int64)
    k = min(n - 1, max(1, round(n * fraction)))
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:k]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic held-out set of round(n * fraction) items (at least one when fraction > 0)."""
    train, held = _split(n, fraction, seed)
    return train.tolist(), held.tolist()


# --- the cache: tokenized once, then reused ---------------------------------------------------------------

# Data keys that never change the tokens of a source (what is held out, batching, where the cache is).
_NOT_TOKENS = {"path", "val_path", "val_fraction", "group_by_length", "packing", "num_proc", "cache_dir"}
_CHAT_ONLY = {"messages_field", "role_field", "content_field", "system_prompt", "chat_template", "max_length"}
_INSTRUCTION_ONLY = {"template", "instruction_field", "input_field", "output_field", "source_max_len",
                     "target_max_len"}


def _token_settings(cfg: DataConfig, template: ChatTemplate | None) -> dict[str, Any]:
    """The data settings the tokens of a source depend on (blocks are cut after caching: not block_size)."""
    if is_corpus(cfg):
        return {"format": cfg.format, "hf_split": cfg.hf_split, "text_field": cfg.text_field}
    drop = _NOT_TOKENS | {"block_size", "text_field"} | (_INSTRUCTION_ONLY if template is not None else _CHAT_ONLY)
    settings = {k: v for k, v in asdict(cfg).items() if k not in drop}
    if template is not None:
        settings["chat_template"] = template.text  # the text rendered with, whichever way it was named
    return settings


def _source_fingerprint(cfg: DataConfig, path: str) -> tuple[dict[str, Any], Any]:
    """What identifies a source's content, and the dataset already opened to find out (hf only)."""
    if path == "builtin:tiny-instructions":
        from qdylora_cli.tiny import tiny_instructions

        return {"builtin": path, "content": digest_of(tiny_instructions())}, None
    if cfg.format != "hf":
        local = Path(path).expanduser()
        if not local.is_file():
            raise QdyloraError(f"{path}: no such file")
        return file_fingerprint(local), None
    ds = read_hf_dataset(path, cfg.hf_split)
    fingerprint: dict[str, Any] = {"dataset": getattr(ds, "_fingerprint", None), "split": cfg.hf_split,
                                   "rows": len(ds), "path": path}
    local = Path(path).expanduser()
    if local.is_file():
        fingerprint["file"] = file_fingerprint(local)
    for i, f in enumerate(getattr(ds, "cache_files", []) or []):  # the Arrow files behind it, as they are now
        try:
            fingerprint[f"arrow{i}"] = stat_of(f["filename"])
        except (OSError, KeyError, TypeError):
            pass
    return fingerprint, ds


def _content_id(material: dict[str, Any]) -> str:
    """The key without where the source lies or when it was written: what a checkpoint records of its data."""
    source = {k: v for k, v in material["source"].items() if k not in ("path", "mtime_ns") and not k.startswith("arrow")}
    if isinstance(source.get("file"), dict):
        source["file"] = {k: v for k, v in source["file"].items() if k not in ("path", "mtime_ns")}
    return digest_of({**material, "source": source})[:20]


@dataclass
class Prepared:
    """The cache entries of a run's data (picklable: the main process prepares, the others map them)."""

    train: Entry
    val: Entry | None


def _prepare_source(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, path: str,
                    template: ChatTemplate | None, tokenizer_id: str) -> Entry:
    corpus = is_corpus(cfg)
    kind = "text" if corpus else "chat" if template is not None else "instructions"
    source, dataset = _source_fingerprint(cfg, path)
    material = {"kind": kind, "source": source, "tokenizer": tokenizer_id, "settings": _token_settings(cfg, template)}
    material["data_id"] = _content_id(material)
    name, key = entry_name(path, kind, material)

    def build(tmp: Path) -> dict[str, Any]:
        started = time.perf_counter()
        local = Path(path).expanduser()
        before = stat_of(local) if local.is_file() else None
        if corpus:
            if local.is_file() and local.stat().st_size > 16 << 20:
                log.info("tokenizing %s (%.0f MB) in one call: its blocks are cut from the whole token stream",
                         path, local.stat().st_size / 1e6)
            ids = np.asarray(_corpus_ids(cfg, tokenizer, path), dtype=np.int32)
            write_token_array(tmp / "tokens.arrow", ids)
            stats = {"records": 1, "tokens": len(ids), "processes": 1}
        else:
            stats = _tokenize_source(cfg, tokenizer, path, template, dataset, tmp)
        if before is not None and stat_of(local) != before:
            raise QdyloraError(f"{path} changed while it was being tokenized; run again once it is written")
        stats["seconds"] = round(time.perf_counter() - started, 2)
        return {"stats": stats, "shards": sorted(f.name for f in tmp.glob("*.arrow")),
                "tokenizer_name": tokenizer.name_or_path}

    return prepare_entry(cfg.cache_dir, name, key, material, path, build)


def _tokenize_source(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, path: str,
                     template: ChatTemplate | None, dataset: Any, out_dir: Path) -> dict[str, Any]:
    """Records -> shard files, in up to data.num_proc processes (one part of the source each)."""
    num_proc = cfg.num_proc or default_num_proc()
    job = _Job(cfg, tokenizer, template, path, "hf", dataset=dataset, limit=cfg.max_samples)
    parts: list[_Lines | _Rows]
    if path == "builtin:tiny-instructions" or (cfg.format != "hf" and _json_source(Path(path).expanduser(), path) == "list"):
        job.kind, job.records = "list", read_records(cfg, path)
        total, unit = len(job.records), "records"
    elif cfg.format != "hf":
        job.kind, job.file = "jsonl", str(Path(path).expanduser())
        total, unit = Path(job.file).stat().st_size, "bytes"
    else:
        total, unit = len(dataset), "records"
    if job.kind == "jsonl":
        count = 1 if cfg.max_samples is not None else max(1, min(num_proc, total // MIN_SHARD_BYTES))
        parts = _line_parts(Path(job.file), count)
    else:
        if cfg.max_samples is not None:
            total = min(total, cfg.max_samples)
        count = max(1, min(num_proc, total // MIN_SHARD_ROWS))
        parts = [_Rows(total * k // count, total * (k + 1) // count) for k in range(count)]
    progress = TokenizeProgress(Path(path).name or path, total, unit)
    try:
        results = run_shards(_tokenize_part, job, parts, out_dir, num_proc, progress)
    finally:
        progress.close()
    stats = {k: sum(r[k] for r in results) for k in ("records", "cut", "dropped", "tokens")}
    if stats["records"] == 0:
        key = "data.path" if path == cfg.path else "data.val_path"
        raise QdyloraError(f"{path}: no records ({key} must hold at least one example)")
    return {**stats, "processes": len(parts)}


def prepare_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Prepared:
    """Tokenize the run's data sources (data.path, data.val_path) into the cache, or find them there, and
    say which in one line each. Under several processes only the main one calls this (train.setup)."""
    template = resolve_template(cfg, tokenizer) if is_chat(cfg) and not is_corpus(cfg) else None
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    entries = [_prepare_source(cfg, tokenizer, path, template, tokenizer_id)
               for path in (cfg.path, cfg.val_path) if path is not None]
    for path, entry in zip((cfg.path, cfg.val_path), entries):
        _describe_entry(path, entry)
    return Prepared(entries[0], entries[1] if len(entries) > 1 else None)


def _describe_entry(path: str, entry: Entry) -> None:
    stats = entry.meta["stats"]
    text = entry.meta["kind"] == "text"
    what = f"{stats['tokens']:,} tokens" if text else f"{stats['records']:,} records, {stats['tokens']:,} tokens"
    if entry.built:
        processes = f", {stats['processes']} processes" if stats["processes"] > 1 else ""
        rate = "" if text else f", {stats['records'] / max(stats['seconds'], 1e-9):,.0f} records/s"
        log.info("data: tokenized %s (%s) in %.1fs%s%s; cached in %s", path, what, stats["seconds"],
                 processes, rate, entry.path)
    else:
        log.info("data: reused the tokenized %s (%s, tokenized %s) from %s", path, what, entry.meta["created"],
                 entry.path)
    if stats.get("cut") or stats.get("dropped"):
        log.info("%s: of %d conversations, %d were cut to data.max_length=%d tokens and %d dropped "
                 "(no assistant token left to learn)", path, stats["records"], stats["cut"],
                 entry.meta["settings"]["max_length"], stats["dropped"])


def _open_entry(entry: Entry) -> Examples | np.ndarray:
    """A record source's examples (one per record, a dropped one empty), or a corpus's token array."""
    folder = Path(entry.path)
    if entry.meta["kind"] == "text":
        return read_token_array(folder / entry.meta["shards"][0])
    parts = [spans for shard in entry.meta["shards"] for spans in record_spans(folder / shard)]
    return Examples(parts, fingerprint=entry.meta["data_id"], source=str(folder))


def open_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, prepared: Prepared,
                  seed: int) -> tuple[Examples, Examples]:
    """(train, validation) examples of `prepared`, mapped from its files; validation is `val_path` or a
    held-out `val_fraction` (text corpora: their tail, so no block is split across both).

    A process on another machine than the one that prepared (no shared disk) tokenizes its own copy.
    """
    if not all(Path(e.path).is_dir() for e in (prepared.train, prepared.val) if e is not None):
        prepared = prepare_datasets(cfg, tokenizer)
    opened = _open_entry(prepared.train)
    fingerprint = prepared.train.meta["data_id"] + (f"+{prepared.val.meta['data_id']}" if prepared.val else "")
    source = prepared.train.path
    if isinstance(opened, np.ndarray):
        ids, bs = opened, cfg.block_size
        if prepared.val is not None:
            val_ids = _open_entry(prepared.val)
            train_spans, val_spans = _block_spans(ids, 0, len(ids), bs), _block_spans(val_ids, 0, len(val_ids), bs)
        else:
            cut = len(ids) - round(len(ids) * cfg.val_fraction)
            train_spans, val_spans = _block_spans(ids, 0, cut, bs), _block_spans(ids, cut, len(ids), bs)
        train = Examples([train_spans], fingerprint, source)[: cfg.max_samples]
        val = Examples([val_spans], fingerprint, prepared.val.path if prepared.val else source)
    else:
        # One row per record (empty: dropped), so the held-out records are the ones `qdylora eval`'s tasks
        # hold out (evaluate.task_examples), whatever truncation dropped.
        if prepared.val is not None:
            train, val = opened, _open_entry(prepared.val)
        else:
            train_rows, val_rows = _split(len(opened), cfg.val_fraction, seed)
            train, val = opened.select(train_rows), opened.select(val_rows)
        train, val = (e.select(np.flatnonzero(e.lengths > 0)) for e in (train, val))
        train.fingerprint = val.fingerprint = fingerprint
    if not len(train):
        raise QdyloraError(f"{cfg.path}: no training examples left "
                           "(check data.val_fraction, data.block_size and data.max_length)")
    if len(train) < FEW_EXAMPLES:
        log.warning("only %d training example%s in %s: is this the file you meant?", len(train),
                    "s" * (len(train) > 1), cfg.path)
    return train, val


def load_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[Examples, Examples]:
    """Tokenized (train, validation) examples: `prepare_datasets` (tokenized once, cached), then `open_datasets`."""
    return open_datasets(cfg, tokenizer, prepare_datasets(cfg, tokenizer), seed)


# --- batching ----------------------------------------------------------------------------------------


def _lengths(examples: Sequence[dict[str, list[int]]]) -> np.ndarray:
    if isinstance(examples, Examples):
        return examples.lengths
    return np.fromiter((len(e["input_ids"]) for e in examples), np.int64, len(examples))


def _loss_tokens(examples: Sequence[dict[str, list[int]]]) -> int:
    if isinstance(examples, Examples):
        return examples.loss_tokens()
    return sum(len(e["labels"]) - 1 - e["labels"][1:].count(IGNORE_INDEX) for e in examples)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its EOS (padding is masked out, so any id works)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise QdyloraError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
    log.info("the tokenizer has no pad token: padding with EOS (id %d)", tokenizer.eos_token_id)
    return tokenizer.eos_token_id


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids with pad_id, labels with -100, attention_mask 0."""
    batch = list(batch)
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


def eval_batches(examples: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int,
                 limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Batches for measuring a loss: sorted by length, so similar lengths share a batch (less padding).
    `limit`: only the first that many batches are read and built."""
    order = np.argsort(_lengths(examples), kind="stable")  # stable: the order sorted(key=len) gave
    starts = range(0, len(order), batch_size)
    return [collate([examples[int(i)] for i in order[s : s + batch_size]], pad_id) for s in starts[:limit]]


class EpochOrder:
    """The batches of one epoch as arrays: example indices in order, cut into rows (several examples each
    when packed) at `row_bounds` and the rows into batches at `batch_bounds` (both end with the total)."""

    def __init__(self, examples: np.ndarray, row_bounds: np.ndarray, batch_bounds: np.ndarray) -> None:
        self.examples, self.row_bounds, self.batch_bounds = examples, row_bounds, batch_bounds

    def __len__(self) -> int:
        return len(self.batch_bounds) - 1

    def rows(self, batch: int) -> list[np.ndarray]:
        """The rows of batch `batch`, each an array of example indices."""
        r0, r1 = int(self.batch_bounds[batch]), int(self.batch_bounds[batch + 1])
        return [self.examples[self.row_bounds[r] : self.row_bounds[r + 1]] for r in range(r0, r1)]

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[b] for b in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return [row.tolist() for row in self.rows(index)]


def _unpacked_order(n: int, batch_size: int, seed: int, epoch: int, group_by_length: bool,
                    lengths: np.ndarray | None) -> EpochOrder:
    """`batch_order` as arrays: the same draws from the same generator, vectorised around them."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    bounds = np.append(np.arange(0, n, batch_size), n)
    if group_by_length:
        if lengths is None or len(lengths) != n:
            raise ValueError("group_by_length needs one length per example")
        lengths = np.asarray(lengths)
        window = batch_size * MEGABATCH
        for start in range(0, n, window):  # longest first, ties in shuffled order (a stable sort)
            group = perm[start : start + window]
            perm[start : start + window] = group[np.argsort(-lengths[group], kind="stable")]
        # Windows are whole batches, so batch b is perm[b*bs:(b+1)*bs]; the batches are then shuffled ...
        order = rng.permutation(len(bounds) - 1)
        sizes = np.diff(bounds)[order]
        new_bounds = np.append(0, np.cumsum(sizes))
        offsets = np.arange(n) - np.repeat(new_bounds[:-1], sizes)
        perm = perm[np.repeat(bounds[:-1][order], sizes) + offsets]
        bounds = new_bounds
        # ... and so are the rows of each (a one-row batch draws nothing from the generator).
        if batch_size > 1:
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                if b - a > 1:
                    perm[a:b] = perm[a:b][rng.permutation(b - a)]
    return EpochOrder(perm, np.arange(n + 1), bounds)


def batch_order(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    lengths: Sequence[int] | np.ndarray | None = None,
) -> list[list[int]]:
    """Example indices of every batch of one epoch, a pure function of (seed, epoch).

    With group_by_length, a shuffled window of MEGABATCH batches is sorted by length and cut into
    batches (little padding), and the batches are then shuffled, so long and short ones mix in time.
    The rows of each batch are shuffled too: sorted, the first chunk of a batch (the step's lowest
    rank) would always get its longest rows.
    """
    order = _unpacked_order(n, batch_size, seed, epoch, group_by_length,
                            None if lengths is None else np.asarray(lengths))
    b = order.batch_bounds.tolist()
    return [order.examples[b[i] : b[i + 1]].tolist() for i in range(len(b) - 1)]


# --- packing -------------------------------------------------------------------------------------------


def pack_rows(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
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


def _packed_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, capacity: int) -> EpochOrder:
    rng = np.random.default_rng([seed, epoch])
    rows = pack_rows(np.asarray(lengths).tolist(), rng.permutation(len(lengths)).tolist(), capacity)
    rows = [rows[i] for i in rng.permutation(len(rows)).tolist()]
    sizes = np.fromiter(map(len, rows), np.int64, len(rows))
    examples = np.fromiter(chain.from_iterable(rows), np.int64, int(sizes.sum()))
    return EpochOrder(examples, np.append(0, np.cumsum(sizes)), np.append(np.arange(0, len(rows), batch_size), len(rows)))


def packed_batch_order(
    lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int, epoch: int, capacity: int
) -> list[list[list[int]]]:
    """Batches of one epoch, each `batch_size` rows of example indices, a pure function of (seed, epoch).

    The examples are shuffled, packed into rows (`pack_rows`) and the rows shuffled again, so which
    examples share a row changes from epoch to epoch, and long and short rows mix in time.
    """
    return _packed_order(np.asarray(lengths), batch_size, seed, epoch, capacity)[:]


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


def padding_fraction(batches: EpochOrder | list[list[list[int]]], lengths: Sequence[int] | np.ndarray) -> float:
    """Share of the token slots of `batches` (rows of example indices) that hold padding."""
    if isinstance(batches, EpochOrder):
        if not len(batches):
            return 0.0
        lengths = np.asarray(lengths)
        row_lengths = np.add.reduceat(lengths[batches.examples], batches.row_bounds[:-1])
        widest = np.maximum.reduceat(row_lengths, batches.batch_bounds[:-1])
        real, slots = int(row_lengths.sum()), int((np.diff(batches.batch_bounds) * widest).sum())
        return 1 - real / slots if slots else 0.0
    real = slots = 0
    for batch in batches:
        row_lengths = [sum(lengths[i] for i in row) for row in batch]
        real += sum(row_lengths)
        slots += len(batch) * max(row_lengths)
    return 1 - real / slots if slots else 0.0


@torch.no_grad()
def check_packing(model: torch.nn.Module, examples: Sequence[dict[str, list[int]]], device: torch.device | str) -> None:
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
    same (seed, epoch), so the resume point "epoch e, batch i" stays exact. `examples` are read by
    index (an `Examples` view of the cached files, or a list); the order is held as arrays.
    """

    def __init__(self, examples: Sequence[dict[str, list[int]]], batch_size: int, seed: int, group_by_length: bool,
                 pad_id: int, process: int = 0, world: int = 1, pack_length: int | None = None):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.group_by_length, self.pad_id, self.process, self.world = group_by_length, pad_id, process, world
        self.pack_length = pack_length
        self.lengths = _lengths(examples)
        self.fingerprint = getattr(examples, "fingerprint", None)  # what the data is: recorded in checkpoints
        self.epoch, self.index = 0, 0
        self.last_tokens = 0  # tokens of the last batch, padding excluded (for tokens/s)
        self._order = self.epoch_batches(0)
        if len(self._order) < world:
            raise QdyloraError(f"the training set has {len(examples)} examples: too few for {world} processes")

    def epoch_batches(self, epoch: int) -> EpochOrder:
        """The batches of `epoch`: `len()` of them; `[b]` is batch b as rows of example indices."""
        if self.pack_length is not None:
            return _packed_order(self.lengths, self.batch_size, self.seed, epoch, self.pack_length)
        return _unpacked_order(len(self.lengths), self.batch_size, self.seed, epoch, self.group_by_length,
                               self.lengths)

    def batches_per_process(self, epoch: int) -> int:
        """Micro-batches each process takes from `epoch` (packed epochs may differ by a row or so)."""
        return len(self.epoch_batches(epoch)) // self.world

    def __next__(self) -> dict[str, torch.Tensor]:
        usable = len(self._order) - len(self._order) % self.world
        if self.index >= usable:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self.epoch_batches(self.epoch)
        rows = [[self.examples[i] for i in row.tolist()] for row in self._order.rows(self.index + self.process)]
        self.index += self.world
        self.last_tokens = sum(len(e["input_ids"]) for row in rows for e in row)
        if self.pack_length is not None:
            return collate_packed(rows, self.pad_id)
        return collate([row[0] for row in rows], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "index": self.index}
        if self.fingerprint is not None:
            state["data"] = self.fingerprint
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("data")
        if saved is not None and self.fingerprint is not None and saved != self.fingerprint:
            log.warning("train.resume: the training data differ from those the checkpoint was trained on (data %s, "
                        "now %s: the source, the tokenizer or a data setting changed); the batches from epoch %d, "
                        "batch %d on are not the ones the run would have seen", saved, self.fingerprint,
                        state["epoch"], state["index"])
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
    unit = f"rows of up to {batches.pack_length} tokens (packed)" if batches.pack_length else "examples"
    log.info("data: %s training examples, %s tokens (%s with loss), %s held out; one epoch is %d batches of %d %s, "
             "%.1f%% padding: %.1f steps per epoch (train.grad_accum=%d%s)", f"{len(examples):,}",
             f"{int(batches.lengths.sum()):,}", f"{_loss_tokens(examples):,}", f"{held_out:,}", len(first),
             batches.batch_size, unit, 100 * padding_fraction(first, batches.lengths),
             per_process / grad_accum, grad_accum, f", {batches.world} processes" if batches.world > 1 else "")
    if t.num_epochs is None:
        log.info("train.max_steps=%d: %.2f epochs", t.max_steps, t.max_steps * grad_accum / per_process)
        return t.max_steps
    micro = per_process + sum(batches.batches_per_process(e) for e in range(1, t.num_epochs))
    steps = math.ceil(micro / grad_accum)
    log.info("train.num_epochs=%d: %d optimizer steps", t.num_epochs, steps)
    return steps
