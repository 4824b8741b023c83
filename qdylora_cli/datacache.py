"""Tokenized data on disk: tokenized once, kept in Arrow files, memory-mapped by every reader.

A data source (a file, a Hugging Face dataset, the built-in records) tokenized with some settings
is one *cache entry*: a directory `<root>/<stem>-<kind>-<key>` holding

    shard-00000.arrow ...   the examples, one row per record: `input_ids` (list<int32>), `loss_mask`
                            (list<uint8>, 1 where the token carries loss: labels are the id there and
                            -100 elsewhere) and `loss_tokens` (int32, labels after the first that carry
                            loss); a text corpus is one `input_ids` column of int32, one row per token
    meta.json               the key's inputs, what tokenizing found (records, cut, dropped) and the files

The files are Arrow IPC streams, the format 🤗 datasets caches in (`datasets.Dataset.from_file`
opens one); qdylora reads them with pyarrow alone (`import datasets` costs seconds a launch).
`<root>` is `data.cache_dir`, else `$HF_DATASETS_CACHE/qdylora` (datasets' own cache,
~/.cache/huggingface/datasets by default); a default root that cannot be written falls back to a
folder in the temporary directory, with a warning. The key hashes everything the tokens depend on:
the source (resolved path, size, mtime and a hash of the content; a dataset's own fingerprint),
the tokenizer (its whole serialized definition), every data setting that changes tokens, and
CACHE_VERSION. Any change is a new entry, so an edited source, another tokenizer or other settings
are tokenized afresh and a stale entry is never read.

An entry is built in `.tmp-<name>-<pid>` and renamed into place when complete, under an OS lock
(`flock`) on `<name>.lock`, so processes wanting the same entry build it once and a crash or a full
disk never leaves a partial entry where a reader would find it.

`Examples` reads the rows by index from the mapped files: token ids and masks stay on disk until a
batch needs them; lengths and loss counts come from the files' offsets as numpy arrays.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from qdylora_cli.errors import DiskFullError, QdyloraError, first_line
from qdylora_cli.rundir import disk_full, fsync_dir

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
CACHE_VERSION = 1  # part of every key: bump it when what a cached file holds, or how it is made, changes
META = "meta.json"
CONTENT_HASH_LIMIT = 4 << 30  # sources up to this size are hashed whole; larger ones by their first and last 64 MiB
SHOW_AFTER_S = 2.0  # a tokenization that ends sooner shows no progress at all
LOG_EVERY_S = 15.0  # without a terminal, a progress line this often


# --- where and under which name ---------------------------------------------------------------------


def default_root() -> Path:
    """`$HF_DATASETS_CACHE/qdylora`, with datasets' own default for HF_DATASETS_CACHE (read without importing it)."""
    base = os.environ.get("HF_DATASETS_CACHE")
    if not base:
        hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        base = os.path.join(hf_home, "datasets")
    return Path(base).expanduser() / "qdylora"


def _writable_root(root: Path) -> str | None:
    """None if entries can be built under `root` (created if need be), else why not."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    if not os.access(root, os.W_OK | os.X_OK):
        return "not writable"
    return None


def fallback_root() -> Path:
    """Where entries go when the default root cannot be written: the temporary directory, one folder per user."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"qdylora-data-cache-{uid}"


def _hasher() -> Any:
    """xxh3-128 (a dependency of datasets: several GB/s, so hashing a source whole is cheap), else blake2b."""
    try:
        import xxhash

        return xxhash.xxh3_128()
    except ImportError:
        import hashlib

        return hashlib.blake2b(digest_size=16)


def _digest(data: bytes) -> str:
    h = _hasher()
    h.update(data)
    return h.hexdigest()


def file_fingerprint(path: Path) -> dict[str, Any]:
    """A local file's resolved path, size, mtime and a hash of its content (whole up to CONTENT_HASH_LIMIT)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    h = _hasher()
    with open(path, "rb") as f:
        if st.st_size <= CONTENT_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                h.update(chunk)
            how = "whole"
        else:  # a very large file: its ends (with size and mtime, an edit is still seen)
            h.update(f.read(64 << 20))
            f.seek(-(64 << 20), os.SEEK_END)
            h.update(f.read())
            how = "first and last 64 MiB"
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "content": h.hexdigest(), "hashed": how}


def stat_of(path: str | Path) -> tuple[int, int]:
    st = Path(path).expanduser().stat()
    return st.st_size, st.st_mtime_ns


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides a tokenizer's ids: for a fast tokenizer its whole serialized
    definition (less the truncation and padding a call may leave set, which qdylora never uses), its
    special and added tokens; for a slow one its vocabulary and settings."""
    parts: dict[str, Any] = {"class": type(tokenizer).__name__,
                             "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                             "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
                             "added": {str(i): repr(t) for i, t in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())}}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        parts["backend"] = spec
    else:
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
        parts["init"] = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k != "name_or_path"}
        model = getattr(tokenizer, "sp_model", None)
        if model is not None and hasattr(model, "serialized_model_proto"):
            parts["sentencepiece"] = _digest(model.serialized_model_proto())
    return _digest(json.dumps(parts, sort_keys=True, default=str).encode())


def digest_of(value: Any) -> str:
    """A hash of a JSON-able value (keys sorted, so dict order does not matter)."""
    return _digest(json.dumps(value, sort_keys=True, default=str).encode())


def entry_name(source: str, kind: str, material: dict[str, Any]) -> tuple[str, str]:
    """(directory name, full key) of the entry for `material`: readable stem and kind, then the key."""
    key = digest_of({"version": CACHE_VERSION, **material})
    stem = re.sub(r"[^\w.-]+", "_", Path(source.removeprefix("builtin:").rstrip("/")).stem)[:40] or "data"
    return f"{stem}-{kind}-{key[:20]}", key


# --- one entry: found, or built under a lock --------------------------------------------------------


@dataclass
class Entry:
    """A cache entry as the processes of a run share it (picklable: the main process sends it to the others)."""

    path: str
    meta: dict[str, Any]
    built: bool  # tokenized by this launch (else reused)


def _valid(final: Path, key: str) -> dict[str, Any] | None:
    """The meta of a complete entry for `key` at `final`, else None (absent, another key, or damaged)."""
    try:
        meta = json.loads((final / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("version") != CACHE_VERSION:
        return None
    for name, size in meta.get("files", {}).items():
        try:
            if (final / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return meta


@contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """An exclusive flock on `path` (released when the process ends, however it ends)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is tokenizing %s (lock %s)", what, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def find_or_build(root: Path, name: str, key: str, material: dict[str, Any], what: str,
                  build: Callable[[Path], dict[str, Any]]) -> Entry:
    """The entry `name` under `root`: reused if complete, else built by `build(tmp_dir)` (which writes the
    files and returns what to record in meta.json) and renamed into place. A full disk is one line
    (DiskFullError), the partial files removed."""
    final = root / name
    meta = _valid(final, key)
    if meta is not None:
        return Entry(str(final), meta, built=False)
    with _locked(root / f"{name}.lock", what):
        meta = _valid(final, key)
        if meta is not None:  # another process built it while this one waited
            return Entry(str(final), meta, built=False)
        tmp = root / f".tmp-{name}-{os.getpid()}"
        try:
            if final.exists():  # damaged (a file missing or cut short): built again
                log.warning("the data cache %s is incomplete: tokenizing again", final)
                shutil.rmtree(final)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            info = build(tmp)
            files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
            meta = {"version": CACHE_VERSION, "key": key, **material, **info, "files": files,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}
            with open(tmp / META, "w") as f:
                json.dump(meta, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(final)
            fsync_dir(root)
        except BaseException as e:
            full = isinstance(e, Exception) and not isinstance(e, QdyloraError) and disk_full(e, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if full or isinstance(e, DiskFullError):
                raise DiskFullError(f"disk full: cannot write the tokenized data of {what} to {root} (No space left "
                                    "on device); nothing was kept. Free some space there or set data.cache_dir to "
                                    "another disk") from None
            if isinstance(e, OSError):
                raise QdyloraError(f"cannot write the tokenized data of {what} to {root}: {e.strerror or e} "
                                   f"({e.filename or tmp}); set data.cache_dir to another folder") from None
            raise
    return Entry(str(final), meta, built=True)


def prepare_entry(cache_dir: str | None, name: str, key: str, material: dict[str, Any], what: str,
                  build: Callable[[Path], dict[str, Any]]) -> Entry:
    """`find_or_build` under `data.cache_dir` (`cache_dir`), else the default root. A complete entry is read
    wherever it is, even from a read-only folder; building needs a writable one: for data.cache_dir that
    is one line, for the default root a fallback to the temporary directory, said so."""
    root = Path(cache_dir).expanduser() if cache_dir else default_root()
    meta = _valid(root / name, key)
    if meta is not None:
        return Entry(str(root / name), meta, built=False)
    problem = _writable_root(root)
    if problem is not None:
        if cache_dir:
            raise QdyloraError(f"data.cache_dir={cache_dir!r}: cannot write the tokenized data there ({problem})")
        fallback = fallback_root()
        log.warning("cannot write the data cache in %s (%s): using %s instead (set data.cache_dir to choose)",
                    root, problem, fallback)
        root = fallback
        if (problem := _writable_root(root)) is not None:
            raise QdyloraError(f"cannot write the tokenized data to {root} either ({problem}); set data.cache_dir")
    return find_or_build(root, name, key, material, what, build)


# --- Arrow files ------------------------------------------------------------------------------------


def _pa() -> Any:
    import pyarrow as pa

    return pa


def _arrow(values: np.ndarray, kind: str) -> Any:
    """A numpy array as an Arrow array without a copy (`pa.array` would import pandas: half a second)."""
    pa = _pa()
    values = np.ascontiguousarray(values, dtype=kind)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _record_schema() -> Any:
    pa = _pa()
    return pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.uint8())),
                      ("loss_tokens", pa.int32())])


class ShardWriter:
    """Writes tokenized examples (dicts of `input_ids`/`labels` lists, or None for a dropped record: an
    empty row, so rows stay aligned with records) to one Arrow stream file, a record batch per call."""

    def __init__(self, path: Path) -> None:
        pa = _pa()
        self.path = Path(path)
        self._file = open(self.path, "wb")  # a Python file: a full disk raises OSError(ENOSPC) with its errno
        self._writer = pa.ipc.new_stream(self._file, _record_schema())
        self.rows = self.tokens = 0

    def write(self, examples: Sequence[dict[str, list[int]] | None]) -> None:
        pa = _pa()
        lengths = np.fromiter((len(e["input_ids"]) if e is not None else 0 for e in examples), np.int64, len(examples))
        offsets = np.zeros(len(examples) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        if total >= 1 << 31:
            raise QdyloraError(f"{self.path}: more than 2^31 tokens in one batch of records; this cannot be stored")
        kept = [e for e in examples if e is not None]
        # chain in C: no Python step per token (a generator over tokens took a third of tokenizing's time)
        ids = np.fromiter(chain.from_iterable(e["input_ids"] for e in kept), np.int64, total)
        labels = np.fromiter(chain.from_iterable(e["labels"] for e in kept), np.int64, total)
        mask = labels != IGNORE_INDEX
        # Labels are the token id or -100, never anything else: the mask alone rebuilds them.
        if not np.array_equal(labels[mask], ids[mask]):
            raise AssertionError("a label is neither its token id nor -100; the cache cannot store it")
        cum = np.zeros(total + 1, np.int64)
        np.cumsum(mask, out=cum[1:])
        loss = np.where(lengths > 0, cum[offsets[1:]] - cum[np.minimum(offsets[:-1] + 1, offsets[1:])], 0)
        off32 = _arrow(offsets, "int32")
        batch = pa.record_batch([pa.ListArray.from_arrays(off32, _arrow(ids, "int32")),
                                 pa.ListArray.from_arrays(off32, _arrow(mask, "uint8")),
                                 _arrow(loss, "int32")], schema=_record_schema())
        self._writer.write_batch(batch)
        self.rows += len(examples)
        self.tokens += total

    def close(self) -> None:
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()


def write_token_array(path: Path, ids: np.ndarray) -> None:
    """A text corpus's tokens as one int32 column in one record batch (one mapped array when read)."""
    pa = _pa()
    schema = pa.schema([("input_ids", pa.int32())])
    with open(path, "wb") as f:
        with pa.ipc.new_stream(f, schema) as writer:
            writer.write_batch(pa.record_batch([_arrow(ids, "int32")], schema=schema))
        f.flush()
        os.fsync(f.fileno())


def _mapped_table(path: Path) -> Any:
    """An Arrow stream file as a table whose buffers are the file's mapped pages (nothing read yet)."""
    pa = _pa()
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise QdyloraError(f"the data cache file {path} is unreadable ({first_line(e)}); delete its folder to "
                           "tokenize again") from None


def _view(array: Any, dtype: Any, source: Path, extra: int = 0) -> np.ndarray:
    """The values (or, with extra=1, a list array's offsets) of an Arrow array of the file `source` as a
    numpy view of its buffer: the mapped pages themselves. (`to_numpy` would import pandas: half a second.)"""
    if array.null_count:
        raise QdyloraError(f"the data cache file {source} holds missing values; delete its folder to tokenize again")
    dtype = np.dtype(dtype)
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array) + extra, offset=array.offset * dtype.itemsize)


def read_token_array(path: Path) -> np.ndarray:
    chunks = _mapped_table(path).column("input_ids").chunks
    if not chunks:
        return np.zeros(0, np.int32)
    if len(chunks) > 1:  # written as one batch; a copy only if something else wrote it
        return np.concatenate([_view(c, np.int32, path) for c in chunks])
    return _view(chunks[0], np.int32, path)


# --- reading examples by index -------------------------------------------------------------------------


@dataclass
class TokenSpans:
    """Examples as spans of one token array: example j is ids[starts[j]:ends[j]]."""

    ids: np.ndarray  # int32, usually a view of mapped file pages
    starts: np.ndarray  # int64
    ends: np.ndarray  # int64
    loss_mask: np.ndarray | None = None  # uint8 aligned with ids; None: every token is a label
    loss: np.ndarray | None = None  # per example: labels after the first that carry loss; None: length - 1


def record_spans(shard: Path) -> list[TokenSpans]:
    """One TokenSpans per record batch of a shard file (the batches are the file's own mapped buffers)."""
    table = _mapped_table(shard)
    ids_col, mask_col, loss_col = (table.column(c).chunks for c in ("input_ids", "loss_mask", "loss_tokens"))
    spans = []
    for ids, mask, loss in zip(ids_col, mask_col, loss_col):
        offsets = _view(ids, np.int32, shard, extra=1).astype(np.int64)  # into the values: valid for a slice too
        if not np.array_equal(_view(mask, np.int32, shard, extra=1), _view(ids, np.int32, shard, extra=1)):
            raise QdyloraError(f"the data cache file {shard} is inconsistent; delete its folder to tokenize again")
        values, mask_values = ids.values, mask.values
        spans.append(TokenSpans(_view(values, np.int32, shard)[: len(values)], offsets[:-1], offsets[1:],
                                _view(mask_values, np.uint8, shard), _view(loss, np.int32, shard).astype(np.int64)))
    return spans


class Examples(Sequence):
    """Tokenized examples, read by index from token arrays on disk: `examples[i]` is
    `{"input_ids": [...], "labels": [...]}`; a slice or an array of indices is a view of the same files.

    Never holds a list of all examples: `lengths` and `loss_tokens()` come from the spans' offsets,
    and rows are read (from the mapped pages) only when asked for.
    """

    def __init__(self, parts: list[TokenSpans], fingerprint: str | None = None, source: str = "") -> None:
        self._parts = parts
        self._first = np.cumsum([0, *(len(p.starts) for p in parts)])
        self._lengths = (np.concatenate([p.ends - p.starts for p in parts]) if parts else np.zeros(0, np.int64))
        self._loss = (np.concatenate([p.loss if p.loss is not None else np.maximum(p.ends - p.starts - 1, 0)
                                      for p in parts]) if parts else np.zeros(0, np.int64))
        self.rows = np.arange(len(self._lengths))
        self.fingerprint, self.source = fingerprint, source

    def _view(self, rows: np.ndarray) -> Examples:
        view = object.__new__(Examples)
        view.__dict__.update(self.__dict__)
        view.rows = rows
        return view

    def select(self, rows: Sequence[int] | np.ndarray) -> Examples:
        """The examples at positions `rows` of this view, in that order."""
        return self._view(self.rows[np.asarray(rows, dtype=np.int64)])

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths[self.rows]

    def loss_tokens(self) -> int:
        """Labels that carry loss, over every example (the first token of each is never predicted)."""
        return int(self._loss[self.rows].sum())

    def __len__(self) -> int:
        return len(self.rows)

    def _example(self, row: int) -> dict[str, list[int]]:
        p = int(np.searchsorted(self._first, row, side="right")) - 1
        part, local = self._parts[p], row - int(self._first[p])
        start, end = int(part.starts[local]), int(part.ends[local])
        ids = part.ids[start:end]
        labels = ids if part.loss_mask is None else np.where(part.loss_mask[start:end] != 0, ids, IGNORE_INDEX)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self._view(self.rows[index])
        if isinstance(index, (list, tuple, np.ndarray)):
            return self.select(index)
        return self._example(int(self.rows[index]))

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for row in self.rows.tolist():
            yield self._example(row)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)) or len(other) != len(self):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking and compared by content

    def __repr__(self) -> str:
        return f"Examples({len(self):,} from {self.source or 'memory'})"


# --- tokenizing in several processes ---------------------------------------------------------------------


class TokenizeProgress:
    """Progress of one tokenization, in the style of training's: a bar on a terminal, else a plain line every
    LOG_EVERY_S; nothing at all for one that ends within SHOW_AFTER_S."""

    def __init__(self, name: str, total: int, unit: str) -> None:
        self.name, self.total, self.unit = name, max(total, 1), unit  # unit: what `done` counts (bytes, records)
        self.started = time.perf_counter()
        self._bar: Any = None
        self._logged = self.started
        self.records = self.done = 0

    def update(self, records: int, done: int) -> None:
        self.records, self.done = records, done
        now = time.perf_counter()
        elapsed = now - self.started
        if elapsed < SHOW_AFTER_S:
            return
        rate = records / elapsed
        info = f"{records:,} records, {rate:,.0f} records/s"
        if sys.stderr.isatty():
            if self._bar is None:
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

                from qdylora_cli.logs import console

                self._bar = Progress(TextColumn(f"tokenizing {self.name}"), BarColumn(),
                                     TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[info]}"),
                                     TimeRemainingColumn(), console=console, transient=True)
                self._bar.start()
                self._task = self._bar.add_task("tokenize", total=self.total, info="")
            self._bar.update(self._task, completed=done, info=info)
        elif now - self._logged >= LOG_EVERY_S:
            self._logged = now
            eta = elapsed / max(done, 1) * (self.total - done)
            log.info("tokenizing %s: %d%% (%s, ETA %d:%02d)", self.name, 100 * done // self.total, info,
                     eta // 60, eta % 60)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def default_num_proc() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _send_result(conn: Any, work: Callable, context: Any, index: int, shard: Any, out: Path, counters: Any) -> None:
    """A worker process: tokenize one shard, send ("ok", info) or ("error", exception or its traceback)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already

    def report(records: int, done: int) -> None:
        counters[2 * index], counters[2 * index + 1] = records, done

    try:
        result: Any = ("ok", work(context, shard, out, report))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which decides
        result = ("error", e)
    try:
        conn.send(result)
    except Exception:  # an exception that does not pickle: its traceback as text
        conn.send(("error", RuntimeError("".join(traceback.format_exception(result[1])))))
    conn.close()


def run_shards(work: Callable[[Any, Any, Path, Callable[[int, int], None]], dict[str, Any]], context: Any,
               shards: list[Any], out_dir: Path, num_proc: int, progress: TokenizeProgress) -> list[dict[str, Any]]:
    """`work(context, shard, out_file, report)` for every shard, each writing `out_dir/shard-NNNNN.arrow`: in
    this process when num_proc is 1 or there is one shard, else one process per shard (callers make at
    most num_proc). Returns their results in shard order. A shard's error is raised once every shard
    before it has finished, so the error named is the first in the source's order."""
    outs = [out_dir / f"shard-{i:05d}.arrow" for i in range(len(shards))]
    if num_proc <= 1 or len(shards) == 1:
        results, base_records, base_done = [], 0, 0
        for shard, out in zip(shards, outs):
            def report(records: int, done: int, base: tuple[int, int] = (base_records, base_done)) -> None:
                progress.update(base[0] + records, base[1] + done)

            result = work(context, shard, out, report)
            base_records, base_done = base_records + result["records"], base_done + result["done"]
            results.append(result)
        return results
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    counters = ctx.Array("q", 2 * len(shards), lock=False)
    procs, conns = [], []
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read in the child at fork: no "forked after parallelism" warning
    try:
        for i, (shard, out) in enumerate(zip(shards, outs)):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_send_result, args=(child, work, context, i, shard, out, counters), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    try:
        while len(results) + len(errors) < len(shards):
            waiting = [conns[i] for i in range(len(shards)) if i not in results and i not in errors]
            for conn in multiprocessing.connection.wait(waiting + [procs[conns.index(c)].sentinel for c in waiting],
                                                        timeout=0.25):
                i = conns.index(conn) if conn in conns else next(j for j, p in enumerate(procs) if p.sentinel == conn)
                if i in results or i in errors:
                    continue
                try:
                    status, value = conns[i].recv()
                except (EOFError, OSError):  # died without a word: killed (out of memory?)
                    procs[i].join()
                    status, value = "error", QdyloraError(
                        f"a tokenizing process died on part {i + 1} of {len(shards)} of the source (exit code "
                        f"{procs[i].exitcode}; out of memory?); set data.num_proc lower")
                (results if status == "ok" else errors)[i] = value
            progress.update(sum(counters[0::2]), sum(counters[1::2]))
            if errors and all(j in results for j in range(min(errors))):
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    if errors:
        raise errors[min(errors)]
    return [results[i] for i in range(len(shards))]
