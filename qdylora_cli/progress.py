"""What a training run shows and records as it goes.

On a terminal, a live progress bar (on stderr); in a log (stderr redirected: `nohup`, a job
scheduler), a plain line every `train.log_every` steps. Validation losses are printed when they are
computed. Every `log_every`-th step (and every validation, skipped step and the last step) is a line
of `metrics.jsonl`, and goes to the trackers of `train.report_to` through accelerate. Only the main
process reports.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from qdylora_cli.config import TrainConfig, flat_config
from qdylora_cli.errors import DiskFullError, QdyloraError
from qdylora_cli.logs import console
from qdylora_cli.rundir import METRICS, atomic_write_text, disk_full, latest_good_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def trackers(report_to: list[str]) -> list[str]:
    """The trackers to start (`none` means none); one line if a tracker's package is not installed."""
    chosen = [name for name in report_to if name != "none"]
    for name in chosen:
        if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
            raise QdyloraError(f"train.report_to={report_to}: {name} is not installed (pip install {TRACKER_PACKAGES[name][0]})")
    return chosen


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Reporter:
    """Progress of one run: `start()`, `step(record)` after each optimizer step, `stop()`."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, accelerator: Accelerator, first_step: int, total: int) -> None:
        self.cfg, self.run_dir, self.accelerator = cfg, Path(run_dir), accelerator
        self.main = accelerator.is_main_process
        self.first_step, self.total = first_step, total
        self.live = self.main and sys.stderr.isatty()
        self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=console, disable=not self.live)
        self.started = time.perf_counter()
        self.tracking = bool(trackers(cfg.train.report_to))

    def start(self) -> None:
        if self.main:
            _truncate_metrics(self.run_dir / METRICS, self.first_step)
        if self.tracking:
            flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat_config(self.cfg).items()}
            self.accelerator.init_trackers("qdylora", config=flat,
                                           init_kwargs={"wandb": {"name": self.cfg.name}, "mlflow": {"run_name": self.cfg.name}})
        self.bar.start()
        self.task = self.bar.add_task("train", total=self.total, completed=self.first_step, info="")

    def validation(self, step: int, losses: dict[int, float]) -> None:
        """The validation losses at `step` (0: before training), printed at once."""
        if self.main:
            log.info("step %d: validation loss  %s", step, "  ".join(f"rank {r}: {v:.4f}" for r, v in losses.items()))
        if self.tracking:
            self.accelerator.log({f"val_loss/rank_{r}": v for r, v in losses.items()}, step=step)

    def step(self, record: dict[str, Any]) -> None:
        """One optimizer step's record (step 0: validation before training) to metrics.jsonl, the
        trackers, and the bar or a plain line."""
        step, every = record["step"], self.cfg.train.log_every
        due = step % every == 0 or step == self.total
        if self.main and (due or "val_loss" in record or record.get("skipped")):
            try:
                with open(self.run_dir / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a half line at worst: a resume drops it (_truncate_metrics)
                if disk_full(e):
                    raise DiskFullError(f"disk full: cannot write {self.run_dir / METRICS} (No space left on device); "
                                        f"the last good checkpoint is {latest_good_checkpoint(self.run_dir) or 'none'}"
                                        ) from None
                raise
        if "val_loss" in record:
            self.validation(step, {int(r): v for r, v in record["val_loss"].items()})
        if "loss" not in record:
            return
        if self.tracking:
            self.accelerator.log({k: record[k] for k in ("loss", "lr", "tokens_per_s", "tokens")
                                  if math.isfinite(record[k])}, step=step)
        ranks = ",".join(map(str, record["ranks"]))
        info = f"loss {record['loss']:.4f}  ranks {ranks}  {record['tokens_per_s']:,.0f} tok/s"
        if self.live:
            self.bar.update(self.task, completed=step, info=info)
        elif self.main and due:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(1, step - self.first_step) * (self.total - step)
            log.info("step %d/%d  %s  lr %.2e  elapsed %s  ETA %s", step, self.total, info, record["lr"],
                     _clock(elapsed), _clock(eta))

    def stop(self) -> None:
        self.bar.stop()
        if self.tracking:
            self.accelerator.end_training()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the half line of a process killed mid-write
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
