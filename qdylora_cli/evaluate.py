"""`qdylora eval`: the quality of many ranks of one run, and the rank to pick.

Every rank is measured in the same forward passes (multirank.py): the losses, and for a task the
generated answers and their scores. The summary names the rank to pick and the area under the
rank-quality curve (AURAC).

Results go to RUN_DIR/eval/<task>-<data name> (or out_dir), written atomically: ranks.json,
ranks.csv, ranks.png, summary.json, and for a task generations.jsonl (every answer, scored).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from qdylora_cli.chat import (
    ChatTemplate,
    TurnEnd,
    find_turn_end,
    generation_prompt,
    parse_messages,
    resolve_template,
    tokenize_conversations,
)
from qdylora_cli.config import (
    DataConfig,
    EvalConfig,
    is_chat,
    parse_rank_spec,
)
from qdylora_cli.data import (
    eval_batches,
    format_prompt,
    load_datasets,
    pad_token_id,
    read_records,
    split_indices,
    tokenize_pairs,
)
from qdylora_cli.errors import QdyloraError
from qdylora_cli.multirank import (
    LETTERS,
    generate_at_ranks,
    groups,
    load_run_or_export,
    mcq_predictions,
    rank_losses,
)
from qdylora_cli.rundir import (
    EVAL,
    atomic_dir,
    check_writable,
    load_eval_source,
    note_if_training,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TASK_METRIC = {"gsm8k": "exact_match", "mcq": "accuracy"}  # higher is better; task none ranks by loss
GENERATIONS = "generations.jsonl"  # a task's every answer, per rank, with its reference and score


# --- task metrics --------------------------------------------------------------------------------------


@dataclass
class TaskExample:
    where: str  # file:line, for error messages
    prompt: str  # chat data: rendered from `messages` once the tokenizer is loaded
    target: str  # the text whose loss is measured: the reference answer, or the correct letter
    gold: str | int  # gsm8k: the normalised number; mcq: the index of the correct choice
    n_choices: int = 0  # mcq only
    messages: list[dict[str, str]] | None = None  # chat data: the conversation up to the answer


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(text: str) -> str:
    """`1,234.50` -> `1234.5`, `$7.` -> `7`: numbers compare equal however they are written."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def gsm8k_prediction(generated: str) -> str:
    """The answer in a generation: what follows the last `####`, else the last number in the text."""
    if "####" in generated:
        tail = generated.rsplit("####", 1)[1].strip()
        return normalize_number(tail.split()[0] if tail.split() else "")
    numbers = _NUMBER.findall(generated)
    return normalize_number(numbers[-1]) if numbers else ""


def _mcq_gold(where: str, answer: Any, choices: list[str], name: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str):
        text = answer.strip()
        if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
            return LETTERS.index(text.upper())
        if text in choices:
            return choices.index(text)
    raise QdyloraError(
        f"{where}: {name}={answer!r}: expected a choice letter, a 0-based index below {len(choices)} or a choice's text"
    )


def _task_example(task: str, where: str, record: Any, data: DataConfig, choices_field: str) -> TaskExample:
    """One scored example. Chat records: the last message is the assistant's reference answer."""
    if is_chat(data):
        messages = parse_messages(where, record, data)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise QdyloraError(f"{where}: the last message must be the assistant's reference answer to a question")
        answer, name = messages[-1]["content"], "the last message"
    else:
        if not isinstance(record, dict):
            raise QdyloraError(f"{where}: expected a JSON object, got {type(record).__name__}")
        question = record.get(data.instruction_field)
        if not isinstance(question, str):
            raise QdyloraError(f"{where}: missing text field {data.instruction_field!r} (set data.instruction_field)")
        answer, name = record.get(data.output_field), f"field {data.output_field!r}"
    if task == "gsm8k":
        if not isinstance(answer, str) or "####" not in answer:
            raise QdyloraError(f"{where}: {name} must be a GSM8K answer ending in '#### N'")
        gold = normalize_number(answer.rsplit("####", 1)[1])
        if not gold:
            raise QdyloraError(f"{where}: {name} has nothing after '####'")
        target, n_choices, ask = answer, 0, ""
    else:
        choices = record.get(choices_field)
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
            raise QdyloraError(f"{where}: field {choices_field!r} must be a list of 2 to 26 strings (set choices_field)")
        gold = _mcq_gold(where, answer, choices, name)
        listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        target, n_choices, ask = LETTERS[gold], len(choices), f"\n{listed}\nAnswer with the letter of the correct choice."
    if is_chat(data):  # the choices follow the question, the message before the answer
        asked = [*messages[:-2], {**messages[-2], "content": messages[-2]["content"] + ask}]
        return TaskExample(where, "", target, gold, n_choices, messages=asked)
    prompt = format_prompt(data.template, question + ask, record.get(data.input_field) or "")
    return TaskExample(where, prompt, target, gold, n_choices)


def task_examples(cfg: EvalConfig, data: DataConfig, seed: int, held_out: bool) -> list[TaskExample]:
    """The task's examples: the held-out records of the run's data, or every record of `data=...`."""
    if data.format == "text":
        raise QdyloraError(f"task={cfg.task} needs question/answer records, not a text corpus (data.format=text)")
    if data.val_path is not None:
        records = read_records(data, data.val_path)
    else:
        records = read_records(data, data.path)[: data.max_samples]
        if held_out:
            records = [records[i] for i in split_indices(len(records), data.val_fraction, seed)[1]]
    examples = [_task_example(cfg.task, where, r, data, cfg.choices_field) for where, r in records]
    examples = examples[: cfg.max_samples]
    if not examples:
        raise QdyloraError(f"task={cfg.task}: no examples to score in {data.val_path or data.path}")
    return examples


def task_scores(
    model: Any, tokenizer: Any, examples: list[TaskExample], task: str, ranks: Sequence[int], cfg: EvalConfig,
    device: torch.device, turn_end: TurnEnd | None = None,
) -> tuple[dict[int, float], list[dict]]:
    """Exact match (gsm8k) or accuracy (mcq) per rank, in [0, 1], and one record per (example, rank):
    what the rank generated (or the letter it picked), the reference and whether it scored.
    `turn_end`: chat prompts (see generate_at_ranks)."""
    correct = dict.fromkeys(ranks, 0)
    generations = []
    batches = [examples[i : i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    for batch in track(batches, description=f"{task} ({len(ranks)} ranks)", transient=True):
        prompts = [e.prompt for e in batch]
        for idx in groups(len(ranks), cfg.ranks_per_pass):
            group = [ranks[i] for i in idx]
            if task == "gsm8k":
                texts = generate_at_ranks(model, tokenizer, prompts, group, cfg.max_new_tokens, device,
                                          turn_end=turn_end)
                answers = {r: [(t, gsm8k_prediction(t)) for t in texts[r]] for r in group}
            else:
                picks = mcq_predictions(model, tokenizer, prompts, [e.n_choices for e in batch], group, device,
                                        chat=turn_end is not None)
                answers = {r: [(LETTERS[p], p) for p in picks[r]] for r in group}
            for r in group:
                for e, (generated, predicted) in zip(batch, answers[r]):
                    hit = predicted == e.gold
                    correct[r] += hit
                    generations.append({
                        "rank": r, "where": e.where, "prompt": e.prompt, "reference": e.target,
                        "gold": e.gold if task == "gsm8k" else LETTERS[e.gold],
                        "generation": generated, "prediction": predicted if task == "gsm8k" else LETTERS[predicted],
                        "correct": bool(hit),
                    })
    generations.sort(key=lambda g: g["rank"])  # stable: examples keep their order within a rank
    return {r: correct[r] / len(examples) for r in ranks}, generations


# --- choosing a rank -----------------------------------------------------------------------------------


def metric_is_flat(scores: dict[int, float]) -> bool:
    """Several adapted ranks all score the same (e.g. an exact match of 0 everywhere): the metric picks none."""
    values = [v for r, v in scores.items() if r > 0]
    return len(values) > 1 and len(set(values)) == 1


def recommend(
    scores: dict[int, float], higher_is_better: bool, tolerance: float, losses: dict[int, float] | None = None
) -> tuple[int, int] | None:
    """(best rank, smallest rank within `tolerance` (relative) of the best) among ranks > 0; None if none.

    With `losses` beside a task metric, a tie in the metric goes to the lower loss, and a flat
    metric leaves the choice to the loss alone: an exact match of 0 at every rank says nothing.
    """
    ranks = sorted(r for r in scores if r > 0)
    if not ranks:
        return None
    if losses is not None and metric_is_flat(scores):
        return recommend({r: losses[r] for r in ranks}, higher_is_better=False, tolerance=tolerance)
    if higher_is_better:
        tie_break = losses or {}
        best = max(ranks, key=lambda r: (scores[r], -tie_break.get(r, 0.0), -r))
        good = [r for r in ranks if scores[r] >= scores[best] * (1 - tolerance)]
    else:
        best = min(ranks, key=lambda r: (scores[r], r))
        good = [r for r in ranks if scores[r] <= scores[best] * (1 + tolerance)]
    return best, min(good)


# --- the whole curve: AURAC ------------------------------------------------------------------------------


def aurac(values: Mapping[int, float], r_max: int) -> float | None:
    """The area under the rank curve `values` (rank -> loss or score; rank 0 is left out), normalised.

    The rank axis is x = log2(b) / log2(r_max), 0 at rank 1 and 1 at r_max, so every octave of ranks
    counts the same (ranks 1, 2, 4, ..., r_max are equally spaced) and runs of any r_max share one
    axis. The curve is joined linearly between the ranks given (trapezoids) and the area divided by
    the width of x they cover: the curve's mean height, in the metric's unit. With ranks 1..r_max that
    is the area under the curve on [0, 1]; one rank alone (or r_max 1) gives its value. None: no rank.
    """
    points = sorted((b, v) for b, v in values.items() if b > 0)
    if not points:
        return None
    if len(points) == 1 or r_max <= 1:
        return statistics.fmean(v for _, v in points)
    xs = [math.log2(b) / math.log2(r_max) for b, _ in points]
    area = sum((x1 - x0) * (v0 + v1) / 2 for (x0, (_, v0)), (x1, (_, v1)) in zip(
        zip(xs, points, strict=True), zip(xs[1:], points[1:], strict=True), strict=False))
    return area / (xs[-1] - xs[0])


# --- output --------------------------------------------------------------------------------------------


def base_in_view(values: list[float], base: float) -> bool:
    """Whether the base model's line can share the axis with the curve without squashing it: it lies
    within one curve height of the curve (10% of the value for a single point)."""
    low, high = min(values), max(values)
    margin = (high - low) or abs(high) * 0.1
    return low - margin <= base <= high + margin


def rank_figure(rows: list[dict], metric: str, pick: tuple[int, int] | None, title: str, data_name: str) -> Figure:
    """The metric against the rank: the base model as a line (or a legend note when far off), best and recommended.

    A bare Figure, not pyplot: no display backend and no global figure to close.
    """
    from matplotlib.figure import Figure

    adapted = [r for r in rows if r["rank"] > 0]
    values = [r[metric] for r in adapted]
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    ax.plot([r["rank"] for r in adapted], values, "o-", label="QDyLoRA at rank b")
    base = next((r[metric] for r in rows if r["rank"] == 0), None)
    if base is not None and (not values or base_in_view(values, base)):
        ax.axhline(base, color="gray", linestyle="--", label="base model (no adapter)")
    elif base is not None:
        above = base > max(values)
        ax.plot([], [], "^" if above else "v", color="gray",
                label=f"base model (no adapter): {base:.4g}, off the chart {'above' if above else 'below'}")
    if pick is not None:
        best, chosen = (next(r for r in rows if r["rank"] == b) for b in pick)
        # A large hollow star under a small filled diamond: both stay visible when they mark the same rank.
        ax.plot(best["rank"], best[metric], "*", markersize=20, markerfacecolor="none", markeredgecolor="tab:red",
                markeredgewidth=1.5, zorder=3, clip_on=False, label=f"best: rank {best['rank']}")
        ax.plot(chosen["rank"], chosen[metric], "D", color="tab:green", markersize=6, zorder=4, clip_on=False,
                label=f"recommended: rank {chosen['rank']}")
    ax.set_xlabel("rank b")
    ax.set_ylabel(f"{metric.replace('_', ' ')} on {data_name}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def write_results(
    out: Path, rows: list[dict], summary: dict, metric: str, overwrite: bool, title: str,
    generations: list[dict] | None = None,
) -> None:
    """ranks.json, ranks.csv, ranks.png, summary.json (and generations.jsonl for a task), all or nothing."""
    pick = (summary["best_rank"], summary["recommended_rank"]) if summary["best_rank"] is not None else None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "ranks.json").write_text(json.dumps(rows, indent=1))
        with open(tmp / "ranks.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        if generations is not None:
            (tmp / GENERATIONS).write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
        rank_figure(rows, metric, pick, title, summary["data"]).savefig(tmp / "ranks.png", dpi=120)


def print_table(rows: list[dict], summary: dict, metric: str) -> None:
    table = Table(title=f"{summary['run_dir']} on {summary['data']} ({summary['samples']} samples)")
    columns = [k for k in rows[0] if k != "rank"]
    table.add_column("rank", justify="right")
    for name in columns:
        table.add_column(name.replace("_", " "), justify="right")
    table.add_column("")
    for row in rows:
        note = "base model" if row["rank"] == 0 else ""
        if row["rank"] == summary["recommended_rank"]:
            note = "recommended" + (" and best" if row["rank"] == summary["best_rank"] else "")
        elif row["rank"] == summary["best_rank"]:
            note = "best"
        table.add_row(str(row["rank"]), *(f"{row[c]:.4f}" for c in columns), note,
                      style="bold" if note.startswith("recommended") else None)
    console = Console()
    console.print(table)
    if summary["best_rank"] is not None and sum(r["rank"] > 0 for r in rows) > 1:
        best, rec, key = summary["best_rank"], summary["recommended_rank"], summary["ranked_by"]
        by = {r["rank"]: r[key] for r in rows}
        flat = "" if key == metric else f"; every rank has the same {metric.replace('_', ' ')}, so the loss decides"
        console.print(f"best rank: {best} ({key} {by[best]:.4f}); recommended: rank {rec} ({key} {by[rec]:.4f}, "
                      f"the smallest within {summary['tolerance']:.1%} of the best){flat}")
    area = summary.get("aurac")
    if area and area["ranks"][0] < area["ranks"][1]:
        values = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in area.items() if k not in ("ranks", "r_max"))
        console.print(f"AURAC (mean over log2 rank, ranks {area['ranks'][0]}..{area['ranks'][1]}): {values}")


# --- the command ---------------------------------------------------------------------------------------


def data_name(data: DataConfig | None) -> str:
    """`val` for the run's own validation data, else the stem of the data file (or hub id), as a folder name."""
    if data is None:
        return "val"
    source = (data.val_path or data.path).removeprefix("builtin:")
    return re.sub(r"[^\w.-]+", "_", Path(source).stem) or "data"


def eval_dir(cfg: EvalConfig) -> Path:
    """`out_dir`, else RUN_DIR/eval/<task>-<data name> (task none: `loss`), so evals of other data or
    tasks never collide: `eval/loss-val`, `eval/gsm8k-gsm8k_test`."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    task = "loss" if cfg.task == "none" else cfg.task
    return Path(cfg.run_dir) / EVAL / f"{task}-{data_name(cfg.data)}"


def _loss_batches(cfg: EvalConfig, run_cfg: Any, tokenizer: Any, examples: list[TaskExample] | None,
                  template: ChatTemplate | None) -> list[dict]:
    if examples is not None and template is not None:  # chat: the loss of the answer as the assistant's turn
        conversations = [(e.where, [*e.messages, {"role": "assistant", "content": e.target}]) for e in examples]
        val = [e for e in tokenize_conversations(tokenizer, template, conversations, cfg.data or run_cfg.data)[0] if e is not None]
    elif examples is not None:
        data = cfg.data or run_cfg.data
        val = tokenize_pairs(tokenizer, [e.prompt for e in examples], [e.target for e in examples], data)
    elif cfg.data is None:  # the run's own held-out rows, read from its cached tokens (only those rows)
        val = load_datasets(run_cfg.data, tokenizer, seed=run_cfg.train.seed)[1]
        if not val:
            raise QdyloraError(f"{cfg.run_dir} was trained without validation data (data.val_fraction=0); pass data=...")
    else:  # data=... on the command line: all of it is evaluation data
        data = cfg.data if cfg.data.val_path is not None else dataclasses.replace(cfg.data, val_fraction=0.0)
        train, val = load_datasets(data, tokenizer, seed=run_cfg.train.seed)
        val = val if cfg.data.val_path is not None else train
    return eval_batches(val, cfg.batch_size, pad_token_id(tokenizer), limit=cfg.max_batches)


def run(cfg: EvalConfig) -> list[dict]:
    """Evaluate the requested ranks (and the base model), print the table, write `eval_dir`. Returns the rows."""
    run_dir = Path(cfg.run_dir)
    out = eval_dir(cfg)
    if out.exists() and not cfg.overwrite:  # before any work, not after it
        raise QdyloraError(f"{out} already exists; pass overwrite=true to replace it (or out_dir=... for another)")
    check_writable(out, "out_dir")
    note_if_training(run_dir)
    run_cfg, merged_rank = load_eval_source(run_dir)
    data = cfg.data or run_cfg.data
    examples = None
    if cfg.task != "none":  # read and checked before the model loads: a bad record costs nothing
        examples = task_examples(cfg, data, run_cfg.train.seed, held_out=cfg.data is None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_run_or_export(run_dir, merged_rank, device)
    template = end = None
    if examples is not None and is_chat(data):  # prompts in the chat template, answers end with the turn
        template = resolve_template(data, tokenizer)
        end = find_turn_end(tokenizer, template)
        for e in examples:
            e.prompt = generation_prompt(tokenizer, template, e.messages, e.where)
    if merged_rank is None:
        ranks = sorted({0, *parse_rank_spec(cfg.rank, run_cfg.adapter.r_max)})  # the base is the reference line
        shown = {r: r for r in ranks}
    else:  # a merged model is rank `merged_rank` with no adapter left to switch
        ranks, shown = [0], {0: merged_rank}

    batches = _loss_batches(cfg, run_cfg, tokenizer, examples, template)
    losses = rank_losses(model, track(batches, description=f"loss ({len(ranks)} ranks)", transient=True), ranks,
                         ranks_per_pass=cfg.ranks_per_pass, device=device)
    rows = [{"rank": shown[r], "loss": losses[r], "perplexity": math.exp(min(losses[r], 700))} for r in ranks]
    metric, generations = "loss", None
    if examples is not None:
        metric = TASK_METRIC[cfg.task]
        scores, generations = task_scores(model, tokenizer, examples, cfg.task, ranks, cfg, device, end)
        for row, r in zip(rows, ranks):
            row[metric] = scores[r]
        for g in generations:
            g["rank"] = shown[g["rank"]]

    by_rank = {row["rank"]: row for row in rows}
    if examples is None:
        pick = recommend({r: row["loss"] for r, row in by_rank.items()}, False, cfg.tolerance)
        ranked_by = "loss"
    else:
        scores = {r: row[metric] for r, row in by_rank.items()}
        pick = recommend(scores, True, cfg.tolerance, losses={r: row["loss"] for r, row in by_rank.items()})
        ranked_by = "loss" if metric_is_flat(scores) else metric
    summary = {
        "run_dir": str(run_dir), "data": (cfg.data.val_path or cfg.data.path) if cfg.data else "the run's validation data",
        "task": cfg.task, "metric": metric, "ranked_by": ranked_by, "tolerance": cfg.tolerance,
        "samples": len(examples) if examples is not None else sum(len(b["input_ids"]) for b in batches),
        "batches": len(batches), "best_rank": pick[0] if pick else None, "recommended_rank": pick[1] if pick else None,
    }
    # The whole curve in one number per metric (MatryoshkaLoRA's AURAC): see `aurac`.
    adapted = [r for r in by_rank if r > 0]
    if adapted:
        r_max = run_cfg.adapter.r_max
        summary["aurac"] = {"ranks": [min(adapted), max(adapted)], "r_max": r_max,
                            **{key: aurac({r: row[key] for r, row in by_rank.items()}, r_max)
                               for key in dict.fromkeys(["loss", metric])}}
    print_table(rows, summary, metric)
    write_results(out, rows, summary, metric, cfg.overwrite, f"{run_dir.name}: {metric} by rank", generations)
    files = "ranks.json, ranks.csv, ranks.png, summary.json" + (f", {GENERATIONS}" if generations is not None else "")
    print(f"results in {out}/ ({files})")
    return rows
