"""Chat data: messages, templates, assistant-only labels checked token by token, truncation, end to end."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from runners import qdylora
from transformers import AutoTokenizer

from qdylora_cli.chat import (
    CHATML_TEMPLATE,
    find_turn_end,
    generation_prompt,
    resolve_template,
    tokenize_conversations,
)
from qdylora_cli.cli import compose_config
from qdylora_cli.config import DataConfig
from qdylora_cli.data import IGNORE_INDEX, load_datasets, packed_batch_order, split_indices
from qdylora_cli.errors import QdyloraError
from qdylora_cli.evaluate import gsm8k_prediction
from qdylora_cli.model import load_run_model
from qdylora_cli.multirank import generate_at_ranks
from qdylora_cli.rundir import load_run_config
from qdylora_cli.tiny import byte_tokenizer, tiny_instructions

CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reverse the word. cat"},
     {"role": "assistant", "content": "tac"}, {"role": "user", "content": "And dog?"},
     {"role": "assistant", "content": "god"}],
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Again."},
     {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Thanks."}],  # ends with the user
]

# A Llama-3-style template (headers, end-of-turn token, BOS written by the template), with the assistant
# turns marked by {% generation %} so transformers' own assistant mask can check ours.
HEADER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _cfg(path="unused", **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"format": "chat", "messages_field": "messages", "val_fraction": 0.0, **kw})


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _examples(tokenizer, conversations, cfg, template=None):
    template = template or resolve_template(cfg, tokenizer)
    return tokenize_conversations(tokenizer, template, [(f"record {i}", c) for i, c in enumerate(conversations)], cfg)


# --- labels, token by token ---------------------------------------------------------------------------


def test_chatml_labels_are_exactly_the_assistant_turns(tok, caplog):
    """Byte tokenizer: one token per byte, so the expected tokens and labels are spelled out by hand."""
    with caplog.at_level(logging.INFO, logger="qdylora_cli.chat"):
        examples, stats = _examples(tok, CONVERSATIONS, _cfg())
    assert "no chat template: using qdylora's built-in ChatML" in caplog.text
    assert stats.records == 3 and stats.cut == stats.dropped == 0
    for conversation, ex in zip(CONVERSATIONS, examples):
        ids, labels = _chatml_by_hand(tok, conversation)
        assert ex["input_ids"] == ids
        assert ex["labels"] == labels


def _chatml_by_hand(tok, conversation):
    """Tokens and labels of a ChatML conversation, spelled out byte by byte."""
    ids, labels = [tok.bos_token_id], [IGNORE_INDEX]
    for m in conversation:
        pieces = [(f"<|im_start|>{m['role']}\n", False)]
        if m["role"] == "assistant":  # every assistant turn, not only the last: content, <|im_end|>, EOS
            pieces += [(m["content"] + "<|im_end|>", True), (tok.eos_token, True), ("\n", False)]
        else:
            pieces += [(m["content"] + "<|im_end|>\n", False)]
        for text, trained in pieces:
            piece = [tok.eos_token_id] if text == tok.eos_token else list(text.encode())
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def test_real_tokenizer_with_a_header_template_matches_transformers_assistant_mask(stories260k):
    """stories260K's SentencePiece tokenizer with a Llama-3-style template: our prefix-by-prefix mask
    equals transformers' `{% generation %}` mask token by token, and decodes to the assistant turns."""
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    cfg = _cfg(chat_template=HEADER_TEMPLATE)
    template = resolve_template(cfg, tokenizer)
    examples, _ = _examples(tokenizer, CONVERSATIONS, cfg, template)
    for conversation, ex in zip(CONVERSATIONS, examples):
        reference = tokenizer.apply_chat_template(conversation, chat_template=HEADER_TEMPLATE, tokenize=True,
                                                  return_dict=True, return_assistant_tokens_mask=True)
        assert ex["input_ids"] == reference["input_ids"]
        ours = [label != IGNORE_INDEX for label in ex["labels"]]
        assert ours == [bool(m) for m in reference["assistant_masks"]]
        trained = tokenizer.decode([t for t, keep in zip(ex["input_ids"], ours) if keep])
        assert trained.replace(" ", "") == "".join(
            m["content"] + "<|eot_id|>" for m in conversation if m["role"] == "assistant").replace(" ", "")


def test_train_on_source_puts_loss_on_every_token(tok):
    (ex, *_), _ = _examples(tok, CONVERSATIONS, _cfg(train_on_source=True))
    assert ex["labels"] == ex["input_ids"]


def test_truncation_cuts_or_drops_and_says_so(tmp_path, tok, caplog):
    long_user = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "y" * 300}]
    path = _write(tmp_path / "long.jsonl", [{"messages": c} for c in [long_user, long_answer, CONVERSATIONS[1]]])
    with caplog.at_level(logging.INFO, logger="qdylora_cli.data"):
        train, _ = load_datasets(_cfg(path, max_length=100), tok, seed=0)
    assert f"{path}: of 3 conversations, 1 were cut to data.max_length=100 tokens and 1 dropped" in caplog.text
    assert [len(e["input_ids"]) for e in train] == [100, len(_examples(tok, [CONVERSATIONS[1]], _cfg())[0][0]["input_ids"])]
    assert train[0]["labels"][-1] == ord("y")  # cut inside the answer: what is left of it still carries loss
    with pytest.raises(QdyloraError, match=r"no training examples left .*data.max_length"):
        load_datasets(_cfg(_write(tmp_path / "one.jsonl", [{"messages": long_user}]), max_length=100), tok, seed=0)


def test_the_held_out_records_do_not_shift_when_truncation_drops_one(tmp_path, tok):
    """Training holds out the same records as `qdylora eval`'s tasks (split_indices over records)."""
    long_user = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(12)]
    records[0] = {"messages": long_user}  # dropped at max_length 100
    cfg = _cfg(_write(tmp_path / "chat.jsonl", records), max_length=100, val_fraction=0.25)
    train, val = load_datasets(cfg, tok, seed=3)
    train_idx, val_idx = split_indices(len(records), 0.25, seed=3)
    one = {i: _examples(tok, [records[i]["messages"]], cfg)[0] for i in range(1, 12)}
    assert val == [one[i][0] for i in val_idx if i != 0]
    assert train == [one[i][0] for i in train_idx if i != 0]


# --- records --------------------------------------------------------------------------------------------


def test_format_chat_alone_reads_messages(tmp_path, tok):
    path = _write(tmp_path / "c.jsonl", [{"messages": c} for c in CONVERSATIONS])
    cfg = compose_config("train", ["data=json", "data.format=chat", f"data.path={path}", "data.val_fraction=0"]).data
    assert cfg.messages_field is None
    train, _ = load_datasets(cfg, tok, seed=0)
    assert train == _examples(tok, CONVERSATIONS, _cfg())[0]


def test_sharegpt_fields_roles_and_system_prompt(tmp_path, tok):
    sharegpt = [{"conversations": [{"from": "human", "value": m["content"]} if m["role"] == "user" else
                                   {"from": "gpt", "value": m["content"]}
                                   for m in CONVERSATIONS[1]]}]
    path = _write(tmp_path / "sg.jsonl", sharegpt)
    cfg = compose_config("train", ["data=sharegpt", f"data.path={path}", "data.val_fraction=0"]).data
    assert (cfg.messages_field, cfg.role_field, cfg.content_field) == ("conversations", "from", "value")
    (ex,), _ = load_datasets(cfg, tok, seed=0)
    assert ex == _examples(tok, [CONVERSATIONS[1]], _cfg())[0][0]
    (ex,), _ = load_datasets(replace(cfg, system_prompt="Be nice."), tok, seed=0)
    assert tok.decode(ex["input_ids"]).startswith("<s><|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\n")
    (ex,), _ = load_datasets(replace(_cfg(_write(tmp_path / "s.jsonl", [{"messages": CONVERSATIONS[0]}])),
                                     system_prompt="Be nice."), tok, seed=0)
    assert "Be nice." not in tok.decode(ex["input_ids"])  # a record's own system message is kept


BAD_RECORDS = [
    ({"text": "hi"}, "missing field 'messages' (set data.messages_field"),
    ({"messages": "hi"}, "field 'messages' must be a list of messages, got str"),
    ({"messages": []}, "no messages"),
    ({"messages": ["hi"]}, "message 1 must be an object with 'role' and 'content', got str"),
    ({"messages": [{"content": "hi"}]}, "message 1 has no 'role'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     "message 2 has an unknown role 'bot'; expected system, user, assistant"),
    ({"messages": [{"role": "user"}]}, "message 1 has no 'content'"),
    ({"messages": [{"role": "user", "content": ["a", "b"]}]}, "message 1: 'content' must be a string, got list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "message 1 is the assistant's"),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS, ids=[m.split(" (")[0] for _, m in BAD_RECORDS])
def test_bad_records_name_file_line_and_what_is_wrong(tmp_path, tok, record, message):
    path = _write(tmp_path / "bad.jsonl", [{"messages": CONVERSATIONS[1]}, record])
    with pytest.raises(QdyloraError) as err:
        load_datasets(_cfg(path), tok, seed=0)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value), str(err.value)


def test_templates_from_text_file_and_their_errors(tmp_path, tok, stories260k):
    stories = AutoTokenizer.from_pretrained(stories260k)
    (tmp_path / "t.jinja").write_text(HEADER_TEMPLATE)
    assert resolve_template(_cfg(chat_template=str(tmp_path / "t.jinja")), stories).text == HEADER_TEMPLATE
    assert resolve_template(_cfg(chat_template="chatml"), stories).text == CHATML_TEMPLATE
    stories.chat_template = HEADER_TEMPLATE  # a tokenizer's own template wins over the built-in default
    assert resolve_template(_cfg(), stories).source.startswith("the chat template of")
    with pytest.raises(QdyloraError, match=r"^data.chat_template fails on a two-message conversation \(template line 1\): "):
        resolve_template(_cfg(chat_template="{% for m in messages %}{{ m.content }"), tok)
    rejects = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns') }}" \
              "{% endif %}{{ m.content }}{% endfor %}"
    path = _write(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[0]}])
    with pytest.raises(QdyloraError, match=f"{path}:2: data.chat_template fails: no system turns"):
        load_datasets(_cfg(path, chat_template=rejects), tok, seed=0)
    # A template that writes the last message differently from earlier ones cannot be split into turns.
    last_differs = "{% for m in messages %}{{ m.content }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(QdyloraError, match=f"{path}:1: data.chat_template renders the first 1 messages differently"):
        load_datasets(_cfg(path, chat_template=last_differs), tok, seed=0)


def test_hf_dataset_on_disk_with_a_messages_column(tmp_path, tok):
    import datasets

    records = [{"messages": c} for c in CONVERSATIONS] * 3
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    from_disk, _ = load_datasets(_cfg(tmp_path / "saved", format="hf"), tok, seed=0)
    from_jsonl, _ = load_datasets(_cfg(_write(tmp_path / "c.jsonl", records)), tok, seed=0)
    assert from_disk == from_jsonl and len(from_disk) == 9
    with pytest.raises(QdyloraError, match="row 1: missing field 'conversations'"):
        load_datasets(_cfg(tmp_path / "saved", format="hf", messages_field="conversations"), tok, seed=0)


# --- end to end: train, eval every rank, tasks, export ---------------------------------------------------


def _chat_records(n: int, seed: int) -> list[dict]:
    """Two tiny tasks per conversation, every other one with a system message."""
    tasks, records = tiny_instructions(2 * n, seed=seed), []
    for i in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 2 else []
        for t in tasks[2 * i : 2 * i + 2]:
            messages += [{"role": "user", "content": f"{t['instruction']} {t['input']}".strip()},
                         {"role": "assistant", "content": t["output"]}]
        records.append({"messages": messages})
    return records


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    path = _write(root / "chat.jsonl", _chat_records(120, seed=0))
    run_dir = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # kinder to a shared machine
    code = qdylora("train", "+recipe=tiny", "data=chat", f"data.path={path}", "data.max_length=256", "data.val_fraction=0.1",
                   "data.packing=true", "train.max_steps=null", "train.num_epochs=2", "train.batch_size=4",
                   "train.eval_every=0", "train.save_every=0", f"run_dir={run_dir}")
    torch.set_num_threads(threads)
    assert code == 0
    return run_dir, path


def test_chat_run_trains_evaluates_every_rank_and_exports(chat_run, capsys):
    run_dir, path = chat_run
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train, _ = load_datasets(load_run_config(run_dir).data, byte_tokenizer(), seed=42)
    lengths = [len(e["input_ids"]) for e in train]
    batches = [len(packed_batch_order(lengths, 4, 42, epoch, 256)) for epoch in (0, 1)]
    assert metrics[-1]["step"] == sum(batches)  # train.num_epochs=2 with grad_accum 1
    assert qdylora("eval", f"run_dir={run_dir}", "rank=all") == 0
    rows = json.loads((run_dir / "eval" / "loss-val" / "ranks.json").read_text())
    assert [r["rank"] for r in rows] == list(range(9)) and rows[8]["loss"] < rows[0]["loss"] - 1
    assert qdylora("export", f"run_dir={run_dir}", "rank=4", "format=merged") == 0
    assert qdylora("export", f"run_dir={run_dir}", "rank=4") == 0
    for kind in ("merged", "peft"):  # both carry the template the run was trained with
        exported = AutoTokenizer.from_pretrained(run_dir / "export" / f"rank-4-{kind}")
        assert exported.chat_template == CHATML_TEMPLATE
    merged = run_dir / "export" / "rank-4-merged"
    assert qdylora("eval", f"run_dir={merged}", f"out_dir={run_dir / 'eval-merged'}") == 0
    by_rank = {r["rank"]: r["loss"] for r in rows}
    merged_loss = json.loads((run_dir / "eval-merged" / "ranks.json").read_text())[0]["loss"]
    assert merged_loss == pytest.approx(by_rank[4], rel=1e-3)


def test_gsm8k_on_chat_records_uses_the_template_and_the_end_of_turn(chat_run, tmp_path):
    run_dir, _ = chat_run
    model, tokenizer, _ = load_run_model(run_dir)
    template = resolve_template(load_run_config(run_dir).data, tokenizer)
    end = find_turn_end(tokenizer, template)
    assert (end.text, end.token_ids) == ("<|im_end|>", [tokenizer.eos_token_id])
    questions = [f"What is {a} plus {b}?" for a, b in [(3, 4), (10, 2), (0, 5)]]
    prompts = [generation_prompt(tokenizer, template, [{"role": "user", "content": q}], "q") for q in questions]
    generated = generate_at_ranks(model, tokenizer, prompts, [8], 8, torch.device("cpu"), turn_end=end)[8]
    assert not any("<|im_end|>" in text for text in generated)
    golds = [gsm8k_prediction(generated[0]) or "999", "12", "5"]
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"#### {g}"}]}
               for q, g in zip(questions, golds)]
    out = tmp_path / "out"
    assert qdylora("eval", f"run_dir={run_dir}", "rank=8", "task=gsm8k", "max_new_tokens=8", "data=chat",
                   f"data.path={_write(tmp_path / 'gsm.jsonl', records)}", f"out_dir={out}") == 0
    score = {r["rank"]: r["exact_match"] for r in json.loads((out / "ranks.json").read_text())}[8]
    assert score == sum(gsm8k_prediction(t) == g for t, g in zip(generated, golds)) / 3


def test_generate_on_a_chat_run_asks_in_the_chat_template_and_stops_at_the_turn_end(chat_run, tmp_path):
    run_dir, _ = chat_run
    model, tokenizer, _ = load_run_model(run_dir)
    template = resolve_template(load_run_config(run_dir).data, tokenizer)
    prompt = generation_prompt(tokenizer, template, [{"role": "user", "content": "What is 3 plus 4?"}], "q")
    expected = generate_at_ranks(model, tokenizer, [prompt], [2, 8], 12, torch.device("cpu"),
                                 turn_end=find_turn_end(tokenizer, template))
    out = tmp_path / "answers.jsonl"
    assert qdylora("generate", f"run_dir={run_dir}", "rank=[2,8]", "prompt=What is 3 plus 4?", "max_new_tokens=12",
                   f"out_file={out}") == 0
    answers = {r["rank"]: r["answer"] for r in map(json.loads, out.read_text().splitlines())}
    assert answers == {2: expected[2][0], 8: expected[8][0]}
    assert not any("<|im_end|>" in a for a in answers.values())
