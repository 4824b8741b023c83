"""Sample packing against padding: training tokens/s and padding on Alpaca with a real small model.

    python scripts/bench_packing.py            # ../shared/models/stories260K on ../shared/data/alpaca_1k.json
    python scripts/bench_packing.py --tiny     # a few steps: a smoke test
    python scripts/bench_packing.py --steps 200 --batch-size 8 --max-length 512

Every setting is a real `qdylora train` run (`train.run`: NF4 base, adapters r_max 8, AdamW, float32,
one micro-batch per step) on the same tokenized examples (QLoRA's 384 + 128 token limits):

- padded: batches of --batch-size examples in random order, padded to the longest;
- padded, grouped: the same with data.group_by_length (QLoRA's default: similar lengths share a batch);
- packed: data.packing, rows of --max-length tokens, as many rows per batch as hold about the same
  number of tokens as a padded batch, so that every setting does the same work per step.

tokens/s counts real tokens only (no padding) over --steps steps after --warmup steps, from the run's
own per-step times; padding is the share of the token slots of one epoch's batches that are padding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qdylora_cli import train  # noqa: E402
from qdylora_cli.cli import compose_config  # noqa: E402
from qdylora_cli.data import load_datasets, padding_fraction  # noqa: E402
from qdylora_cli.model import load_tokenizer  # noqa: E402
from qdylora_cli.train import BatchStream  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def run_setting(args: argparse.Namespace, root: Path, name: str, overrides: list[str]) -> dict:
    """Train one setting; its padding, and real tokens per second over the timed steps."""
    run_dir = root / name.replace(" ", "-").replace(",", "")
    cfg = compose_config("train", [
        "model=hf", f"model.name_or_path={args.model}", "model.dtype=float32", "data=json", f"data.path={args.data}",
        f"data.max_length={args.max_length}", "optimizer=adamw", "adapter.r_max=8", "adapter.dropout=0",
        f"train.max_steps={args.warmup + args.steps}", "train.grad_accum=1", "train.eval_every=0",
        "train.save_every=0", "train.log_every=1", "train.mixed_precision=no", "train.gradient_checkpointing=false",
        f"run_dir={run_dir}", *overrides])
    train.run(cfg)
    elapsed = {m["step"]: m["elapsed"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    # The same stream again, without a model: the real tokens of each step the run took.
    tokenizer = load_tokenizer(str(args.model))
    examples, _ = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    stream = BatchStream(examples, cfg.train.batch_size, cfg.train.seed, cfg.data.group_by_length,
                         tokenizer.pad_token_id, pack_length=cfg.data.max_length if cfg.data.packing else None)
    tokens = 0
    for step in range(args.warmup + args.steps):
        next(stream)
        tokens += stream.last_tokens if step >= args.warmup else 0
    seconds = elapsed[args.warmup + args.steps] - elapsed.get(args.warmup, 0.0)
    return {"setting": name, "batch": cfg.train.batch_size, "tokens": tokens, "seconds": seconds,
            "padding": padding_fraction(stream.epoch_batches(0), stream.lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "stories260K")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "alpaca_1k.json")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per padded batch")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--tiny", action="store_true", help="3 timed steps after 1 warm-up step")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.warmup = 3, 1
    for path in (args.model, args.data):
        if not path.exists():
            sys.exit(f"{path} is missing (pass --model / --data)")

    tokenizer = load_tokenizer(str(args.model))
    probe = compose_config("train", ["data=json", f"data.path={args.data}"])
    examples, _ = load_datasets(probe.data, tokenizer, seed=probe.train.seed)
    mean = sum(len(e["input_ids"]) for e in examples) / len(examples)
    rows = max(1, round(args.batch_size * mean / args.max_length))
    settings = [
        ("padded", ["data.group_by_length=false", f"train.batch_size={args.batch_size}"]),
        ("padded, grouped", ["data.group_by_length=true", f"train.batch_size={args.batch_size}"]),
        ("packed", ["data.packing=true", f"train.batch_size={rows}"]),
    ]
    print(f"{args.model.name} on {args.data.name}: {len(examples)} training examples of {mean:.0f} tokens on "
          f"average; {args.steps} timed steps after {args.warmup}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_setting(args, Path(tmp), name, overrides) for name, overrides in settings]
    base = results[0]["tokens"] / results[0]["seconds"]
    print("| setting | batch | padding | real tokens/s | vs padded |")
    print("| --- | --- | --- | --- | --- |")
    for r, (_, overrides) in zip(results, settings):
        unit = f"{r['batch']} rows of {args.max_length}" if "data.packing=true" in overrides else f"{r['batch']} examples"
        speed = r["tokens"] / r["seconds"]
        print(f"| {r['setting']} | {unit} | {100 * r['padding']:.1f}% | {speed:,.0f} | {speed / base:.2f}x |")


if __name__ == "__main__":
    main()
