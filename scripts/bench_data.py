"""Data at scale: the first and the second launch of `qdylora train` on N synthetic Alpaca records,
against `datasets.map` doing the same tokenization. Run it alone on the machine: it times real launches.

    python scripts/bench_data.py                    # N = 50,000, 200,000 and 1,000,000 (the docs' table)
    python scripts/bench_data.py 20000              # one size
    python scripts/bench_data.py 20000 --num-proc 1 # tokenize in one process

For each N, a JSONL file of N records (about 520 bytes each, as Alpaca's with inputs: about 280
tokens with stories260K's tokenizer) is written once into --workdir, then:

- first launch: `qdylora train model=hf model.name_or_path=MODEL data=json data.path=FILE train.max_steps=1`
  with an empty data cache: tokenizing, the model, one optimizer step (16 micro-batches), the adapter;
- second launch: the same as a new run, the cache filled (and `qdylora eval` of the first run's
  validation data, which reads only the held-out rows);
- datasets.map: `load_dataset("json")` then `.map(batched=True)` in one process with the same prompt,
  truncation and labels as qdylora (`tokenize_pairs`), with an empty cache and again from its cache.

Times are wall-clock seconds of each command; peak memory is sampled every 0.1 s over the command's
process tree: the main process's RSS, and the tree's PSS (shared pages counted once, so forked
tokenizing processes are not counted twice). Prints a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WORDS = ("once upon a time there was a little girl named lily she loved to play outside in the park with her "
         "friend tom one day they saw a big red ball under the tree the sun was happy and the sky was blue "
         "mom said you can have a cookie if you are good the dog ran fast and jumped over the small box "
         "they laughed and went home to eat soup together it was a fun day write explain give list describe "
         "what why how three ways the best answer is simple because").split()


def make_records(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w") as f:
        for _ in range(n):
            record = {"instruction": text(8, 20).capitalize() + ".", "input": text(5, 25) if rng.random() < 0.4 else "",
                      "output": text(50, 110).capitalize() + "."}
            f.write(json.dumps(record) + "\n")


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return pids


def _kib(pid: int, field: str, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run `cmd`; its wall time, the main process's peak RSS and the tree's peak PSS (MiB)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        peak = {"rss": 0, "pss": 0}

        def sample() -> None:
            while proc.poll() is None:
                peak["rss"] = max(peak["rss"], _kib(proc.pid, "VmRSS:", "status"))
                peak["pss"] = max(peak["pss"], sum(_kib(p, "Pss:", "smaps_rollup") for p in _tree(proc.pid)))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        sampler.join()
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return {"s": seconds, "rss": peak["rss"] / 1024, "pss": peak["pss"] / 1024}


MAP_SCRIPT = """
import sys, time, datasets
from transformers import AutoTokenizer
from qdylora_cli.config import DataConfig
from qdylora_cli.data import format_prompt, tokenize_pairs
path, model, cache = sys.argv[1:4]
started = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(model)
cfg = DataConfig(path=path)
def tokenize(batch):
    sources = [format_prompt("alpaca", i, x or "") for i, x in zip(batch["instruction"], batch["input"])]
    examples = tokenize_pairs(tokenizer, sources, batch["output"], cfg)
    return {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
print(f"rows {len(ds)} in {time.perf_counter() - started:.1f}s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", type=int, default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "stories260K")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qdylora-bench-data")
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: the cores)")
    parser.add_argument("--no-map", action="store_true", help="skip the datasets.map comparison")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(args.workdir / "hf")}
    rows = []
    for n in args.sizes:
        data = args.workdir / f"alpaca-{n}.jsonl"
        if not data.exists():
            print(f"writing {data} ...", flush=True)
            make_records(data, n)
        cache, runs = args.workdir / f"cache-{n}", args.workdir / f"runs-{n}"
        for folder in (cache, runs, args.workdir / f"map-{n}"):
            shutil.rmtree(folder, ignore_errors=True)
        train = [sys.executable, "-m", "qdylora_cli", "train", "model=hf", f"model.name_or_path={args.model}", "data=json",
                 f"data.path={data}", "train.max_steps=1", "train.eval_every=0", "train.save_every=0",
                 f"data.cache_dir={cache}", *([f"data.num_proc={args.num_proc}"] if args.num_proc else [])]
        print(f"N={n:,}: first launch ...", flush=True)
        first = measure([*train, f"run_dir={runs}/first"], env, args.workdir / f"first-{n}.log")
        text = " ".join((args.workdir / f"first-{n}.log").read_text().split())
        tokenized = re.search(r"data: tokenized .*? \(([\d,]+) records, ([\d,]+) tokens\) in ([\d.]+)s", text)
        print(f"N={n:,}: second launch ...", flush=True)
        second = measure([*train, f"run_dir={runs}/second"], env, args.workdir / f"second-{n}.log")
        print(f"N={n:,}: eval of the run's validation ...", flush=True)
        evaluation = measure([sys.executable, "-m", "qdylora_cli", "eval", f"run_dir={runs}/first", "rank=[1]",
                              "max_batches=1"], env, args.workdir / f"eval-{n}.log")
        row = {"n": n, "mb": data.stat().st_size / 1e6, "tokens": tokenized.group(2) if tokenized else "?",
               "tokenize_s": float(tokenized.group(3)) if tokenized else float("nan"),
               "first": first, "second": second, "eval": evaluation}
        if not args.no_map:
            script = args.workdir / "map.py"
            script.write_text(MAP_SCRIPT)
            cmd = [sys.executable, str(script), str(data), str(args.model), str(args.workdir / f"map-{n}")]
            print(f"N={n:,}: datasets.map ...", flush=True)
            row["map"] = measure(cmd, env, args.workdir / f"map-{n}.log")
            row["map_hit"] = measure(cmd, env, args.workdir / f"map-hit-{n}.log")
        rows.append(row)
        shutil.rmtree(args.workdir / f"map-{n}", ignore_errors=True)
        shutil.rmtree(runs, ignore_errors=True)

    print("\n| records | MB | tokens | first launch s (tokenizing s) | peak RSS / tree PSS MiB | second launch s "
          "| peak RSS MiB | eval on val s | datasets.map s | its cache hit s | its peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        m, h = r.get("map"), r.get("map_hit")
        print(f"| {r['n']:,} | {r['mb']:.0f} | {r['tokens']} | {r['first']['s']:.1f} ({r['tokenize_s']:.1f}) | "
              f"{r['first']['rss']:,.0f} / {r['first']['pss']:,.0f} | {r['second']['s']:.1f} | {r['second']['rss']:,.0f} | "
              f"{r['eval']['s']:.1f} | {m['s'] if m else float('nan'):.1f} | {h['s'] if h else float('nan'):.1f} | "
              f"{m['rss'] if m else float('nan'):,.0f} |")


if __name__ == "__main__":
    main()
