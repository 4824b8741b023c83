"""Sample packing: rows, positions and labels; packed losses equal unpacked ones; exact resume; epochs."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from qdylora_cli import train
from qdylora_cli.cli import compose_config
from qdylora_cli.data import (
    IGNORE_INDEX,
    check_packing,
    collate,
    collate_packed,
    load_datasets,
    pack_rows,
    packed_batch_order,
    padding_fraction,
)
from qdylora_cli.errors import QdyloraError
from qdylora_cli.tiny import byte_tokenizer


def _examples(lengths, seed=0, vocab=500):
    """Random token sequences; the first two tokens of each are prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return examples


# --- rows and batches ---------------------------------------------------------------------------------


def test_pack_rows_best_fit_covers_every_example_once():
    lengths = [(i * 37) % 120 + 5 for i in range(400)]
    order = list(range(400))[::-1]
    rows = pack_rows(lengths, order, capacity=256)
    assert sorted(i for row in rows for i in row) == list(range(400))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert sum(lengths) / (256 * len(rows)) > 0.97  # best fit leaves little room
    assert pack_rows(lengths, order, 256) == rows
    assert pack_rows([3, 4, 2, 5], [0, 1, 2, 3], capacity=7) == [[0, 1], [2, 3]]  # the tightest row that fits
    assert pack_rows([5, 4, 2, 3], [0, 1, 2, 3], capacity=7) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError):
        pack_rows([8], [0], capacity=7)


def test_packed_batch_order_is_a_pure_function_of_seed_and_epoch():
    lengths = [(i * 53) % 200 + 3 for i in range(1000)]
    a = packed_batch_order(lengths, 4, seed=1, epoch=0, capacity=512)
    assert a == packed_batch_order(lengths, 4, seed=1, epoch=0, capacity=512)
    assert a != packed_batch_order(lengths, 4, seed=1, epoch=1, capacity=512)
    assert a != packed_batch_order(lengths, 4, seed=2, epoch=0, capacity=512)
    assert sorted(i for batch in a for row in batch for i in row) == list(range(1000))
    assert all(len(batch) == 4 for batch in a[:-1])
    assert padding_fraction(a, lengths) < 0.05


def test_collate_packed_restarts_positions_and_never_crosses_labels():
    rows = [_examples([3, 4]), _examples([5])]
    batch = collate_packed(rows, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1]]
    (a, b), (c,) = rows
    assert batch["input_ids"][0].tolist() == a["input_ids"] + b["input_ids"]
    assert batch["input_ids"][1].tolist() == c["input_ids"] + [0, 0]
    # The first token of every example is never a target: the example before must not learn to predict it.
    labels = batch["labels"].tolist()
    assert labels[0] == [IGNORE_INDEX] + a["labels"][1:] + [IGNORE_INDEX] + b["labels"][1:]
    assert labels[1] == [IGNORE_INDEX] + c["labels"][1:] + [IGNORE_INDEX] * 2
    trained = _examples([4, 4])
    for e in trained:
        e["labels"] = list(e["input_ids"])  # loss on every token (train_on_source)
    assert collate_packed([trained], 0)["labels"][0, 4].item() == IGNORE_INDEX


# --- packed losses equal unpacked losses ---------------------------------------------------------------


def _tiny_llama():
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=500, max_position_embeddings=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _models(stories260k):
    yield "config-built tiny Llama", _tiny_llama()
    yield "stories260K", AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    yield "stories260K eager", AutoModelForCausalLM.from_pretrained(
        stories260k, dtype=torch.float32, attn_implementation="eager").eval()


def _example_losses(logits, labels, position_ids):
    """Mean loss of each example of each row, found by its position restart."""
    losses = []
    for r in range(labels.shape[0]):
        token_loss = F.cross_entropy(logits[r, :-1], labels[r, 1:], ignore_index=IGNORE_INDEX, reduction="none")
        starts = (position_ids[r] == 0).nonzero().flatten().tolist() + [labels.shape[1]]
        for s, e in zip(starts, starts[1:]):
            counted = labels[r, s + 1 : e] != IGNORE_INDEX
            if counted.any():
                losses.append((token_loss[s : e - 1][counted].mean()).item())
    return losses


@torch.no_grad()
def test_each_packed_example_has_its_unpacked_loss(stories260k):
    examples = _examples([9, 23, 5, 40, 17, 12, 30])
    rows = [[examples[i] for i in row] for row in pack_rows([len(e["input_ids"]) for e in examples], range(7), 64)]
    assert any(len(row) > 1 for row in rows)
    packed = collate_packed(rows, pad_id=0)
    for name, model in _models(stories260k):
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        losses = _example_losses(logits, packed["labels"], packed["position_ids"])
        alone = []
        for e in (e for row in rows for e in row):
            one = collate([e], pad_id=0)
            logits = model(input_ids=one["input_ids"]).logits[0, :-1]
            alone.append(F.cross_entropy(logits, one["labels"][0, 1:], ignore_index=IGNORE_INDEX).item())
        assert losses == pytest.approx(alone, abs=1e-5), name
        # The batch loss transformers computes is the token-weighted mean of the examples' losses.
        batch_loss = model(**packed, use_cache=False).loss.item()
        counts = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for row in rows for e in row]
        assert batch_loss == pytest.approx(sum(c * x for c, x in zip(counts, alone)) / sum(counts), abs=1e-5), name


@torch.no_grad()
def test_no_token_attends_across_a_boundary(stories260k):
    """Changing one example leaves the logits of the others in its row bit-identical (SDPA), and eager
    attention puts exactly zero weight across boundaries."""
    a, b, c = _examples([11, 7, 13])
    batch = collate_packed([[a, b, c]], pad_id=0)
    changed = collate_packed([[{**a, "input_ids": [t + 1 for t in a["input_ids"]]}, b, c]], pad_id=0)
    for name, model in _models(stories260k):
        kw = {"position_ids": batch["position_ids"], "use_cache": False}
        before, after = model(input_ids=batch["input_ids"], **kw).logits, model(input_ids=changed["input_ids"], **kw).logits
        assert not torch.equal(before[0, :11], after[0, :11])
        assert torch.equal(before[0, 11:], after[0, 11:]), name
    eager = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32, attn_implementation="eager").eval()
    attentions = eager(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       output_attentions=True).attentions
    segment = torch.tensor([0] * 11 + [1] * 7 + [2] * 13)
    across = segment[:, None] != segment[None, :]
    for layer in attentions:
        assert layer[0][:, across].abs().max().item() == 0.0


@torch.no_grad()
def test_check_packing_catches_a_model_that_ignores_the_restarts(stories260k, alpaca_1k):
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    cfg = compose_config("train", ["data=json", f"data.path={alpaca_1k}", "data.max_samples=50"]).data
    train_set, _ = load_datasets(cfg, tokenizer, seed=0)
    model = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.bfloat16).eval()
    check_packing(model, train_set, "cpu")
    # With a KV cache, transformers skips its packed-sequence detection: the rows attend across examples.
    forward = model.forward
    model.forward = lambda **kw: forward(**{**kw, "use_cache": True})
    with pytest.raises(QdyloraError, match=r"data.packing=true: this model \(LlamaForCausalLM, attention sdpa\) "
                                           r"lets packed examples attend to each other"):
        check_packing(model, train_set, "cpu")


# --- training: resume, epochs ----------------------------------------------------------------------------



def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _packed_tiny(run_dir, *extra):
    return compose_config("train", [
        "+recipe=tiny", f"run_dir={run_dir}", "data.packing=true", "data.max_length=192", "data.max_samples=80",
        "train.max_steps=6", "train.save_every=3", "train.eval_every=0", "train.batch_size=2", "train.grad_accum=2",
        "train.log_every=1", "adapter.dropout=0.1", *extra])


def _batches_per_epoch(cfg, epochs):
    examples, _ = load_datasets(cfg.data, byte_tokenizer(), seed=cfg.train.seed)
    lengths = [len(e["input_ids"]) for e in examples]
    return examples, [len(packed_batch_order(lengths, 2, cfg.train.seed, e, 192)) for e in range(epochs)]


def test_resume_with_packing_is_bit_identical(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train.run(_packed_tiny(straight))
    train.run(_packed_tiny(crashed))
    shutil.rmtree(crashed / "adapter")
    shutil.rmtree(crashed / "checkpoints" / "step-6")  # as if killed after step 3's checkpoint
    train.run(_packed_tiny(crashed, "train.resume=true"))
    a = load_file(str(straight / "adapter" / "adapter.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert [m["loss"] for m in _metrics(crashed)] == [m["loss"] for m in _metrics(straight)]
    # The resumed part crossed into the second epoch, whose rows are packed afresh.
    _, (first, _) = _batches_per_epoch(_packed_tiny(straight), 2)
    assert 6 < first < 12
    state = json.loads((straight / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    data = state.pop("data")  # what the data was (datacache.py): a resume onto other data says so
    assert state == {"step": 6, "epoch": 1, "index": 12 - first, "cpu_threads": 1}  # conftest: one thread
    assert data == load_datasets(_packed_tiny(straight).data, byte_tokenizer(), seed=42)[0].fingerprint


def test_num_epochs_sets_the_steps_and_the_run_says_so(tmp_path, caplog):
    cfg = _packed_tiny(tmp_path / "epochs", "train.max_steps=null", "train.num_epochs=2", "train.save_every=0")
    with caplog.at_level(logging.INFO, logger="qdylora_cli.data"):
        train.run(cfg)
    examples, batches = _batches_per_epoch(cfg, 2)
    steps = -(-sum(batches) // 2)  # every batch of both epochs, 2 per step, the last step completed from epoch 3
    assert _metrics(tmp_path / "epochs")[-1]["step"] == steps
    assert f"train.num_epochs=2: {steps} optimizer steps" in caplog.text
    tokens = sum(len(e["input_ids"]) for e in examples)
    assert f"data: {len(examples)} training examples, {tokens:,} tokens (" in caplog.text
    assert f"one epoch is {batches[0]} batches of 2 rows of up to 192 tokens (packed)" in caplog.text
