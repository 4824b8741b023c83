"""Data: records, prompts, masking, truncation, text blocks, splits, batching; the tiny tokenizer and data."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from qdylora_cli.cli import compose_config
from qdylora_cli.config import DataConfig
from qdylora_cli.data import (
    IGNORE_INDEX,
    batch_order,
    chunk_blocks,
    collate,
    format_prompt,
    load_datasets,
    pad_token_id,
    split_indices,
    tokenize_pairs,
)
from qdylora_cli.errors import QdyloraError
from qdylora_cli.tiny import byte_tokenizer, tiny_instructions

RECORDS = [
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Count to three.", "output": "1 2 3"},  # no input field at all
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"val_fraction": 0.0, **kw})


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- prompts and masking ------------------------------------------------------------------------------


def test_alpaca_prompt_with_and_without_input():
    with_input = format_prompt("alpaca", "Translate.", "bonjour")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n")
    without = format_prompt("alpaca", "Say hi.")
    assert without.startswith("Below is an instruction that describes a task. Write a response")
    assert "### Input" not in without and without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert format_prompt("plain", "Reverse.", "abc") == "Reverse.\nabc\n"
    assert format_prompt("plain", "Say hi.") == "Say hi.\n"


def test_labels_mask_exactly_the_prompt(tmp_path, tok):
    train, _ = load_datasets(_cfg(_write_jsonl(tmp_path / "d.jsonl", RECORDS), template="plain"), tok, seed=0)
    for record, ex in zip(RECORDS, train):
        prompt = [tok.bos_token_id, *format_prompt("plain", record["instruction"], record.get("input", "")).encode()]
        response = [*record["output"].encode(), tok.eos_token_id]
        assert ex["input_ids"] == prompt + response
        assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + response


def test_truncation_keeps_eos_and_train_on_source(tmp_path, tok):
    cfg = _cfg("unused", source_max_len=5, target_max_len=3)
    (ex,) = tokenize_pairs(tok, ["abcdefgh"], ["xyzw"], cfg)
    assert ex["input_ids"] == [tok.bos_token_id, *b"abcd", *b"xy", tok.eos_token_id]
    assert ex["labels"][:5] == [IGNORE_INDEX] * 5 and ex["labels"][5:] == [*b"xy", tok.eos_token_id]
    (ex,) = tokenize_pairs(tok, ["abcdefgh"], ["xyzw"], replace(cfg, train_on_source=True))
    assert ex["labels"] == ex["input_ids"]


def test_custom_field_names(tmp_path, tok):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2"}])
    cfg = _cfg(path, template="plain", instruction_field="question", output_field="answer")
    (ex,), _ = load_datasets(cfg, tok, seed=0)
    assert tok.decode(ex["input_ids"], skip_special_tokens=True) == "1+1?\n2"


# --- malformed input ----------------------------------------------------------------------------------


def test_bad_jsonl_line_names_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(QdyloraError, match=f"{path}:3: invalid JSON line"):
        load_datasets(_cfg(path), tok, seed=0)


def test_bad_json_list_names_line(tmp_path, tok):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": }\n]')
    with pytest.raises(QdyloraError, match=f"{path}:3: invalid JSON"):
        load_datasets(_cfg(path), tok, seed=0)


def test_missing_field_names_field_and_line(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], {"instruction": "no output"}])
    with pytest.raises(QdyloraError, match=rf"{path}:2: missing field 'output' \(set data.output_field"):
        load_datasets(_cfg(path), tok, seed=0)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([RECORDS[0], {"output": "x"}]))
    with pytest.raises(QdyloraError, match=f"{path} record 2: missing field 'instruction'"):
        load_datasets(_cfg(path), tok, seed=0)


def test_wrong_field_type_and_non_object(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": 3}])
    with pytest.raises(QdyloraError, match=f"{path}:1: field 'output' must be a string, got int"):
        load_datasets(_cfg(path), tok, seed=0)
    path = _write_jsonl(tmp_path / "e.jsonl", [["x", "y"]])
    with pytest.raises(QdyloraError, match=f"{path}:1: expected a JSON object"):
        load_datasets(_cfg(path), tok, seed=0)


@pytest.mark.parametrize("content", ["[]", "", "\n\n"])
def test_empty_dataset(tmp_path, tok, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(QdyloraError, match=f"{path}: no records"):
        load_datasets(_cfg(path), tok, seed=0)


def test_non_utf8_and_missing_file(tmp_path, tok):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + '{"instruction": "caf\xe9", "output": "x"}'.encode("latin-1"))
    with pytest.raises(QdyloraError, match=f"{path}:2: not valid UTF-8"):
        load_datasets(_cfg(path), tok, seed=0)
    with pytest.raises(QdyloraError, match="no such file"):
        load_datasets(_cfg(tmp_path / "absent.json"), tok, seed=0)
    with pytest.raises(QdyloraError, match="the text is empty"):
        (tmp_path / "blank.txt").write_text("  \n")
        load_datasets(_cfg(tmp_path / "blank.txt", format="text"), tok, seed=0)


# --- text corpora, splits -----------------------------------------------------------------------------


def test_chunk_blocks():
    blocks = chunk_blocks(list(range(10)), 4)
    assert [b["input_ids"] for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert len(chunk_blocks(list(range(9)), 4)) == 2  # a one-token tail predicts nothing


def test_text_blocks_and_tail_validation(tmp_path, tok):
    text = "Once upon a time <|endoftext|> there was a tiny model.\n" * 20
    (tmp_path / "t.txt").write_text(text)
    train, val = load_datasets(_cfg(tmp_path / "t.txt", format="text", block_size=64, val_fraction=0.1), tok, seed=0)
    ids = tok(text)["input_ids"]
    assert all(len(b["input_ids"]) == 64 for b in train[:-1])
    stream = [t for b in [*train, *val] for t in b["input_ids"]]
    assert stream == ids  # train then validation, in order: the held-out part is the tail
    assert sum(len(b["input_ids"]) for b in val) == round(len(ids) * 0.1)
    capped, _ = load_datasets(_cfg(tmp_path / "t.txt", format="text", block_size=64, max_samples=2), tok, seed=0)
    assert len(capped) == 2


def test_text_val_path(tmp_path, tok):
    (tmp_path / "a.txt").write_text("a" * 100)
    (tmp_path / "b.txt").write_text("b" * 30)
    train, val = load_datasets(_cfg(tmp_path / "a.txt", format="text", block_size=50, val_path=str(tmp_path / "b.txt")), tok, 0)
    assert sum(len(b["input_ids"]) for b in train) == 100 and [len(b["input_ids"]) for b in val] == [31]


def test_validation_split_is_deterministic_and_disjoint(tmp_path, tok):
    records = [{"instruction": f"task {i}", "output": str(i)} for i in range(200)]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    cfg = _cfg(path, val_fraction=0.1)
    train, val = load_datasets(cfg, tok, seed=3)
    again, val_again = load_datasets(cfg, tok, seed=3)
    assert (train, val) == (again, val_again) and len(val) == 20 and len(train) == 180
    key = lambda e: tuple(e["input_ids"])  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in val}
    _, other = load_datasets(cfg, tok, seed=4)
    assert other != val
    assert split_indices(10, 0.0, 0) == (list(range(10)), [])
    assert len(split_indices(3, 0.01, 0)[1]) == 1  # a non-zero fraction always holds something out


def test_val_path_and_max_samples(tmp_path, tok):
    path = _write_jsonl(tmp_path / "train.jsonl", RECORDS * 10)
    val_path = _write_jsonl(tmp_path / "val.jsonl", RECORDS[:2])
    train, val = load_datasets(_cfg(path, val_path=str(val_path), max_samples=7, val_fraction=0.5), tok, seed=0)
    assert len(train) == 7 and len(val) == 2


def test_hf_datasets_on_disk(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list(RECORDS[:2] * 5).save_to_disk(str(tmp_path / "saved"))
    train, _ = load_datasets(_cfg(tmp_path / "saved", format="hf"), tok, seed=0)
    assert len(train) == 10
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "hello world " * 20}])}).save_to_disk(
        str(tmp_path / "dict")
    )
    train, _ = load_datasets(_cfg(tmp_path / "dict", format="hf", text_field="text", block_size=16), tok, seed=0)
    assert len(train) == 15 and len(train[0]["input_ids"]) == 16  # 241 tokens; the 1-token tail is dropped
    with pytest.raises(QdyloraError, match="data.hf_split='test': .* has splits train"):
        load_datasets(_cfg(tmp_path / "dict", format="hf", hf_split="test", text_field="text"), tok, seed=0)
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"q": "a", "a": "b"}])
    cfg = _cfg(path, format="hf", instruction_field="q", output_field="a")
    assert len(load_datasets(cfg, tok, seed=0)[0]) == 1


# --- batching -----------------------------------------------------------------------------------------


def test_collate_pads_right_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_batch_order_is_a_deterministic_reshuffled_cover():
    a = batch_order(103, 8, seed=1, epoch=0)
    assert a == batch_order(103, 8, seed=1, epoch=0)
    assert a != batch_order(103, 8, seed=1, epoch=1) and a != batch_order(103, 8, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(103))
    assert len(a) == 13 and all(len(b) == 8 for b in a[:-1])


def test_group_by_length_batches_similar_lengths():
    lengths = [(i * 37) % 500 + 1 for i in range(2000)]
    grouped = batch_order(2000, 8, seed=0, epoch=0, group_by_length=True, lengths=lengths)
    assert grouped == batch_order(2000, 8, seed=0, epoch=0, group_by_length=True, lengths=lengths)
    assert grouped != batch_order(2000, 8, seed=0, epoch=1, group_by_length=True, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(2000))
    plain = batch_order(2000, 8, seed=0, epoch=0)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 10
    # Batches are shuffled: the order in time is not sorted by length.
    first = [max(lengths[i] for i in b) for b in grouped]
    assert first != sorted(first) and first != sorted(first, reverse=True)
    with pytest.raises(ValueError):
        batch_order(10, 2, 0, 0, group_by_length=True)


def test_group_by_length_does_not_give_the_first_chunk_the_longest_rows():
    """A step's ranks take the rows of a batch in order (chunk 0: the lowest rank); sorted batches gave the
    lowest rank the longest examples at every step."""
    lengths = [(i * 37) % 500 + 1 for i in range(2000)]
    grouped = batch_order(2000, 8, seed=0, epoch=0, group_by_length=True, lengths=lengths)
    first_half = sum(lengths[i] for b in grouped for i in b[:4])
    second_half = sum(lengths[i] for b in grouped for i in b[4:])
    assert abs(first_half / second_half - 1) < 0.01
    longest_first = sum(lengths[b[0]] == max(lengths[i] for i in b) for b in grouped) / len(grouped)
    assert longest_first < 0.3  # 1/8 by chance


# --- tokenizers without pad; real data -----------------------------------------------------------------


def test_tokenizer_without_pad_pads_with_eos(stories260k, caplog):
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    assert tokenizer.pad_token_id is None
    with caplog.at_level(logging.INFO, logger="qdylora_cli.data"):
        pad = pad_token_id(tokenizer)
    assert pad == tokenizer.eos_token_id and len(caplog.records) == 1
    assert pad_token_id(byte_tokenizer()) == byte_tokenizer().pad_token_id


def test_real_alpaca_with_stories260k_tokenizer(stories260k, alpaca_1k):
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    cfg = compose_config("train", ["model=hf", f"model.name_or_path={stories260k}", "data=json", f"data.path={alpaca_1k}"])
    train, val = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    assert len(train) + len(val) == 1000 and len(val) == 20
    for ex in train[:50]:
        n_prompt = ex["labels"].count(IGNORE_INDEX)
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert ex["input_ids"][0] == tokenizer.bos_token_id and ex["input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ex["input_ids"][:n_prompt]).rstrip().endswith("### Response:")
        assert n_prompt <= 384 and len(ex["input_ids"]) - n_prompt <= 128
    batch = collate(train[:4], pad_token_id(tokenizer))
    assert batch["input_ids"].shape[0] == 4 and (batch["labels"] != IGNORE_INDEX).any()


def test_shakespeare_blocks(stories260k, shakespeare):
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    cfg = compose_config("train", ["data=text", f"data.path={shakespeare}", "data.block_size=256"]).data
    train, val = load_datasets(cfg, tokenizer, seed=0)
    assert len(train) > 1000 and all(len(b["input_ids"]) == 256 for b in train[:-1]) and val


# --- the tiny setup -----------------------------------------------------------------------------------


def test_byte_tokenizer_roundtrip_and_reload(tmp_path, tok):
    text = "héllo wörld\n\t<|endoftext|> 日本"
    ids = tok(text)["input_ids"]
    assert ids == [tok.bos_token_id, *text.encode()]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (256, 257, 258, 259)
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text)["input_ids"] == ids and again.pad_token_id == 258


def test_tiny_model_config_fits_the_byte_tokenizer(tok):
    config = compose_config("train", ["+recipe=tiny"]).model.config
    assert config["vocab_size"] >= len(tok)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_tiny_instructions(tok):
    records = tiny_instructions(300, seed=0)
    assert records == tiny_instructions(300, seed=0) and records != tiny_instructions(300, seed=1)
    assert len(records) == 300 and all(set(r) == {"instruction", "input", "output"} for r in records)
    assert any(r["input"] == "" for r in records) and any(r["input"] for r in records)
    reverse = next(r for r in records if r["instruction"] == "Reverse the word.")
    assert reverse["output"] == reverse["input"][::-1]
    cfg = compose_config("train", ["+recipe=tiny"]).data
    train, val = load_datasets(cfg, tok, seed=0)
    assert len(train) > 500 and val
    assert max(len(e["input_ids"]) for e in train) <= cfg.source_max_len + cfg.target_max_len
