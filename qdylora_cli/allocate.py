"""`qdylora allocate`: a rank per adapted layer for a parameter budget, from one trained dynamic-rank run.

Every rank of every layer is already trained, so mixing ranks costs no training: the search
(rank_search.py) measures the loss of candidate allocations on *search* data, several allocations
per forward pass, and keeps the best within the budget. The result is then *checked* on data the
search did not see, against every uniform rank 1..r_max, so the report compares it with the uniform
rank of the same parameter count on equal terms.

Search and check data: `search_data=validation` splits the run's validation examples in two, the
first half for the search (at most `search_examples`), the second for the check; `search_data=train`
searches on `search_examples` training examples and checks on all validation examples.

Results go to RUN_DIR/allocate (or out_dir), atomically: allocation.json (module -> rank, what
`qdylora export allocation=PATH` reads), summary.json, sensitivity.csv and allocation.png.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from qdylora_cli.allocation import Allocation, ModuleShape, allocation_params, run_module_shapes, uniform
from qdylora_cli.config import AllocateConfig, TrainConfig, candidate_ranks
from qdylora_cli.data import eval_batches, load_datasets, pad_token_id
from qdylora_cli.errors import QdyloraError
from qdylora_cli.model import load_run_model
from qdylora_cli.multirank import allocation_losses
from qdylora_cli.rank_search import MeasuredLosses, SearchResult, search, smallest_within
from qdylora_cli.rundir import ALLOCATE, atomic_dir, check_writable, load_run_config, note_if_training


def budget_capacity(cfg: AllocateConfig, full: int, smallest: int, smallest_rank: int) -> int | None:
    """The budget in parameters (None in tolerance mode); below the smallest allocation is a one-line error."""
    if cfg.tolerance is not None:
        return None
    key, value = ("budget", cfg.budget) if cfg.budget is not None else ("budget_params", cfg.budget_params)
    capacity = int(cfg.budget * full) if cfg.budget is not None else cfg.budget_params
    if capacity < smallest:
        raise QdyloraError(
            f"{key}={value}: {capacity:,} parameters are fewer than the smallest allocation, every layer at rank "
            f"{smallest_rank} ({smallest:,} parameters, budget={smallest / full:.4g} of the r_max adapter's {full:,})"
        )
    return capacity


def split_data(cfg: AllocateConfig, run_cfg: TrainConfig, tokenizer: Any) -> tuple[list[dict], list[dict], str]:
    """(search examples, check examples, a sentence saying which is which)."""
    train, val = load_datasets(run_cfg.data, tokenizer, seed=run_cfg.train.seed)
    if not val:
        raise QdyloraError(f"{cfg.run_dir} was trained without validation data (data.val_fraction=0); "
                           "the allocation is checked on it")
    if cfg.search_data == "validation":
        if len(val) < 2:
            raise QdyloraError(f"search_data=validation: {cfg.run_dir} has {len(val)} validation example, too few "
                               "to split into search and check data; use search_data=train")
        half = len(val) // 2
        search_examples, check = val[:half][: cfg.search_examples], val[half:]
        note = (f"searched on the first {len(search_examples)} of the {len(val)} validation examples, "
                f"checked on the last {len(check)}")
    else:
        picked = sorted(random.Random(run_cfg.train.seed).sample(range(len(train)), min(cfg.search_examples, len(train))))
        search_examples, check = [train[i] for i in picked], val
        note = f"searched on {len(search_examples)} training examples, checked on all {len(val)} validation examples"
    return search_examples, check, note


def compare_with_uniform(params: int, uniform_rows: list[dict]) -> dict[str, Any]:
    """The uniform rank with the same parameter count: the smallest rank with at least `params` parameters,
    and the uniform loss interpolated linearly in parameters between the ranks around `params`."""
    above = next((row for row in uniform_rows if row["params"] >= params), uniform_rows[-1])
    below = [row for row in uniform_rows if row["params"] <= params]
    if below and below[-1]["params"] < above["params"]:
        lo, hi = below[-1], above
        t = (params - lo["params"]) / (hi["params"] - lo["params"])
        interpolated = lo["loss"] + t * (hi["loss"] - lo["loss"])
    else:  # exactly a uniform rank's count, or fewer parameters than rank 1: nothing to interpolate
        interpolated = above["loss"] if above["params"] == params else None
    best = min(uniform_rows, key=lambda row: (row["loss"], row["rank"]))
    return {"same_or_more": above, "interpolated_loss": interpolated, "best": best}


def ranks_by_layer(allocation: Allocation) -> tuple[list[str], list[str], dict[tuple[str, str], int]]:
    """(layers, module kinds, rank of each): `model.layers.0.self_attn.q_proj` is layer `model.layers.0`
    (the name up to its first number) and kind `q_proj` (its last part, or all of the rest when two
    kinds would share a last part); a grid reads better than a list of names."""
    split = {}
    for name in allocation:
        parts = name.split(".")
        cut = next((i + 1 for i, part in enumerate(parts[:-1]) if part.isdigit()), len(parts) - 1)
        split[name] = (".".join(parts[:cut]), ".".join(parts[cut:]))
    rests = {rest for _, rest in split.values()}
    short = len({rest.rsplit(".", 1)[-1] for rest in rests}) == len(rests)
    grid = {(layer, rest.rsplit(".", 1)[-1] if short else rest): allocation[name] for name, (layer, rest) in split.items()}
    layers, kinds = list(dict.fromkeys(k[0] for k in grid)), list(dict.fromkeys(k[1] for k in grid))
    return layers, kinds, grid


def print_report(allocation: Allocation, summary: dict[str, Any]) -> None:
    console = Console()
    layers, kinds, grid = ranks_by_layer(allocation)
    prefix = os.path.commonprefix(layers).rpartition(".")[0] if len(layers) > 1 else ""
    table = Table(title=f"rank per layer ({summary['params']:,} adapter parameters, "
                        f"{summary['share_of_r_max']:.1%} of rank {summary['r_max']})")
    table.add_column(f"{prefix}." if prefix else "layer")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for layer in layers:
        table.add_row(layer.removeprefix(f"{prefix}."), *(str(grid.get((layer, kind), "")) for kind in kinds))
    console.print(table)

    same, best = summary["uniform"]["same_or_more"], summary["uniform"]["best"]
    loss = summary["loss"]
    compare = Table(title=f"loss on the check data ({summary['search']['data']})")
    for column in ("", "params", "loss", "allocated vs it"):
        compare.add_column(column, justify="right" if column else "left")
    compare.add_row("allocated", f"{summary['params']:,}", f"{loss:.4f}", "", style="bold")
    compare.add_row(f"uniform rank {same['rank']} (same or more params)", f"{same['params']:,}", f"{same['loss']:.4f}",
                    f"{100 * (loss / same['loss'] - 1):+.2f}%")
    if summary["uniform"]["interpolated_loss"] is not None:
        interpolated = summary["uniform"]["interpolated_loss"]
        compare.add_row("uniform, interpolated to the same params", f"{summary['params']:,}", f"{interpolated:.4f}",
                        f"{100 * (loss / interpolated - 1):+.2f}%")
    compare.add_row(f"best uniform rank ({best['rank']})", f"{best['params']:,}", f"{best['loss']:.4f}",
                    f"{100 * (loss / best['loss'] - 1):+.2f}%")
    console.print(compare)
    if loss > same["loss"]:
        console.print(f"[bold]On the check data the allocation is worse than uniform rank {same['rank']}[/]: the search "
                      f"fitted its examples. Prefer rank {same['rank']} (qdylora export rank={same['rank']}), or search "
                      "on more examples (search_examples, search_data=train).")
    s = summary["search"]
    console.print(f"search: {s['allocations_measured']} allocations measured in {s['seconds']:.0f}s; on the search data "
                  f"the loss went from {s['rounds'][0]['reference_loss']:.4f} (uniform rank {s['start_rank']}) to "
                  f"{s['loss']:.4f} in {len(s['rounds'])} round(s)")
    if "tolerance_search" in summary:
        t = summary["tolerance_search"]
        console.print(f"tolerance {summary['tolerance']:g}: the target was {t['target_loss']:.4f} on the search data "
                      f"(uniform rank {t['smallest_uniform_rank_within']} is the smallest uniform rank within it); "
                      f"{len(t['budgets_tried'])} budgets tried")


def write_plot(path: Path, summary: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = summary["uniform"]["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([r["params"] for r in rows], [r["loss"] for r in rows], "o-", label="uniform rank (every layer the same)")
    for r in rows:
        ax.annotate(str(r["rank"]), (r["params"], r["loss"]), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.plot(summary["params"], summary["loss"], "*", color="tab:red", markersize=14, label="allocated (a rank per layer)")
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters")
    ax.set_ylabel("loss on the check data")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, allocation: Allocation, summary: dict[str, Any], result: SearchResult, overwrite: bool,
                  title: str) -> None:
    """allocation.json, summary.json, sensitivity.csv and allocation.png, all or nothing."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "allocation.json").write_text(json.dumps(allocation, indent=1))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        with open(tmp / "sensitivity.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["module", "rank", "loss_change"])
            for name, row in result.sensitivity.items():
                writer.writerows([name, rank, f"{change:.6g}"] for rank, change in row.items())
        write_plot(tmp / "allocation.png", summary, title)


def _search(cfg: AllocateConfig, shapes: Sequence[ModuleShape], candidates: list[int], capacity: int | None,
            losses: MeasuredLosses, r_max: int) -> tuple[SearchResult, dict[str, Any] | None]:
    if capacity is not None:
        return search(shapes, candidates, capacity, losses, r_max=r_max, rounds=cfg.rounds), None
    ranks = list(range(1, r_max + 1))
    uniform_losses = losses([uniform(list(shapes), b) for b in ranks])
    target = min(uniform_losses) * (1 + cfg.tolerance)
    enough = min(b for b, loss in zip(ranks, uniform_losses) if loss <= target)
    low = allocation_params(shapes, uniform(list(shapes), min(c for c in candidates if c > 0)))
    high = allocation_params(shapes, uniform(list(shapes), enough))
    result, record = smallest_within(shapes, candidates, target, low, high, losses, r_max=r_max, rounds=cfg.rounds)
    return result, {"target_loss": target, "smallest_uniform_rank_within": enough,
                    "budgets_tried": [{"budget_params": c, "params": p, "loss": v} for c, p, v in record.tried]}


def run(cfg: AllocateConfig) -> dict[str, Any]:
    """Search, check, print and write RUN_DIR/allocate. Returns the summary."""
    run_dir = Path(cfg.run_dir)
    out = Path(cfg.out_dir) if cfg.out_dir else run_dir / ALLOCATE
    if out.exists() and not cfg.overwrite:  # before any work, not after it
        raise QdyloraError(f"{out} already exists; pass overwrite=true to replace it (or out_dir=... for another)")
    check_writable(out, "out_dir")
    note_if_training(run_dir)
    run_cfg = load_run_config(run_dir)
    shapes, meta = run_module_shapes(run_dir)
    r_max = meta["r_max"]
    candidates = candidate_ranks(cfg.ranks, r_max)
    full = allocation_params(shapes, uniform(shapes, r_max))
    smallest_rank = min(c for c in candidates if c > 0)
    capacity = budget_capacity(cfg, full, allocation_params(shapes, uniform(shapes, smallest_rank)), smallest_rank)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_run_model(run_dir, device=device)
    search_examples, check_examples, note = split_data(cfg, run_cfg, tokenizer)
    pad = pad_token_id(tokenizer)
    search_batches, check_batches = eval_batches(search_examples, cfg.batch_size, pad), eval_batches(check_examples, cfg.batch_size, pad)

    def measure(allocations: list[Allocation]) -> list[float]:
        return allocation_losses(model, search_batches, allocations, ranks_per_pass=cfg.configs_per_pass, device=device)

    start = time.perf_counter()
    losses = MeasuredLosses(shapes, measure)
    result, tolerance = _search(cfg, shapes, candidates, capacity, losses, r_max)
    seconds = time.perf_counter() - start

    ranks = list(range(1, r_max + 1))
    checked = allocation_losses(model, check_batches, [result.allocation, *ranks], ranks_per_pass=cfg.configs_per_pass,
                                device=device)
    uniform_rows = [{"rank": b, "params": allocation_params(shapes, uniform(shapes, b)), "loss": loss}
                    for b, loss in zip(ranks, checked[1:])]
    summary = {
        "run_dir": str(run_dir),
        **{key: getattr(cfg, key) for key in ("budget", "budget_params", "tolerance") if getattr(cfg, key) is not None},
        "capacity": capacity,
        "params": result.params,
        "share_of_r_max": result.params / full,
        "r_max": r_max,
        "r_max_params": full,
        "loss": checked[0],
        "uniform": {**compare_with_uniform(result.params, uniform_rows), "rows": uniform_rows},
        "search": {
            "data": note,
            "candidate_ranks": candidates,
            "start_rank": result.start_rank,
            "loss": result.loss,
            "rounds": [asdict(r) for r in result.rounds],
            "allocations_measured": len(losses),
            "seconds": seconds,
        },
        **({"tolerance_search": tolerance} if tolerance else {}),
    }
    print_report(result.allocation, summary)
    write_results(out, result.allocation, summary, result, cfg.overwrite,
                  title=f"{run_dir.name}: {result.params:,} parameters allocated")
    print(f"results in {out}/ (allocation.json, summary.json, sensitivity.csv, allocation.png)\n"
          f"export it: qdylora export run_dir={run_dir} allocation={out / 'allocation.json'}")
    return summary
