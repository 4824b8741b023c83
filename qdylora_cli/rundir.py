"""A run directory: what is in it, who may write it, and how a new run takes it over.

    config.yaml     the resolved config of the run (absolute paths)
    metrics.jsonl   one JSON record per logged step
    checkpoints/    step-N/: adapter, optimizer and loop state (checkpoint.py)
    adapter/        the finished adapter: every rank 1..r_max
    base_model/     models built from a config: their weights, so the run rebuilds without the recipe
    logs/           the trackers of train.report_to
    eval/, export/  what `qdylora eval` and `qdylora export` write

Training holds an OS lock (`flock`) on the run directory itself for as long as it runs. The
kernel drops the lock when the process ends, however it ends (SIGKILL included), so a lock is
never stale. `lock.json` beside it names the holder (PID, host, start, command) so that a second
writer can say who holds the run; it is informative only, the flock is what excludes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from qdylora_cli.checkpoint import check_writable, checkpoint_dirs, latest_good_checkpoint
from qdylora_cli.config import TrainConfig, absolute_paths, flat_config, load_run_config
from qdylora_cli.errors import QdyloraError

log = logging.getLogger(__name__)

CONFIG, METRICS, CHECKPOINTS, ADAPTER, BASE_MODEL, LOGS, EVAL, EXPORT = (
    "config.yaml", "metrics.jsonl", "checkpoints", "adapter", "base_model", "logs", "eval", "export")
LOCK_INFO = "lock.json"
# Keys a resumed run may change: the rest defines what is trained, and changing it would mix two runs.
RESUMABLE = ("train.", "launcher.", "run_dir", "name", "overwrite")


class RunLock:
    """An exclusive lock on a run directory (which must exist), held until `release` or the process ends."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir, self._fd = Path(run_dir), fd

    @classmethod
    def acquire(cls, run_dir: Path, what: str = "train") -> RunLock:
        """Take the lock or stop with one line naming the process that holds it."""
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QdyloraError(f"{run_dir} is being trained by {holder(run_dir)}; wait for it to finish or stop "
                               f"it (a second {what} into the same run would mix two runs)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["qdylora", *sys.argv[1:]]) if sys.argv else "qdylora"}
        with contextlib.suppress(OSError):  # the lock holds without its description
            (Path(run_dir) / LOCK_INFO).write_text(json.dumps(info))
        return cls(Path(run_dir), fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            (self.run_dir / LOCK_INFO).unlink(missing_ok=True)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = -1


def holder(run_dir: Path) -> str:
    """Who holds the lock of `run_dir`, as `lock.json` describes them."""
    try:
        info = json.loads((Path(run_dir) / LOCK_INFO).read_text())
        return f"PID {info['pid']} on {info['host']} since {info['since']} (`{info['command']}`)"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def being_trained(run_dir: Path) -> str | None:
    """If a process holds `run_dir`'s lock, who (see `holder`); None if nobody does (or it is no directory)."""
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a reader: free unless a writer holds it
    except BlockingIOError:
        return holder(run_dir)
    finally:
        os.close(fd)
    return None


def note_if_training(run_dir: Path) -> None:
    """`eval`, `export` and `generate` of a run still in training use its last finished adapter: say so."""
    who = being_trained(run_dir)
    if who is None:
        return
    adapter = Path(run_dir) / ADAPTER
    if not adapter.is_dir():
        raise QdyloraError(f"{run_dir} is being trained by {who} and has no finished adapter yet; wait for it to end")
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(adapter.stat().st_mtime))
    log.warning("%s is being trained by %s: using its last finished adapter (%s, written %s)", run_dir, who,
                adapter, written)


def prepare_run_dir(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """Refuse to clobber an existing run; return the checkpoint to resume from, if any. Writes nothing."""
    check_writable(run_dir, "run_dir")
    is_run = (run_dir / CONFIG).exists()
    if cfg.train.resume:
        if not is_run:
            log.info("train.resume=true but %s holds no run yet: starting fresh", run_dir)
            return None
        check_same_run(cfg, run_dir)
        if not checkpoint_dirs(run_dir):  # stopped before its first checkpoint: nothing to lose
            log.info("train.resume=true but %s has no checkpoint yet: starting from step 0", run_dir)
            return None
        ckpt = latest_good_checkpoint(run_dir)
        if ckpt is None:
            raise QdyloraError(f"train.resume=true but {run_dir / CHECKPOINTS} holds no usable checkpoint")
        return ckpt
    if is_run and not cfg.overwrite:
        raise QdyloraError(
            f"{run_dir} already holds a run; pass train.resume=true to continue it or overwrite=true to replace it"
        )
    return None


def check_same_run(cfg: TrainConfig, run_dir: Path) -> None:
    """A resume may change `train.*` only: each change is said, any other names its key and stops."""
    old, new = flat_config(load_run_config(run_dir)), flat_config(absolute_paths(cfg))
    for key in new:
        if old.get(key) == new[key]:
            continue
        if not key.startswith(RESUMABLE):
            raise QdyloraError(
                f"train.resume=true: {key} would change from {old.get(key)!r} to {new[key]!r}, but only train.* "
                f"keys may change when resuming {run_dir}; train into a new run_dir to change {key}"
            )
        if key != "train.resume":
            log.info("resuming with %s: %r -> %r", key, old.get(key), new[key])


def clear_old_run(run_dir: Path) -> None:
    """overwrite=true: drop the previous run's files, once the new run's inputs have all loaded."""
    for name in (CHECKPOINTS, ADAPTER, BASE_MODEL, LOGS, EVAL, EXPORT):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (METRICS, CONFIG):
        (run_dir / name).unlink(missing_ok=True)
