"""`qdylora generate`: a run's (or a merged export's) answers to your prompts, at one or several ranks.

The prompts get the run's own format, so the model sees what it was trained on: the prompt template
(`data.template`) of instruction data; for chat data a user message (after `data.system_prompt`) in
the run's chat template, the answer cut at the end of the assistant's turn; a text corpus's prompt
as it is. Several ranks answer side by side from one model in one batch per
prompt batch: the batch is repeated once per rank and every adapter applies its own rank to its
copy (`set_rank` with a tuple), as `qdylora eval` does. Greedy by default; with temperature > 0
sampled so that every rank draws the same random numbers for a prompt (sampling.py), so the
columns differ by rank, not by luck.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from qdylora_cli.chat import ChatTemplate, find_turn_end, generation_prompt, resolve_template
from qdylora_cli.config import DataConfig, GenerateConfig, is_chat, parse_rank_spec
from qdylora_cli.data import format_prompt, is_corpus, read_json_records
from qdylora_cli.errors import QdyloraError
from qdylora_cli.multirank import generate_at_ranks, load_run_or_export
from qdylora_cli.rundir import atomic_write_text, check_writable, load_eval_source, note_if_training
from qdylora_cli.sampling import Sampling

JSON_SUFFIXES = (".jsonl", ".json")


@dataclass
class Prompt:
    instruction: str
    input: str = ""  # the template's optional input (alpaca's "### Input:")


# --- prompts -------------------------------------------------------------------------------------------


def _record_prompt(where: str, record: Any, data: DataConfig) -> Prompt:
    """A JSON record: a string, or an object with `prompt` or the run's instruction field (and input field)."""
    if isinstance(record, str):
        return Prompt(record)
    if not isinstance(record, dict):
        raise QdyloraError(f"{where}: expected a string or a JSON object, got {type(record).__name__}")
    for key in ("prompt", data.instruction_field):
        if isinstance(record.get(key), str):
            input_ = record.get(data.input_field) or ""
            if not isinstance(input_, str):
                raise QdyloraError(f"{where}: field {data.input_field!r} must be a string, got {type(input_).__name__}")
            return Prompt(record[key], input_)
    raise QdyloraError(f"{where}: no text field 'prompt' or {data.instruction_field!r}")


def read_prompts(path: Path, data: DataConfig) -> list[Prompt]:
    """`.jsonl`/`.json`: one record per line (or a JSON list), see `_record_prompt`; any other file: one
    prompt per non-blank line. `data` is the run's data config: it names the record fields."""
    if path.suffix in JSON_SUFFIXES:
        prompts = [_record_prompt(where, r, data) for where, r in read_json_records(path)]
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise QdyloraError(f"prompts={str(path)!r}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
        prompts = [Prompt(line) for line in lines if line.strip()]
    if not prompts:
        raise QdyloraError(f"prompts={str(path)!r}: the file holds no prompts")
    return prompts


def model_text(prompt: Prompt, data: DataConfig, raw: bool, chat: tuple[Any, ChatTemplate] | None = None) -> str:
    """What the model continues: the prompt in the run's format (as is with raw=true or for a text corpus).

    `chat`: (tokenizer, template) of a chat run, whose prompt becomes a user message.
    """
    text = prompt.instruction + (f"\n{prompt.input}" if prompt.input else "")
    if raw or is_corpus(data):
        return text
    if chat is not None:
        tokenizer, template = chat
        system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt is not None else []
        return generation_prompt(tokenizer, template, [*system, {"role": "user", "content": text}], "prompt")
    return format_prompt(data.template, prompt.instruction, prompt.input)


# --- output --------------------------------------------------------------------------------------------


def _check_out_file(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise QdyloraError(f"out_file={str(path)!r} is a directory; name a file")
    if path.exists() and not overwrite:
        raise QdyloraError(f"{path} already exists; pass overwrite=true to replace it")
    check_writable(path.parent, "out_file")


def _how(cfg: GenerateConfig) -> str:
    if cfg.temperature == 0:
        return "greedy"
    return f"sampled (temperature {cfg.temperature:g}, top_p {cfg.top_p:g}, seed {cfg.seed})"


def print_answers(prompts: list[Prompt], answers: dict[int, list[str]], title: str, merged: bool) -> None:
    """One row per prompt, one column per rank: the ranks' answers side by side."""
    table = Table(title=title, show_lines=True)
    table.add_column("prompt")
    for rank in answers:
        table.add_column(f"rank {rank}" + (" (merged)" if merged else ""))
    for i, p in enumerate(prompts):
        shown = p.instruction + (f"\n{p.input}" if p.input else "")
        table.add_row(Text(shown), *(Text(texts[i]) for texts in answers.values()))
    Console().print(table)


def write_answers(path: Path, prompts: list[Prompt], answers: dict[int, list[str]]) -> None:
    """JSONL, one line per (rank, prompt): {rank, prompt, input, answer}; written whole or not at all."""
    lines = [
        json.dumps({"rank": rank, "prompt": p.instruction, "input": p.input, "answer": text}, ensure_ascii=False)
        for rank, texts in answers.items() for p, text in zip(prompts, texts)
    ]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# --- the command ---------------------------------------------------------------------------------------


def run(cfg: GenerateConfig) -> dict[int, list[str]]:
    """Answer every prompt at every requested rank, print them side by side (and write out_file).

    Returns {rank: answers in prompt order}.
    """
    run_dir = Path(cfg.run_dir)
    note_if_training(run_dir)
    run_cfg, merged_rank = load_eval_source(run_dir)
    out_file = Path(cfg.out_file) if cfg.out_file else None
    if out_file is not None:  # before the model loads: a bad path costs nothing
        _check_out_file(out_file, cfg.overwrite)
    if cfg.prompt is not None:
        prompts = [Prompt(cfg.prompt, cfg.input or "")]
    else:
        prompts = read_prompts(Path(cfg.prompts).expanduser(), run_cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_run_or_export(run_dir, merged_rank, device)
    chat, turn_end = None, None
    if is_chat(run_cfg.data) and not cfg.raw:
        template = resolve_template(run_cfg.data, tokenizer)
        chat, turn_end = (tokenizer, template), find_turn_end(tokenizer, template)
    texts = [model_text(p, run_cfg.data, cfg.raw, chat) for p in prompts]
    if merged_rank is None:
        ranks = parse_rank_spec(cfg.rank if cfg.rank is not None else run_cfg.adapter.r_max, run_cfg.adapter.r_max)
        shown = {r: r for r in ranks}
    else:  # a merged model is rank `merged_rank` with no adapter left to switch
        ranks, shown = [0], {0: merged_rank}
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed) if cfg.temperature > 0 else None

    answers: dict[int, list[str]] = {r: [] for r in ranks}
    for start in range(0, len(texts), cfg.batch_size):
        batch = texts[start : start + cfg.batch_size]
        for first in range(0, len(ranks), cfg.ranks_per_pass):
            group = ranks[first : first + cfg.ranks_per_pass]
            for r, out in generate_at_ranks(model, tokenizer, batch, group, cfg.max_new_tokens, device, sampling,
                                             turn_end).items():
                answers[r] += out
    answers = {shown[r]: answers[r] for r in ranks}
    print_answers(prompts, answers, f"{run_dir}: {_how(cfg)}", merged=merged_rank is not None)
    if out_file is not None:
        write_answers(out_file, prompts, answers)
        print(f"answers in {out_file}")
    return answers
