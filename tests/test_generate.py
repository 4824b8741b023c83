"""`qdylora generate` on a short tiny run: answers against a hand-rolled decoding loop, ranks side by side."""

import json
from pathlib import Path

import pytest
import torch
from runners import qdylora

from qdylora_cli import train
from qdylora_cli.adapters import set_rank
from qdylora_cli.cli import compose_config
from qdylora_cli.config import DataConfig
from qdylora_cli.data import format_prompt
from qdylora_cli.errors import QdyloraError
from qdylora_cli.generate import Prompt, model_text, read_prompts
from qdylora_cli.model import load_run_model
from qdylora_cli.sampling import Sampling, SharedNoiseSampler, nucleus_mask

PROMPTS = [("Reverse the word.", "star"), ("What is 3 plus 4?", ""), ("Write the word in capital letters.", "frog")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("generate") / "run"
    train.run(compose_config("train", ["+recipe=tiny", f"run_dir={run_dir}", "train.max_steps=40", "train.save_every=0",
                                       "train.eval_every=0", "train.batch_size=8"]))
    return run_dir


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"instruction": i, "input": x}) + "\n" for i, x in PROMPTS))
    return path


def generated(run_dir: Path, out_file: Path, *args: str) -> dict[int, list[str]]:
    """`qdylora generate` into out_file; {rank: answers in prompt order}."""
    assert qdylora("generate", f"run_dir={run_dir}", f"out_file={out_file}", "overwrite=true", *args) == 0
    answers: dict[int, list[str]] = {}
    for line in out_file.read_text().splitlines():
        record = json.loads(line)
        answers.setdefault(record["rank"], []).append(record["answer"])
    return answers


@torch.no_grad()
def greedy_by_hand(model, tokenizer, text: str, rank: int, max_new_tokens: int) -> str:
    """Greedy decoding one token at a time, the whole sequence each step: no cache, no batch, no padding."""
    set_rank(model, rank)
    ids, new = tokenizer(text)["input_ids"], []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_one_rank_equals_a_hand_rolled_greedy_loop(run_dir, prompts_file, tmp_path, capsys):
    answers = generated(run_dir, tmp_path / "a.jsonl", f"prompts={prompts_file}", "rank=6", "max_new_tokens=8")
    model, tokenizer, _ = load_run_model(run_dir)
    # The tiny recipe trains with the plain template: the prompts get it too.
    expected = [greedy_by_hand(model, tokenizer, format_prompt("plain", i, x), 6, 8) for i, x in PROMPTS]
    assert answers == {6: expected}
    assert "rank 6" in capsys.readouterr().out
    answer = generated(run_dir, tmp_path / "b.jsonl", "prompt=Reverse the word.", "input=star", "rank=6",
                       "max_new_tokens=8")
    assert answer == {6: expected[:1]}


@pytest.mark.parametrize("sampling", [[], ["temperature=1.5", "top_p=0.95", "seed=3"]], ids=["greedy", "sampled"])
def test_several_ranks_in_one_call_equal_one_call_per_rank(run_dir, prompts_file, tmp_path, capsys, sampling):
    args = [f"prompts={prompts_file}", "max_new_tokens=10", "batch_size=2", *sampling]
    together = generated(run_dir, tmp_path / "all.jsonl", "rank=[0,2,8]", "ranks_per_pass=2", *args)
    table = capsys.readouterr().out
    assert all(f"rank {r}" in table for r in (0, 2, 8)), "the ranks' answers side by side in one table"
    for rank in (0, 2, 8):
        assert generated(run_dir, tmp_path / f"{rank}.jsonl", f"rank={rank}", *args) == {rank: together[rank]}
    assert together[0] != together[8], "the adapter must change the answers, or this test proves nothing"


def test_sampling_is_reproducible_and_follows_the_seed(run_dir, prompts_file, tmp_path):
    args = [f"prompts={prompts_file}", "rank=8", "max_new_tokens=12", "temperature=2.0"]
    first = generated(run_dir, tmp_path / "1.jsonl", *args, "seed=1")
    assert generated(run_dir, tmp_path / "2.jsonl", *args, "seed=1") == first
    assert generated(run_dir, tmp_path / "3.jsonl", *args, "seed=2") != first


def test_a_merged_export_answers_like_the_run_at_its_rank(run_dir, prompts_file, tmp_path, capsys):
    assert qdylora("export", f"run_dir={run_dir}", "rank=8", "format=merged") == 0
    merged = run_dir / "export" / "rank-8-merged"
    args = [f"prompts={prompts_file}", "max_new_tokens=8"]
    from_run = generated(run_dir, tmp_path / "run.jsonl", "rank=8", *args)
    assert generated(merged, tmp_path / "merged.jsonl", *args) == from_run
    assert "rank 8 (merged)" in capsys.readouterr().out
    assert qdylora("generate", f"run_dir={merged}", "rank=4", "prompt=x") == 2
    assert "is a merged export of rank 8" in capsys.readouterr().err


def test_prompt_text_is_taken_literally(run_dir):
    text = "What's 3, plus [4]? ${x} 'q' \\"
    cfg = compose_config("generate", [f"run_dir={run_dir}", f"prompt={text}", "input=a, b"])
    assert (cfg.prompt, cfg.input) == (text, "a, b")


def test_prompts_files(tmp_path):
    data = DataConfig(path="x", instruction_field="question", input_field="context")
    lines = tmp_path / "prompts.txt"
    lines.write_text("Reverse the word.\n\n  \nWhat is 3 plus 4?\n")
    assert read_prompts(lines, data) == [Prompt("Reverse the word."), Prompt("What is 3 plus 4?")]
    records = tmp_path / "prompts.jsonl"
    records.write_text('{"prompt": "a"}\n"b"\n{"question": "c", "context": "d"}\n')
    assert read_prompts(records, data) == [Prompt("a"), Prompt("b"), Prompt("c", "d")]
    records.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(QdyloraError, match=r"prompts.jsonl:2: no text field 'prompt' or 'question'"):
        read_prompts(records, data)


def test_the_run_template_or_raw_text():
    alpaca, plain = DataConfig(path="x", template="alpaca"), DataConfig(path="x", template="plain")
    prompt = Prompt("Reverse the word.", "star")
    assert model_text(prompt, alpaca, raw=False) == format_prompt("alpaca", "Reverse the word.", "star")
    assert model_text(prompt, plain, raw=False) == "Reverse the word.\nstar\n"
    assert model_text(prompt, alpaca, raw=True) == "Reverse the word.\nstar"


# --- sampling ------------------------------------------------------------------------------------------


def test_shared_noise_sampling_draws_from_the_tempered_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    sampler = SharedNoiseSampler(Sampling(temperature=0.7, top_p=0.95, seed=0), ["a"])
    draws = torch.tensor([int(sampler(None, logits).argmax()) for _ in range(6000)])
    tempered = logits[0] / 0.7
    kept = ~nucleus_mask(tempered, 0.95)
    assert kept.tolist() == [True, True, True, False, False]  # 0.762 + 0.183 < 0.95: the third token is in, the fourth not
    expected = tempered.masked_fill(~kept, float("-inf")).softmax(-1)
    observed = torch.bincount(draws, minlength=5) / len(draws)
    torch.testing.assert_close(observed, expected, atol=0.02, rtol=0)


def test_rows_of_one_prompt_share_their_noise_whatever_the_batch():
    sampling = Sampling(temperature=1.0, seed=5)
    scores = torch.zeros(3, 50)
    together = SharedNoiseSampler(sampling, ["p", "q", "p"])(None, scores)
    alone = SharedNoiseSampler(sampling, ["p"])(None, scores[:1])
    assert torch.equal(together[0], together[2]) and torch.equal(together[0], alone[0])
    assert not torch.equal(together[0], together[1])
