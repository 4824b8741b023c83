"""The token cache (datacache.py): the same examples and batches as before it, keys that never reuse stale
tokens, errors named by file:line in any process, and every writer surviving a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import data_before_cache as before
import pytest
import torch
from runners import REPO, qdylora
from transformers import AutoTokenizer

from qdylora_cli import data as data_module
from qdylora_cli import datacache
from qdylora_cli.config import DataConfig
from qdylora_cli.data import BatchStream, Examples, load_datasets
from qdylora_cli.errors import DiskFullError, QdyloraError
from qdylora_cli.rundir import latest_good_checkpoint
from qdylora_cli.tiny import byte_tokenizer, tiny_instructions

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _cfg(path, cache, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(cache), **kw)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(n, seed=0):
    """Instruction records of varied lengths, some with an input."""
    rng = random.Random(seed)
    out = []
    for r in tiny_instructions(n, seed=seed):
        out.append({**r, "output": r["output"] + " " + "x" * rng.randint(0, 60)})
    return out


def _entries(cache):
    return sorted(p.name for p in (Path(cache)).iterdir() if p.is_dir())


def _same_batches(new_examples, old_examples, cfg, count, pad=0):
    pack = cfg.max_length if cfg.packing else None
    stream = BatchStream(new_examples, 4, 42, cfg.group_by_length, pad, pack_length=pack)
    expected = before.batches(old_examples, 4, 42, cfg.group_by_length, pad, pack, count)
    for i, want in enumerate(expected):
        got = next(stream)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f"batch {i}"
    assert stream.epoch >= 1, "the comparison should cross into the second epoch"


# --- the same examples, split and batches as before the cache ---------------------------------------------


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_instruction_data_equals_the_path_before_the_cache(tmp_path, tok, monkeypatch, packing):
    """JSONL tokenized in 2 processes (parts of ~20 KB) against every record tokenized at once, as before."""
    monkeypatch.setattr(data_module, "MIN_SHARD_BYTES", 20_000)
    path = _jsonl(tmp_path / "d.jsonl", _records(600))
    cfg = _cfg(path, tmp_path / "cache", template="plain", val_fraction=0.1, num_proc=2, packing=packing,
               max_length=512, source_max_len=60, target_max_len=40)
    train, val = load_datasets(cfg, tok, seed=7)
    old_train, old_val = before.load_datasets(cfg, tok, seed=7)
    assert json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())["stats"]["processes"] == 2
    assert isinstance(train, Examples) and train == old_train and val == old_val and len(val) == 60
    assert train.loss_tokens() == sum(sum(t != -100 for t in e["labels"][1:]) for e in old_train)
    _same_batches(train, old_train, cfg, count=200)


def test_alpaca_list_and_stories260k_equal_the_path_before(tmp_path, stories260k, alpaca_1k):
    stories = AutoTokenizer.from_pretrained(stories260k)
    cfg = _cfg(alpaca_1k, tmp_path / "cache", max_samples=300, val_fraction=0.05)
    train, val = load_datasets(cfg, stories, seed=42)
    old_train, old_val = before.load_datasets(cfg, stories, seed=42)
    assert train == old_train and val == old_val
    _same_batches(train, old_train, cfg, count=80, pad=stories.eos_token_id)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_chat_data_with_truncation_equals_the_path_before(tmp_path, tok, packing):
    records = []
    for i, r in enumerate(tiny_instructions(240)):
        messages = [{"role": "user", "content": f"{r['instruction']} {r['input']}" + " y" * (i % 50)},
                    {"role": "assistant", "content": r["output"]}]
        records.append({"messages": ([{"role": "system", "content": "Be brief."}] if i % 3 else []) + messages})
    path = _jsonl(tmp_path / "chat.jsonl", records)
    cfg = _cfg(path, tmp_path / "cache", format="chat", val_fraction=0.1, max_length=120, packing=packing)
    train, val = load_datasets(cfg, tok, seed=3)
    old_train, old_val = before.load_datasets(cfg, tok, seed=3)
    meta = json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())
    assert meta["stats"]["dropped"] > 0 and meta["stats"]["cut"] > 0  # both kinds of truncation are covered
    assert train == old_train and val == old_val
    _same_batches(train, old_train, cfg, count=70)


def test_text_corpus_blocks_equal_the_path_before(tmp_path, stories260k, shakespeare):
    stories = AutoTokenizer.from_pretrained(stories260k)
    path = tmp_path / "t.txt"
    path.write_text(shakespeare.read_text()[:60_000])
    cfg = _cfg(path, tmp_path / "cache", format="text", block_size=128, val_fraction=0.05, group_by_length=False)
    train, val = load_datasets(cfg, stories, seed=0)
    old_train, old_val = before.load_datasets(cfg, stories, seed=0)
    assert train == old_train and val == old_val
    _same_batches(train, old_train, cfg, count=70)
    # Blocks are cut from the cached tokens: another block size or max_samples reuses them.
    smaller, _ = load_datasets(replace(cfg, block_size=64, max_samples=5), stories, seed=0)
    assert smaller == before.load_datasets(replace(cfg, block_size=64, max_samples=5), stories, 0)[0]
    assert len(_entries(tmp_path / "cache")) == 1


def test_a_checkpoint_records_its_data_and_a_resume_onto_other_data_says_so(tmp_path, tok, caplog):
    path = _jsonl(tmp_path / "d.jsonl", _records(40))
    train, _ = load_datasets(_cfg(path, tmp_path / "cache"), tok, seed=0)
    stream = BatchStream(train, 4, 42, True, 0)
    next(stream)
    state = stream.state_dict()
    assert state == {"epoch": 0, "index": 1, "data": train.fingerprint}
    other, _ = load_datasets(_cfg(path, tmp_path / "cache", source_max_len=10), tok, seed=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qdylora_cli.data"):
        BatchStream(train, 4, 42, True, 0).load_state_dict({"epoch": 0, "index": 1})  # a checkpoint from before #25
        BatchStream(train, 4, 42, True, 0).load_state_dict(state)
        assert not caplog.records
        BatchStream(other, 4, 42, True, 0).load_state_dict(state)
    (record,) = caplog.records
    assert record.getMessage().startswith("train.resume: the training data differ from those the checkpoint was trained on")


# --- keys: reused when the tokens would be the same, never otherwise ---------------------------------------


def test_reused_until_the_source_the_tokenizer_or_a_token_setting_changes(tmp_path, tok, stories260k, caplog):
    path = _jsonl(tmp_path / "d.jsonl", _records(50))
    cache = tmp_path / "cache"
    cfg = _cfg(path, cache, val_fraction=0.1)
    with caplog.at_level(logging.INFO, logger="qdylora_cli.data"):
        first, _ = load_datasets(cfg, tok, seed=0)
        assert f"data: tokenized {path}" in caplog.text
        caplog.clear()
        again, _ = load_datasets(replace(cfg, val_fraction=0.3, group_by_length=False, num_proc=1), tok, seed=5)
        assert f"data: reused the tokenized {path}" in caplog.text and "data: tokenized" not in caplog.text
    assert len(_entries(cache)) == 1 and len(again) == 35

    # An edit that keeps the size and the mtime: the content hash sees it.
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace('"Reverse the word."', '"Reverse this word"', 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    edited, _ = load_datasets(replace(cfg, val_fraction=0.0), tok, seed=0)
    assert len(_entries(cache)) == 2
    assert any("Reverse this word" in tok.decode(e["input_ids"]) for e in edited)

    stories = AutoTokenizer.from_pretrained(stories260k)
    other_tokenizer, _ = load_datasets(cfg, stories, seed=0)
    assert other_tokenizer[0]["input_ids"] != first[0]["input_ids"] and len(_entries(cache)) == 3
    load_datasets(replace(cfg, source_max_len=8), tok, seed=0)
    load_datasets(replace(cfg, template="plain"), tok, seed=0)
    assert len(_entries(cache)) == 5
    assert not list(cache.glob(".tmp-*"))


def test_a_damaged_entry_is_tokenized_again_and_a_file_cache_dir_is_refused(tmp_path, tok, caplog):
    path = _jsonl(tmp_path / "d.jsonl", _records(40))
    cfg = _cfg(path, tmp_path / "cache", val_fraction=0.0)
    good = list(load_datasets(cfg, tok, seed=0)[0])  # read now: a file cut short under a live mapping is SIGBUS
    (shard,) = (tmp_path / "cache").glob("*/shard-*.arrow")
    shard.write_bytes(shard.read_bytes()[:100])  # cut short in place: the size in meta.json no longer matches
    with caplog.at_level(logging.WARNING, logger="qdylora_cli.datacache"):
        assert load_datasets(cfg, tok, seed=0)[0] == good
    assert "is incomplete: tokenizing again" in caplog.text
    (tmp_path / "file").write_text("")
    with pytest.raises(QdyloraError, match=r"^data.cache_dir='.*/file/sub': cannot write the tokenized data there"):
        load_datasets(replace(cfg, cache_dir=str(tmp_path / "file" / "sub")), tok, seed=0)


def test_an_unwritable_default_cache_falls_back_to_a_temporary_one_and_says_so(tmp_path, tok, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "file" / "datasets"))  # cannot be created
    monkeypatch.setattr(datacache, "fallback_root", lambda: tmp_path / "fallback")
    path = _jsonl(tmp_path / "d.jsonl", _records(20))
    with caplog.at_level(logging.WARNING, logger="qdylora_cli.datacache"):
        train, _ = load_datasets(DataConfig(path=str(path), val_fraction=0.0), tok, seed=0)
    assert "cannot write the data cache in" in caplog.text and f"using {tmp_path / 'fallback'} instead" in caplog.text
    assert len(train) == 20 and len(_entries(tmp_path / "fallback")) == 1


def test_a_bad_record_deep_in_a_big_file_is_named_by_file_and_line(tmp_path, tok, monkeypatch):
    """Two processes, bad records in both parts: the first in the file is named, and nothing is kept."""
    monkeypatch.setattr(data_module, "MIN_SHARD_BYTES", 50_000)
    records = [{"instruction": f"task {i}", "output": str(i)} for i in range(6000)]
    records[5200] = {"instruction": "no output"}
    path = _jsonl(tmp_path / "big.jsonl", records)
    with path.open("a") as f:
        f.write('{"instruction": "x", "output": \n')  # line 6001: invalid JSON, in the last part
    cfg = _cfg(path, tmp_path / "cache", num_proc=2)
    with pytest.raises(QdyloraError, match=rf"^{path}:5201: missing field 'output'"):
        load_datasets(cfg, tok, seed=0)
    records[5200] = {"instruction": "ok", "output": "ok"}
    _jsonl(path, records)
    with path.open("a") as f:
        f.write('{"instruction": "x", "output": \n')
    with pytest.raises(QdyloraError, match=rf"^{path}:6001: invalid JSON line"):
        load_datasets(cfg, tok, seed=0)
    assert _entries(tmp_path / "cache") == [] and not list((tmp_path / "cache").glob(".tmp-*"))


def test_tokenizing_shows_progress_in_records_per_second_with_an_eta(tmp_path, tok, monkeypatch, caplog):
    """Without a terminal, a line every LOG_EVERY_S (here: every update), from every tokenizing process."""
    monkeypatch.setattr(datacache, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(datacache, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(data_module, "MIN_SHARD_BYTES", 20_000)
    monkeypatch.setattr(data_module, "TOKENIZE_BATCH", 100)
    path = _jsonl(tmp_path / "d.jsonl", _records(1500))
    with caplog.at_level(logging.INFO, logger="qdylora_cli.datacache"):
        load_datasets(_cfg(path, tmp_path / "cache", num_proc=2), tok, seed=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizing d.jsonl: ")]
    assert lines and all(re.fullmatch(r"tokenizing d.jsonl: \d+% \([\d,]+ records, [\d,]+ records/s, ETA \d+:\d\d\)", m)
                         for m in lines), lines


# --- a full disk at every writer ---------------------------------------------------------------------------


def test_a_full_disk_while_caching_is_one_line_and_leaves_nothing(tmp_path, tok, monkeypatch):
    path = _jsonl(tmp_path / "d.jsonl", _records(30))
    cfg = _cfg(path, tmp_path / "cache", val_fraction=0.0)
    real = datacache.ShardWriter.write

    def full(self, examples):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datacache.ShardWriter, "write", full)
    with pytest.raises(DiskFullError, match=rf"^disk full: cannot write the tokenized data of {path} to "
                                           rf"{tmp_path / 'cache'} \(No space left on device\); nothing was kept"):
        load_datasets(cfg, tok, seed=0)
    assert _entries(tmp_path / "cache") == [] and not list((tmp_path / "cache").glob(".tmp-*"))
    monkeypatch.setattr(datacache.ShardWriter, "write", real)
    assert len(load_datasets(cfg, tok, seed=0)[0]) == 30


TINY = ["+recipe=tiny", "train.batch_size=4", "train.eval_batches=1", "train.log_every=1", "data.max_samples=64"]


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    assert qdylora("train", *TINY, "train.max_steps=2", "train.save_every=1", "train.eval_every=0", f"run_dir={run_dir}") == 0
    return run_dir


def test_a_full_disk_at_the_base_model_is_one_line(tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as SafetensorError (the traceback of the issue)."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    run_dir = tmp_path / "run"
    assert qdylora("train", *TINY, "train.max_steps=1", f"run_dir={run_dir}") == 1
    assert _last_error(capsys) == (f"error: disk full: cannot write {run_dir / 'base_model'} (No space left on device); "
                                   "nothing was replaced")
    assert not (run_dir / "base_model").exists() and not list(run_dir.glob(".tmp-*"))
    assert qdylora("eval", f"run_dir={run_dir}") == 2  # no half-written run for a later command to read
    assert "is not a qdylora run directory" in _last_error(capsys)


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    from qdylora_cli import train

    real, calls = train.save_file, [0]

    def full_at_second(tensors, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(train, "save_file", full_at_second)
    run_dir = tmp_path / "run"
    assert qdylora("train", *TINY, "train.max_steps=3", "train.save_every=1", "train.eval_every=0", f"run_dir={run_dir}") == 1
    step1 = run_dir / "checkpoints" / "step-1"
    assert _last_error(capsys) == (f"error: disk full: cannot write {run_dir / 'checkpoints' / 'step-2'} (No space left "
                                   f"on device); nothing was replaced; the last good checkpoint is {step1}")
    assert latest_good_checkpoint(run_dir) == step1 and not list((run_dir / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(train, "save_file", real)
    assert qdylora("train", *TINY, "train.max_steps=3", "train.save_every=1", "train.eval_every=0", f"run_dir={run_dir}",
                   "train.resume=true") == 0

    def metrics_full(file, mode="r", *args, **kwargs):  # metrics.jsonl is appended to, not rewritten
        if str(file).endswith("metrics.jsonl") and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr("qdylora_cli.progress.open", metrics_full, raising=False)
    assert qdylora("train", *TINY, "train.max_steps=2", "train.eval_every=0", f"run_dir={tmp_path / 'other'}") == 1
    assert _last_error(capsys) == (f"error: disk full: cannot write {tmp_path / 'other' / 'metrics.jsonl'} (No space "
                                   "left on device); the last good checkpoint is none")


def test_a_full_disk_at_the_final_adapter_eval_export_and_generate(trained, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    from qdylora_cli import export, rundir

    real = safetensors.torch.save_file

    def full_for_the_adapter(tensors, path, *args, **kwargs):
        if "/.tmp-adapter-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    monkeypatch.setattr(safetensors.torch, "save_file", full_for_the_adapter)
    shutil.rmtree(run_dir / "adapter")
    assert qdylora("train", *TINY, "train.max_steps=3", "train.save_every=1", "train.eval_every=0", f"run_dir={run_dir}",
                   "train.resume=true") == 1
    assert _last_error(capsys).startswith(f"error: disk full: cannot write {run_dir / 'adapter'} (No space left")
    assert not (run_dir / "adapter").exists() and latest_good_checkpoint(run_dir).name == "step-3"
    monkeypatch.setattr(safetensors.torch, "save_file", real)

    real_write_text = Path.write_text

    def full_for_results(self, *args, **kwargs):
        if self.name in ("ranks.json", "summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full_for_results)
        assert qdylora("eval", f"run_dir={trained}", "rank=[1,8]", "max_batches=1") == 1
    assert _last_error(capsys).startswith(f"error: disk full: cannot write {trained / 'eval' / 'loss-val'}")
    assert not (trained / "eval").exists() or not any((trained / "eval").iterdir())

    with monkeypatch.context() as m:
        m.setattr(export, "save_file", lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
        assert qdylora("export", f"run_dir={trained}", "rank=4") == 1
    assert _last_error(capsys).startswith(f"error: disk full: cannot write {trained / 'export' / 'rank-4-peft'}")
    assert not (trained / "export").exists() or not any((trained / "export").iterdir())

    out = tmp_path / "answers.jsonl"
    with monkeypatch.context() as m:
        m.setattr(rundir.os, "fsync", lambda fd: (_ for _ in ()).throw(ENOSPC))
        assert qdylora("generate", f"run_dir={trained}", "prompt=hi", "max_new_tokens=2", f"out_file={out}") == 1
    assert _last_error(capsys) == f"error: disk full: cannot write {out} (No space left on device); it was left as it was"
    assert list(tmp_path.glob("*answers*")) == []


def test_a_real_full_disk_at_the_base_model(tmp_path):
    """The issue's case on a real 600 KB tmpfs (mounted in a private mount namespace; skipped where it cannot be)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here to mount a tmpfs in")
    disk = tmp_path / "disk"
    disk.mkdir()
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    script = (f"mount -t tmpfs -o size=600k tmpfs {disk} && {sys.executable} -m qdylora_cli train {' '.join(TINY)} "
              f"train.max_steps=1 run_dir={disk}/run; echo rc=$?; ls -a {disk}/run")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if "mount:" in out.stderr and "rc=" not in out.stdout:
        pytest.skip(f"cannot mount a tmpfs: {out.stderr.strip()}")
    assert "rc=1" in out.stdout, out.stdout + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: disk full: cannot write {disk}/run/base_model (No space left on device); "
                      "nothing was replaced"], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    left = out.stdout.split("rc=1", 1)[1].split()
    assert "base_model" not in left and not any(name.startswith(".tmp-") for name in left), left
