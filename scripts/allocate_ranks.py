"""Does a rank per layer, chosen after training, beat a uniform rank with the same parameter count?

    python scripts/allocate_ranks.py            # both tasks of docs/results.md, budgets 1/8, 1/4, 1/2
    python scripts/allocate_ranks.py --quick    # a smoke run of the same pipeline (tested)

For each task of scripts/compare_ranks.py (stories260K → tinyshakespeare, stories260K → alpaca_1k;
the same overrides: r_max 16, 300 steps, lr 3e-3, batch 8, float32) one run is trained with
`qdylora train`'s defaults (or those of another dynamic arm of compare_ranks.py, `--arm`), then `qdylora allocate` runs at each budget. The allocation is searched
on the first half of the run's validation examples and checked on the second half; uniform ranks
are measured on the same second half. The table compares the allocated adapter with the uniform rank
whose parameter count is the smallest that is not below it, and with the uniform loss interpolated
to the same count. Raw summaries go to <work-dir>/results.json; the table is printed in Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # run from a checkout; compare_ranks.py beside this file

from compare_ranks import ARMS, TASKS, base_overrides  # noqa: E402

FULL = dict(steps=300, budgets="0.125,0.25,0.5", tasks="shakespeare,alpaca", search_examples=64, seeds="0,1,2")
QUICK = dict(steps=10, budgets="0.25", tasks="shakespeare", search_examples=8, seeds="0")


def train_run(args: argparse.Namespace, task: str, seed: int) -> Path:
    from qdylora_cli import train
    from qdylora_cli.cli import compose_config

    arm = ARMS[args.arm]
    run_dir = args.work_dir / task / f"{arm.name}-s{seed}"
    overrides = base_overrides(args, task, run_dir, seed, round(args.steps * arm.steps_share)) + list(arm.overrides)
    if args.quick:
        overrides.append("data.max_samples=64")
    with contextlib.redirect_stdout(io.StringIO()):
        train.run(compose_config("train", overrides))
    return run_dir


def allocate(args: argparse.Namespace, run_dir: Path, budget: float) -> dict:
    from qdylora_cli import allocate
    from qdylora_cli.cli import compose_config

    cfg = compose_config("allocate", [f"run_dir={run_dir}", f"budget={budget}", f"out_dir={run_dir}/allocate-{budget}",
                                      "overwrite=true", f"search_examples={args.search_examples}"])
    with contextlib.redirect_stdout(io.StringIO()):
        return allocate.run(cfg)


def gap(r: dict) -> float:
    """Allocated vs the uniform rank with the same or more parameters, in % of the uniform loss (negative: better)."""
    s = r["summary"]
    return 100 * (s["loss"] / s["uniform"]["same_or_more"]["loss"] - 1)


def table(results: list[dict]) -> str:
    """One row per task, seed and budget."""
    lines = ["| task | seed | budget | allocated params | allocated loss | uniform rank (params) | uniform loss | gap | "
             "search: allocations, s |",
             "|" + " --- |" * 9]
    for r in results:
        s = r["summary"]
        same = s["uniform"]["same_or_more"]
        lines.append(
            f"| {TASKS[r['task']].title} | {r['seed']} | {r['budget']:g} | {s['params']:,} ({s['share_of_r_max']:.1%}) | "
            f"{s['loss']:.4f} | {same['rank']} ({same['params']:,}) | {same['loss']:.4f} | {gap(r):+.2f}% | "
            f"{s['search']['allocations_measured']}, {s['search']['seconds']:.0f} |"
        )
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    """One row per task and budget: the gap over seeds, and how many seeds the allocation won."""
    lines = ["| task | budget | uniform rank | gap, mean over seeds | gap per seed | allocation better |",
             "|" + " --- |" * 6]
    for task in dict.fromkeys(r["task"] for r in results):
        for budget in dict.fromkeys(r["budget"] for r in results):
            mine = [r for r in results if r["task"] == task and r["budget"] == budget]
            gaps = [gap(r) for r in mine]
            lines.append(f"| {TASKS[task].title} | {budget:g} | {mine[0]['summary']['uniform']['same_or_more']['rank']} | "
                         f"{statistics.fmean(gaps):+.2f}% | {', '.join(f'{g:+.2f}%' for g in gaps)} | "
                         f"{sum(round(g, 2) < 0 for g in gaps)} of {len(gaps)} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Loss against parameters per task: uniform ranks and allocations, each the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in results if r["task"] == task]
        seeds = sorted({r["seed"] for r in mine})
        curves = [next(r for r in mine if r["seed"] == s)["summary"]["uniform"]["rows"] for s in seeds]
        params = [u["params"] for u in curves[0]]
        loss = [statistics.fmean(c[i]["loss"] for c in curves) for i in range(len(params))]
        ax.plot(params, loss, "o-", label="uniform rank 1..16")
        for u, y in zip(curves[0], loss):
            if u["rank"] in (1, 2, 4, 8, 16):
                ax.annotate(str(u["rank"]), (u["params"], y), textcoords="offset points", xytext=(3, 5), fontsize=8)
        budgets = list(dict.fromkeys(r["budget"] for r in mine))
        at = [[r["summary"] for r in mine if r["budget"] == b] for b in budgets]
        ax.plot([statistics.fmean(s["params"] for s in group) for group in at],
                [statistics.fmean(s["loss"] for s in group) for group in at], "*", color="tab:red", markersize=13,
                label="allocated: budget " + ", ".join(f"{b:g}" for b in budgets))
        ax.set(title=f"{TASKS[task].title} (mean of {len(seeds)} seeds)", xlabel="adapter parameters",
               ylabel="loss on the check half of validation")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps, one budget, few examples: a smoke run")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="folder with models/ and data/")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "allocate_ranks")
    p.add_argument("--out-png", type=Path, help="the plot (default: <work-dir>/allocation.png)")
    p.add_argument("--tasks", help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--budgets", help="comma-separated shares of the r_max adapter's parameters")
    p.add_argument("--seeds", help="comma-separated training seeds (default 0,1,2; 0 with --quick)")
    p.add_argument("--steps", type=int)
    p.add_argument("--arm", default="default", choices=[a for a in ARMS if ARMS[a].rank is None],
                   help="the dynamic-rank arm of scripts/compare_ranks.py that trains the run (default: the defaults)")
    p.add_argument("--search-examples", type=int)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--scheduler", default="constant")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--from-json", action="store_true", help="print the table and plot from <work-dir>/results.json")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    import torch

    torch.set_num_threads(1)  # comparable timings on a shared machine; set OMP_NUM_THREADS=1 too
    saved = args.work_dir / "results.json"
    if args.from_json:
        results = json.loads(saved.read_text())["results"]
    else:
        results, start = [], time.perf_counter()
        for task in args.tasks.split(","):
            for seed in map(int, args.seeds.split(",")):
                run_dir = train_run(args, task, seed)
                for budget in map(float, args.budgets.split(",")):
                    results.append({"task": task, "seed": seed, "budget": budget,
                                    "summary": allocate(args, run_dir, budget)})
                    print(table(results[-1:]).splitlines()[-1], flush=True)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                     "total_s": time.perf_counter() - start, "results": results}, indent=1))
    print(table(results) + "\n\n" + summary_table(results))
    plot(results, args.out_png or args.work_dir / "allocation.png")


if __name__ == "__main__":
    main()
