"""`qdylora eval` and `qdylora export` on short tiny runs: numbers against straightforward references."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from runners import qdylora
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qdylora_cli import train
from qdylora_cli.adapters import inject_adapters, iter_adapters, load_adapter_state_dict, rank_scale, set_rank
from qdylora_cli.cli import compose_config
from qdylora_cli.config import DataConfig, EvalConfig
from qdylora_cli.data import load_datasets
from qdylora_cli.errors import QdyloraError
from qdylora_cli.evaluate import (
    aurac,
    eval_dir,
    gsm8k_prediction,
    normalize_number,
    rank_figure,
    recommend,
)
from qdylora_cli.export import serving_note, vllm_max_lora_rank
from qdylora_cli.model import load_run_model
from qdylora_cli.multirank import generate_at_ranks
from qdylora_cli.rundir import load_adapter


def _train(run_dir, *extra):
    train.run(compose_config("train", ["+recipe=tiny", f"run_dir={run_dir}", "train.save_every=0",
                                       "train.eval_every=0", "train.batch_size=8", *extra]))
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("eval") / "lora", "train.max_steps=40")


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("eval") / "dora", "train.max_steps=15", "adapter.variant=dora",
                  "adapter.mode=full")


def _rows(out_dir):
    return {row["rank"]: row for row in json.loads((out_dir / "ranks.json").read_text())}


@torch.no_grad()
def reference_loss(model, examples, rank):
    """Mean token loss one example at a time at one rank: no batching, no padding, no rank sharing."""
    set_rank(model, rank)
    total, count = 0.0, 0
    for e in examples:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor(e["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1]
        total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


# --- eval ----------------------------------------------------------------------------------------------


def test_eval_sweep_matches_one_rank_at_a_time(lora_run, capsys):
    assert qdylora("eval", f"run_dir={lora_run}", "rank=1..8:3", "batch_size=3", "ranks_per_pass=2") == 0
    out = lora_run / "eval" / "loss-val"  # the default folder: task none (loss) on the run's validation data
    rows = _rows(out)
    assert sorted(rows) == [0, 1, 4, 7]  # the base model is always the reference
    model, tokenizer, _ = load_run_model(lora_run)
    run_cfg = compose_config("train", ["+recipe=tiny"])
    _, val = load_datasets(run_cfg.data, tokenizer, seed=run_cfg.train.seed)
    for rank in (0, 4, 7):
        assert rows[rank]["loss"] == pytest.approx(reference_loss(model, val, rank), rel=1e-5)
        assert rows[rank]["perplexity"] == pytest.approx(torch.tensor(rows[rank]["loss"]).exp().item(), rel=1e-6)
    assert rows[7]["loss"] < rows[0]["loss"] - 0.5, "training must have moved rank 7 away from the base"
    with open(out / "ranks.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in table] == [0, 1, 4, 7] and float(table[2]["loss"]) == pytest.approx(rows[4]["loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_rank"], summary["recommended_rank"]) == recommend(
        {r: row["loss"] for r, row in rows.items()}, higher_is_better=False, tolerance=0.01)
    assert summary["samples"] == len(val) and summary["ranked_by"] == "loss"
    assert (out / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "best rank:" in printed and "recommended" in printed and "base model" in printed


def test_aurac_of_hand_made_curves():
    """The mean height of the curve over x = log2(b) / log2(r_max), trapezoids between the ranks given."""
    curve = {0: 9.0, 1: 4.0, 2: 3.0, 4: 2.5, 8: 2.0, 16: 1.8}  # rank 0 (the base model) is left out
    assert aurac(curve, 16) == pytest.approx(0.25 * ((4 + 3) / 2 + (3 + 2.5) / 2 + (2.5 + 2) / 2 + (2 + 1.8) / 2))
    assert aurac(curve, 16) == pytest.approx(2.6)
    # Ranks 1, 2, 4, 8 of r_max 8: x = 0, 1/3, 2/3, 1.
    assert aurac({1: 4.0, 2: 3.0, 4: 2.5, 8: 2.0}, 8) == pytest.approx((3.5 + 2.75 + 2.25) / 3)
    # A rank between powers of two sits at log2(b): rank 3 of r_max 16 at x = log2(3)/4.
    x3 = math.log2(3) / 4
    assert aurac({1: 4.0, 3: 3.0, 16: 2.0}, 16) == pytest.approx(x3 * 3.5 + (1 - x3) * 2.5)
    # Part of the axis: the mean over the part the ranks cover (ranks 4..16: x from 1/2 to 1).
    assert aurac({4: 2.5, 8: 2.0, 16: 1.8}, 16) == pytest.approx((2.25 + 1.9) / 2)
    # Normalised: a curve linear in log2(b) from 4 at rank 1 to 2 at r_max has AURAC 3 whatever r_max and
    # whichever ranks are measured (powers of two, or all of 1..r_max).
    for r_max in (2, 8, 16, 64):
        line = {b: 4 - 2 * math.log2(b) / math.log2(r_max) for b in range(1, r_max + 1)}
        powers = {b: v for b, v in line.items() if b & (b - 1) == 0}
        assert aurac(line, r_max) == pytest.approx(3.0) and aurac(powers, r_max) == pytest.approx(3.0)
    assert aurac({5: 2.0}, 16) == 2.0 and aurac({1: 3.0}, 1) == 3.0 and aurac({0: 1.0}, 16) is None


def test_eval_summary_has_the_aurac_of_its_curve(lora_run, capsys):
    out = lora_run / "eval-aurac"
    assert qdylora("eval", f"run_dir={lora_run}", "rank=all", f"out_dir={out}") == 0
    rows, summary = _rows(out), json.loads((out / "summary.json").read_text())
    assert summary["aurac"] == {"ranks": [1, 8], "r_max": 8,
                                "loss": pytest.approx(aurac({r: row["loss"] for r, row in rows.items()}, 8), rel=1e-12)}
    assert f"AURAC (mean over log2 rank, ranks 1..8): loss {summary['aurac']['loss']:.4f}" in capsys.readouterr().out


def test_eval_never_replaces_results_without_overwrite(lora_run, capsys):
    out = lora_run / "eval-again"
    assert qdylora("eval", f"run_dir={lora_run}", "rank=2", f"out_dir={out}") == 0
    before = (out / "ranks.json").read_bytes()
    assert qdylora("eval", f"run_dir={lora_run}", "rank=3", f"out_dir={out}") == 2
    assert "already exists; pass overwrite=true" in capsys.readouterr().err
    assert (out / "ranks.json").read_bytes() == before
    assert qdylora("eval", f"run_dir={lora_run}", "rank=3", f"out_dir={out}", "overwrite=true") == 0
    assert sorted(_rows(out)) == [0, 3]


@pytest.mark.parametrize(
    ("rank", "message"),
    [
        ("9", "rank 9 is above the run's adapter.r_max (8)"),
        ("1..20", "rank 20 is above the run's adapter.r_max (8)"),
        ("5..2", "rank='5..2': expected LOW..HIGH[:STEP] with LOW <= HIGH"),
        ("1..8:0", "STEP >= 1"),
        ("two", "expected a rank spec like 8, 1..64"),
    ],
)
def test_eval_rank_errors(lora_run, capsys, rank, message):
    assert qdylora("eval", f"run_dir={lora_run}", f"rank={rank}", f"out_dir={lora_run / 'bad'}") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (lora_run / "bad").exists()


def test_eval_on_data_given_on_the_command_line_uses_all_of_it(lora_run, tmp_path):
    records = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in ("cat", "moon", "river")]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    assert qdylora("eval", f"run_dir={lora_run}", "rank=8", "data=json", f"data.path={path}", "data.template=plain",
                   f"out_dir={out}") == 0
    model, tokenizer, _ = load_run_model(lora_run)
    data = compose_config("train", ["+recipe=tiny", "data=json", f"data.path={path}", "data.template=plain",
                                    "data.val_fraction=0"]).data
    examples, _ = load_datasets(data, tokenizer, seed=0)
    assert len(examples) == 3
    assert _rows(out)[8]["loss"] == pytest.approx(reference_loss(model, examples, 8), rel=1e-5)


def test_multi_rank_generation_equals_one_rank_at_a_time(lora_run):
    model, tokenizer, _ = load_run_model(lora_run)
    prompts = ["What is 3 plus 4?\n", "Reverse the word.\nstar\n", "Write the word in capital letters.\nfrog\n"]
    together = generate_at_ranks(model, tokenizer, prompts, [0, 2, 8], max_new_tokens=6, device=torch.device("cpu"))
    for rank in (0, 2, 8):
        for prompt, text in zip(prompts, together[rank]):
            alone = generate_at_ranks(model, tokenizer, [prompt], [rank], max_new_tokens=6, device=torch.device("cpu"))
            assert alone[rank] == [text]
    assert together[0] != together[8]


def test_gsm8k_answers():
    assert normalize_number(" 1,234.50 ") == "1234.5" and normalize_number("$7.") == "7" and normalize_number("7.0") == "7"
    assert gsm8k_prediction("so she has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert gsm8k_prediction("Natalia sold 48/2 = 24 clips, 72 in all") == "72"
    assert gsm8k_prediction("no number here") == ""


def _task_file(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def test_gsm8k_exact_match_per_rank(lora_run, tmp_path):
    model, tokenizer, _ = load_run_model(lora_run)
    pairs = [(3, 4), (10, 2), (0, 5), (7, 7)]
    questions = [f"What is {a} plus {b}?" for a, b in pairs]
    prompts = [f"{q}\n" for q in questions]  # the tiny recipe's plain template
    reference = {r: generate_at_ranks(model, tokenizer, prompts, [r], 4, torch.device("cpu"))[r] for r in (0, 8)}
    # Gold answers: the rank-8 model's own answers for the first two, the true sums for the others,
    # so rank 8 scores at least 1/2 and the metric has something to tell apart.
    golds = [gsm8k_prediction(t) or "999" for t in reference[8][:2]] + [str(a + b) for a, b in pairs[2:]]
    path = _task_file(tmp_path, "gsm.jsonl", [{"question": q, "answer": f"steps\n#### {g}"} for q, g in zip(questions, golds)])
    args = ["task=gsm8k", "max_new_tokens=4", "data=json", f"data.path={path}", "data.template=plain",
            "data.instruction_field=question", "data.output_field=answer"]
    assert qdylora("eval", f"run_dir={lora_run}", "rank=8", *args) == 0
    out = lora_run / "eval" / "gsm8k-gsm"  # the default folder: the task and the data file's name
    rows = _rows(out)
    for r in (0, 8):
        expected = sum(gsm8k_prediction(t) == normalize_number(g) for t, g in zip(reference[r], golds)) / 4
        assert rows[r]["exact_match"] == expected
    assert rows[8]["exact_match"] >= 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["metric"], summary["ranked_by"], summary["samples"]) == ("exact_match", "exact_match", 4)
    # One adapted rank: its AURAC is its value, for the loss and the task score (rank 0 is left out).
    assert summary["aurac"] == {"ranks": [8, 8], "r_max": 8, "loss": rows[8]["loss"],
                                "exact_match": rows[8]["exact_match"]}

    # Every generation is kept with its reference and score, rank by rank, in the order of the file.
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(g["rank"], g["where"]) for g in generations] == [(r, f"{path}:{i + 1}") for r in (0, 8) for i in range(4)]
    for g in generations:
        i = int(g["where"].rsplit(":", 1)[1]) - 1
        assert g["prompt"] == prompts[i] and g["reference"] == f"steps\n#### {golds[i]}"
        assert g["generation"] == reference[g["rank"]][i] and g["prediction"] == gsm8k_prediction(g["generation"])
        assert g["correct"] == (g["prediction"] == normalize_number(golds[i]))
    assert sum(g["correct"] for g in generations if g["rank"] == 8) == rows[8]["exact_match"] * 4


def test_a_flat_task_metric_leaves_the_rank_to_the_loss(lora_run, tmp_path):
    path = _task_file(tmp_path, "nothing.jsonl", [{"question": f"What is {a} plus 1?", "answer": "#### 123456"}
                                                  for a in range(3)])
    out = tmp_path / "out"
    assert qdylora("eval", f"run_dir={lora_run}", "rank=[1,4,8]", "task=gsm8k", "max_new_tokens=3", "data=json",
                   f"data.path={path}", "data.template=plain", "data.instruction_field=question",
                   "data.output_field=answer", f"out_dir={out}") == 0
    rows, summary = _rows(out), json.loads((out / "summary.json").read_text())
    assert {rows[r]["exact_match"] for r in (1, 4, 8)} == {0.0}
    assert summary["ranked_by"] == "loss"
    assert len({rows[r]["loss"] for r in (1, 4, 8)}) == 3, "the losses must decide"
    # AURAC of both curves, ranks 1, 4, 8 of r_max 8 at x = 0, 2/3, 1: trapezoids by hand.
    loss = {r: rows[r]["loss"] for r in (1, 4, 8)}
    by_hand = (2 / 3) * (loss[1] + loss[4]) / 2 + (1 / 3) * (loss[4] + loss[8]) / 2
    assert summary["aurac"] == {"ranks": [1, 8], "r_max": 8, "loss": pytest.approx(by_hand, rel=1e-12),
                                "exact_match": 0.0}
    assert summary["best_rank"] == min((1, 4, 8), key=lambda r: rows[r]["loss"])


def test_mcq_accuracy_per_rank(lora_run, tmp_path):
    model, tokenizer, _ = load_run_model(lora_run)
    records = [
        {"question": "What is the first letter of cat?", "choices": ["d", "c", "x"], "answer": "B"},
        {"question": "What is 2 plus 2?", "choices": ["4", "5"], "answer": 0},
        {"question": "Reverse the word sun.", "choices": ["sun", "nus", "snu", "usn"], "answer": "nus"},
    ]
    path = _task_file(tmp_path, "mcq.jsonl", records)
    out = tmp_path / "out"
    assert qdylora("eval", f"run_dir={lora_run}", "rank=[4,8]", "task=mcq", "data=json", f"data.path={path}",
                   "data.template=plain", "data.instruction_field=question", "data.output_field=answer",
                   f"out_dir={out}") == 0
    rows = _rows(out)
    letters = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCD"]
    gold = [1, 0, 1]
    for rank in (0, 4, 8):
        set_rank(model, rank)
        correct = 0
        for r, g in zip(records, gold):
            listed = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(r["choices"]))
            prompt = f"{r['question']}\n{listed}\nAnswer with the letter of the correct choice.\n"
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, -1]
            correct += int(logits[letters[: len(r["choices"])]].argmax()) == g
        assert rows[rank]["accuracy"] == pytest.approx(correct / 3)


def test_task_input_errors(lora_run, tmp_path, capsys):
    path = _task_file(tmp_path, "gsm.jsonl", [{"question": "q", "answer": "42"}])
    assert qdylora("eval", f"run_dir={lora_run}", "task=gsm8k", "data=json", f"data.path={path}",
                   "data.instruction_field=question", "data.output_field=answer", f"out_dir={tmp_path / 'o'}") == 2
    assert f"{path}:1: field 'answer' must be a GSM8K answer ending in '#### N'" in capsys.readouterr().err
    path = _task_file(tmp_path, "mcq.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "C"}])
    assert qdylora("eval", f"run_dir={lora_run}", "task=mcq", "data=json", f"data.path={path}",
                   "data.instruction_field=question", "data.output_field=answer", f"out_dir={tmp_path / 'o'}") == 2
    assert f"{path}:1: field 'answer'='C': expected a choice letter" in capsys.readouterr().err


def test_recommend():
    losses = {0: 6.0, 1: 4.0, 2: 3.5, 4: 3.02, 8: 3.0}
    assert recommend(losses, higher_is_better=False, tolerance=0.01) == (8, 4)
    assert recommend(losses, higher_is_better=False, tolerance=0.0) == (8, 8)
    assert recommend({0: 0.1, 1: 0.5, 2: 0.6, 4: 0.6}, higher_is_better=True, tolerance=0.2) == (2, 1)
    assert recommend({0: 1.0}, higher_is_better=False, tolerance=0.01) is None
    # A tie in the task metric goes to the lower loss; a flat metric (all zero) leaves it all to the loss.
    assert recommend({0: 0.1, 1: 0.5, 2: 0.6, 4: 0.6}, True, 0.0, losses={0: 5, 1: 4, 2: 3.5, 4: 3.2}) == (4, 2)
    assert recommend({0: 0.0, 1: 0.0, 2: 0.0, 4: 0.0}, True, 0.01, losses=losses) == (4, 4)


def test_eval_folders_are_named_by_task_and_data():
    run = "runs/x"
    assert eval_dir(EvalConfig(run_dir=run)) == Path(run, "eval", "loss-val")
    gsm8k = DataConfig(path="/data/gsm8k_test.jsonl")
    assert eval_dir(EvalConfig(run_dir=run, task="gsm8k", data=gsm8k)) == Path(run, "eval", "gsm8k-gsm8k_test")
    other = DataConfig(path="train.jsonl", val_path="held/out.json")
    assert eval_dir(EvalConfig(run_dir=run, data=other)) == Path(run, "eval", "loss-out")
    assert eval_dir(EvalConfig(run_dir=run, data=DataConfig(path="yahma/alpaca-cleaned"))).name == "loss-alpaca-cleaned"
    assert eval_dir(EvalConfig(run_dir=run, data=DataConfig(path="builtin:tiny-instructions"))).name == "loss-tiny-instructions"
    assert eval_dir(EvalConfig(run_dir=run, task="mcq", data=gsm8k, out_dir="mine")) == Path("mine")


def _rows_for_plot(base_loss):
    losses = {0: base_loss, 1: 3.9, 2: 3.7, 4: 3.5, 8: 3.45}
    return [{"rank": r, "loss": v} for r, v in losses.items()]


def test_plot_keeps_the_curve_readable_and_both_markers_visible():
    far = rank_figure(_rows_for_plot(6.0), "loss", (8, 8), "t", "the run's validation data")
    ax = far.axes[0]
    assert ax.get_ylabel() == "loss on the run's validation data"
    low, high = ax.get_ylim()
    assert high < 4.5, "a base model far above must not squash the curve"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "base model (no adapter): 6, off the chart above" in legend
    assert "best: rank 8" in legend and "recommended: rank 8" in legend
    markers = {line.get_label(): line for line in ax.get_lines()}
    best, chosen = markers["best: rank 8"], markers["recommended: rank 8"]
    assert list(best.get_xdata()) == list(chosen.get_xdata()) == [8]
    # Same rank: the star is larger and hollow, the diamond drawn on top of it, so both stay visible.
    assert best.get_markersize() > 2 * chosen.get_markersize() and best.get_markerfacecolor() == "none"
    assert chosen.get_zorder() > best.get_zorder()

    near = rank_figure(_rows_for_plot(4.0), "loss", (8, 4), "t", "x.jsonl").axes[0]
    assert "base model (no adapter)" in [t.get_text() for t in near.get_legend().get_texts()]
    assert near.get_ylim()[1] > 4.0, "a base model near the curve is drawn as a line"


# --- export --------------------------------------------------------------------------------------------


def _float_base(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir / "base_model").eval()


def peft_and_ours(peft, base_dir: Path, run_dir: Path, export: Path, rank: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(our adapter at `rank`, PEFT's load of the export), each on its own copy of the unquantized base in
    `base_dir`: the two must compute the same function. test_architectures.py uses it too."""
    weights, meta = load_adapter(run_dir / "adapter")
    ours = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    inject_adapters(ours, r_max=meta["r_max"], alpha=meta["alpha"], mode=meta["mode"], variant=meta["variant"],
                    scale=meta["scale"])
    load_adapter_state_dict(ours, weights)
    set_rank(ours, rank)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), str(export)).eval()
    return ours, theirs


# lora_alpha of the rank-5 export for the tiny recipe's α 32, r_max 8, by hand: s(5)·5, so that a plain
# LoRA's lora_alpha/r is our s(5) (α/5; α/√(8·5); α/8).
LORA_ALPHA_AT_5 = {"alpha_over_rank": 32.0, "rank_stabilized": 32.0 * (5 / 8) ** 0.5, "constant": 20.0}


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    """A short tiny run per (variant, adapter.scale), trained on first use and shared by the tests here."""
    runs = {}

    def get(variant, scale):
        if (variant, scale) not in runs:
            runs[variant, scale] = _train(tmp_path_factory.mktemp("scale") / f"{variant}-{scale}", "train.max_steps=8",
                                          f"adapter.variant={variant}", f"adapter.scale={scale}")
        return runs[variant, scale]

    return get


def _export_rank_5(run_dir):
    assert qdylora("export", f"run_dir={run_dir}", "rank=5", "overwrite=true") == 0
    out = run_dir / "export" / "rank-5-peft"
    return out, json.loads((out / "adapter_config.json").read_text())


def _ours_at_5(run_dir):
    """Our model at rank 5 on the unquantized base, the one both sides get."""
    weights, meta = load_adapter(run_dir / "adapter")
    ours = _float_base(run_dir)
    inject_adapters(ours, r_max=8, alpha=32.0, mode=meta["mode"], variant=meta["variant"], scale=meta["scale"])
    load_adapter_state_dict(ours, weights)
    set_rank(ours, 5)
    return ours.eval(), meta


@pytest.mark.parametrize("scale", list(LORA_ALPHA_AT_5))
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_peft_export_equals_our_model_at_that_rank(variant, scale, scale_run, capsys):
    peft = pytest.importorskip("peft")
    run_dir = scale_run(variant, scale)
    capsys.readouterr()
    out, config = _export_rank_5(run_dir)
    # Plain LoRA fields whatever the scale: lora_alpha/r is s(5), no use_rslora for a runtime to ignore.
    assert (config["r"], config["use_dora"], config["use_rslora"]) == (5, variant == "dora", False)
    assert config["lora_alpha"] == pytest.approx(LORA_ALPHA_AT_5[scale], rel=1e-12)
    assert config["lora_alpha"] / config["r"] == pytest.approx(rank_scale(scale, 32.0, 8, 5), rel=1e-6)
    printed = capsys.readouterr().out
    assert ("vLLM does not serve DoRA" if variant == "dora" else "vLLM --max-lora-rank 8 or more") in printed
    ours, meta = _ours_at_5(run_dir)
    assert config["target_modules"] == meta["target_modules"]

    theirs = peft.PeftModel.from_pretrained(_float_base(run_dir), str(out)).eval()
    scalings = {m.scaling["default"] for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert scalings == {config["lora_alpha"] / 5}
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        plain = _float_base(run_dir)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2, "the adapter must change the output, or this test proves nothing"


@pytest.mark.parametrize("scale", list(LORA_ALPHA_AT_5))
def test_peft_export_is_exact_where_only_r_and_lora_alpha_are_read(scale, scale_run):
    """What llama.cpp does with a PEFT adapter (convert_lora_to_gguf.py, then its runtime): one
    `lora_alpha`, stored as float32, and each tensor's own rank, W + B·A·(lora_alpha/rank); `use_rslora`
    is never read. That must be our rank-5 delta in every layer, and our model's output."""
    run_dir = scale_run("lora", scale)
    out, config = _export_rank_5(run_dir)
    alpha = torch.tensor(config["lora_alpha"], dtype=torch.float32).item()
    factors = load_file(str(out / "adapter_model.safetensors"))
    ours, meta = _ours_at_5(run_dir)
    theirs = _float_base(run_dir)
    with torch.no_grad():
        for name, adapter in iter_adapters(ours):
            a, b = factors[f"base_model.model.{name}.lora_A.weight"], factors[f"base_model.model.{name}.lora_B.weight"]
            delta = (alpha / b.shape[1]) * (b @ a)
            torch.testing.assert_close(delta, adapter.merged_linear(5).weight - adapter.base.weight, rtol=1e-5, atol=1e-7)
            theirs.get_submodule(name).weight += delta
        assert len(factors) == 2 * len(meta["target_modules"])
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_matryoshka_run_exports_every_rank_and_peft_loads_each(tmp_path, capsys):
    """Trained with nested mixtures (rank_schedule=matryoshka), evaluated and exported as plain ranks: the
    PEFT export at each rank 1..8 loads and computes our adapter at that rank, A[:b], B[:, :b], s(b)."""
    peft = pytest.importorskip("peft")
    run_dir = _train(tmp_path / "matryoshka", "train.max_steps=8", "rank_schedule=matryoshka", "adapter.dropout=0")
    config = compose_config("train", ["+recipe=tiny", "rank_schedule=matryoshka"])
    assert (config.rank_schedule.nested_ranks, config.rank_schedule.kind) == ([1, 2, 4, 8], "matryoshka")
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = _float_base(run_dir)(input_ids=ids).logits
    for b in range(1, 9):
        assert qdylora("export", f"run_dir={run_dir}", f"rank={b}") == 0
        out = run_dir / "export" / f"rank-{b}-peft"
        exported = json.loads((out / "adapter_config.json").read_text())
        assert exported["r"] == b and exported["lora_alpha"] == pytest.approx(rank_scale("rank_stabilized", 32.0, 8, b) * b)
        ours, theirs = peft_and_ours(peft, run_dir / "base_model", run_dir, out, b)
        with torch.no_grad():
            expected, got = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (got - plain).abs().max() > 1e-2, f"rank {b} must have trained"
    capsys.readouterr()


def test_vllm_max_lora_rank_is_the_smallest_cap_that_holds_the_rank():
    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 16, 17, 64, 300, 320, 321, 512)] == [
        8, 8, 16, 16, 32, 64, 320, 320, 512, 512]
    assert vllm_max_lora_rank(513) is None
    # an allocation's largest rank may be in rank_pattern rather than r
    config = {"use_dora": False, "r": 4, "rank_pattern": {"model\\.layers\\.0\\.mlp\\.up_proj": 17}}
    assert serving_note(config) == ("serve it with vLLM --max-lora-rank 32 or more (its largest rank is 17); only once "
                                    "exported with pad=true: vLLM reads no rank_pattern and would scale every layer by lora_alpha/r")
    assert serving_note({**config, "r": 17, "rank_pattern": {}}) == (
        "serve it with vLLM --max-lora-rank 32 or more (its largest rank is 17)")  # one rank (padded): nothing to add
    assert "above its largest --max-lora-rank (512)" in serving_note({**config, "r": 600})
    assert serving_note({**config, "use_dora": True}) == "vLLM does not serve DoRA adapters"


def test_merged_export_equals_the_quantized_run_and_evaluates_the_same(lora_run, capsys):
    assert qdylora("export", f"run_dir={lora_run}", "rank=8", "format=merged") == 0
    merged_dir = lora_run / "export" / "rank-8-merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    model, _, _ = load_run_model(lora_run)
    set_rank(model, 8)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    assert qdylora("eval", f"run_dir={lora_run}", "rank=8", f"out_dir={lora_run / 'eval-r8'}") == 0
    assert qdylora("eval", f"run_dir={merged_dir}") == 0
    assert _rows(merged_dir / "eval" / "loss-val")[8]["loss"] == pytest.approx(_rows(lora_run / "eval-r8")[8]["loss"], rel=1e-5)
    assert qdylora("eval", f"run_dir={merged_dir}", "rank=4") == 2
    assert "is a merged export of rank 8" in capsys.readouterr().err


def test_merged_dora_export_equals_the_quantized_run(dora_run):
    assert qdylora("export", f"run_dir={dora_run}", "rank=6", "format=merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(dora_run / "export" / "rank-6-merged").eval()
    model, _, _ = load_run_model(dora_run)
    set_rank(model, 6)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_merged_rank_zero_is_the_dequantized_base_in_the_chosen_dtype(lora_run):
    assert qdylora("export", f"run_dir={lora_run}", "rank=0", "format=merged", "dtype=bfloat16") == 0
    out = lora_run / "export" / "rank-0-merged"
    tensors = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model, _, _ = load_run_model(lora_run)
    set_rank(model, 0)
    layer = "model.layers.0.self_attn.q_proj"
    expected = model.get_submodule(layer).base.dequantize().to(torch.bfloat16)
    assert torch.equal(tensors[f"{layer}.weight"], expected)


def test_export_never_overwrites_without_overwrite(lora_run, capsys):
    assert qdylora("export", f"run_dir={lora_run}", "rank=3") == 0
    out = lora_run / "export" / "rank-3-peft"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert qdylora("export", f"run_dir={lora_run}", "rank=3") == 2
    assert "rank-3-peft already exists; pass overwrite=true to replace it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert qdylora("export", f"run_dir={lora_run}", "rank=3", "overwrite=true") == 0
    assert qdylora("export", f"run_dir={lora_run}", "rank=9") == 2
    assert "rank=9: expected a rank in 1..8" in capsys.readouterr().err
    with pytest.raises(QdyloraError, match="rank=0: expected a rank in 1..8"):
        compose_config("export", [f"run_dir={lora_run}", "rank=0"])


# --- a real pretrained model ---------------------------------------------------------------------------


def test_stories260k_export_and_eval(stories260k, shakespeare, tmp_path):
    peft = pytest.importorskip("peft")
    run_dir = tmp_path / "stories"
    train.run(compose_config("train", [
        "model=hf", f"model.name_or_path={stories260k}", "model.dtype=float32", "data=text",
        f"data.path={shakespeare}", "data.block_size=64", "data.val_fraction=0.01", "data.max_samples=200",
        "optimizer=adamw", "optimizer.lr=3e-3", "adapter.r_max=8", "adapter.alpha=16", f"run_dir={run_dir}",
        "train.max_steps=20", "train.batch_size=8", "train.grad_accum=1", "train.save_every=0",
        "train.eval_every=0", "train.mixed_precision=no", "train.gradient_checkpointing=false",
    ]))
    assert qdylora("eval", f"run_dir={run_dir}", "rank=[2,8]", "max_batches=4") == 0
    rows = _rows(run_dir / "eval" / "loss-val")
    assert rows[8]["loss"] < rows[0]["loss"]
    assert qdylora("export", f"run_dir={run_dir}", "rank=2") == 0
    ours, theirs = peft_and_ours(peft, stories260k, run_dir, run_dir / "export" / "rank-2-peft", 2)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
