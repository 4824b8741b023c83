"""A run directory: what is in it, who may write it, and how a new run takes it over.

    config.yaml     the resolved config of the run (absolute paths)
    metrics.jsonl   one JSON record per logged step
    checkpoints/    step-N/: adapter, optimizer and loop state
    adapter/        the finished adapter: every rank 1..r_max
    base_model/     models built from a config: their weights, so the run rebuilds without the recipe
    logs/           the trackers of train.report_to
    eval/, export/  what `qdylora eval` and `qdylora export` write
    allocate/       what `qdylora allocate` writes: allocation.json (a rank per layer) and its report

Every directory is written under a temporary name and renamed into place, so a crash mid-write
never leaves a half-written directory where a good one was; each carries a manifest of SHA-256
sums, and a checkpoint whose files do not match it is skipped in favour of the previous one.

Beside the run directories, in their parent folder (`runs/`):

    last_run.json   {"run": NAME, "started": TIME}: the run `qdylora train` started (or resumed) last,
                    so that eval, export, generate and allocate open it when no run is named

Training holds an OS lock (`flock`) on the run directory itself for as long as it runs. The
kernel drops the lock when the process ends, however it ends (SIGKILL included), so a lock is
never stale. `lock.json` beside it names the holder (PID, host, start, command) so that a second
writer can say who holds the run; it is informative only, the flock is what excludes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from qdylora_cli.choices import RETIRED_OPTIMIZERS
from qdylora_cli.config import TrainConfig, absolute_paths, flat_config, to_typed, validate_train
from qdylora_cli.errors import DiskFullError, QdyloraError, first_line

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG, METRICS, CHECKPOINTS, ADAPTER, BASE_MODEL, LOGS, EVAL, EXPORT = (
    "config.yaml", "metrics.jsonl", "checkpoints", "adapter", "base_model", "logs", "eval", "export")
ALLOCATE = "allocate"
LOCK_INFO = "lock.json"
MANIFEST = "manifest.json"  # in every directory written atomically: the SHA-256 of each file
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"  # in adapter/ and each checkpoint
TRAINER_STATE = "trainer_state.json"  # in each checkpoint: step, data position, CPU threads, readable without torch
EXPORT_INFO = "qdylora_export.json"  # in a merged export: its rank and the run it came from
LAST_RUN = "last_run.json"  # in the runs' parent folder: the name of the run trained last
# Keys a resumed run may change: the rest defines what is trained, and changing it would mix two runs.
# The seed and the shape of a step fix the order of the batches, and the saved data position counts in it.
# optimizer.paged only says where the moments live; optimizer.state_bits (like every other optimizer
# key) is fixed: the checkpoint holds the moments in its format.
# data.num_proc and data.cache_dir say how and where the data is tokenized, never what the tokens are.
RESUMABLE = ("train.", "launcher.", "run_dir", "name", "overwrite", "optimizer.paged", "data.num_proc",
             "data.cache_dir")
FIXED_ON_RESUME = ("train.seed", "train.batch_size", "train.grad_accum", "launcher.num_processes")


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
    """A resume may change RESUMABLE keys (not FIXED_ON_RESUME): each change is said, any other names its key and stops."""
    old, new = flat_config(load_run_config(run_dir)), flat_config(absolute_paths(cfg))
    for key in new:
        if old.get(key) == new[key]:
            continue
        if not key.startswith(RESUMABLE) or key in FIXED_ON_RESUME:
            raise QdyloraError(
                f"train.resume=true: {key} would change from {old.get(key)!r} to {new[key]!r}, but only train.* and "
                f"launcher.* keys (except {', '.join(FIXED_ON_RESUME)}) may change when resuming {run_dir}; "
                f"train into a new run_dir to change {key}"
            )
        if key != "train.resume":
            log.info("resuming with %s: %r -> %r", key, old.get(key), new[key])


def clear_old_run(run_dir: Path) -> None:
    """overwrite=true: drop the previous run's files, once the new run's inputs have all loaded."""
    for name in (CHECKPOINTS, ADAPTER, BASE_MODEL, LOGS, EVAL, EXPORT, ALLOCATE):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (METRICS, CONFIG):
        (run_dir / name).unlink(missing_ok=True)


# --- atomic files, checkpoints, the adapter --------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


FULL_BELOW = 1 << 20  # free bytes under which a failed write is put down to a full disk
_DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# torch's writer reports a failed write without its errno ("unexpected pos", "file write failed")
_TORCH_WRITE_WORDS = ("PytorchStreamWriter", "inline_container.cc", "iostream error", "file write failed")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def write_failed(error: BaseException) -> bool:
    """Whether `error` is a failed write (an OSError, safetensors' or torch's word for one), not a bug."""
    return any(isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and "I/O error" in str(e))
               or any(w in str(e) for w in _TORCH_WRITE_WORDS) for e in _chain(error))


def disk_full(error: BaseException, where: Path | None = None) -> bool:
    """Whether `error` (or what caused it) means the disk or quota is full: ENOSPC/EDQUOT, safetensors'
    message for them, or a torch write failure while `where`'s file system has (almost) nothing free."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(w in str(e) for w in _DISK_FULL_WORDS):
            return True
    torch_write = any(w in str(e) for e in _chain(error) for w in _TORCH_WRITE_WORDS)
    return torch_write and where is not None and _free_bytes(where) < FULL_BELOW


def _write_error(target: Path, error: BaseException, where: Path) -> QdyloraError | None:
    """The one-line error for a failed write of `target` (None: not a write failure, a bug to show in full)."""
    if disk_full(error, where):
        return DiskFullError(f"disk full: cannot write {target} (No space left on device); nothing was replaced")
    if not write_failed(error):
        return None
    cause = next((e for e in _chain(error) if isinstance(e, OSError)), error)
    if isinstance(cause, OSError) and cause.strerror:
        return QdyloraError(f"writing {target} failed: {cause.strerror} ({cause.filename or target}); "
                            "nothing was replaced")
    return QdyloraError(f"writing {target} failed ({first_line(error)}); nothing was replaced")


@contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only once the block finishes without error.

    With `overwrite`, an existing `target` is replaced; it is moved aside first and deleted only
    after the new directory is in place, so one of the two always exists.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise QdyloraError(f"{target} already exists; pass overwrite=true to replace it")
    check_writable(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        if disk_full(e):
            raise DiskFullError(f"disk full: cannot write {target} (No space left on device)") from None
        raise QdyloraError(f"cannot write {target}: {e.strerror} ({e.filename})") from None
    old = None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        sums = {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        with open(tmp / MANIFEST, "w") as fh:  # opened after the sums: it does not list itself
            fh.write(json.dumps(sums, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        fsync_dir(target.parent)
    except BaseException as e:
        # Disk full, permissions, ...: the previous `target` stays (put back if it was moved aside already).
        # safetensors and torch report a full disk in their own words: classified before the cleanup frees space.
        error = _write_error(target, e, tmp) if isinstance(e, Exception) and not isinstance(e, QdyloraError) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            with contextlib.suppress(OSError):
                old.rename(target)
        if error is not None:
            raise error from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(path: Path, key: str | None = None) -> None:
    """The directory `path` can be created or replaced: its nearest existing ancestor is a writable directory.

    Call it before expensive work whose result goes to `path`, so a bad path costs nothing.
    """
    path = Path(path)
    name = f"{key}={str(path)!r}" if key else str(path)
    if path.exists() and not path.is_dir():
        raise QdyloraError(f"{name} is a file, not a directory")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise QdyloraError(f"{name}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QdyloraError(f"{name}: {existing} is not writable")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a single file via a temporary name and rename: `path` is the old file or the new one, never
    half of one. A full disk is one line (DiskFullError); any other OSError is raised, naming `path`."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise DiskFullError(f"disk full: cannot write {path} (No space left on device); it was left as it was") from None
        raise OSError(e.errno, e.strerror, str(path)) from None


def verify_dir(path: Path) -> str | None:
    """Return None if every file listed in the manifest is present with the right checksum, else why not."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return "no manifest"
    try:
        expected = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "unreadable manifest"
    for name, digest in expected.items():
        f = Path(path) / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


# --- adapter directory -------------------------------------------------------------------------


def save_adapter(target: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any], *, overwrite: bool = True) -> None:
    """Write `adapter.safetensors` (all ranks) and `adapter_config.json` (how to rebuild the model)."""
    from safetensors.torch import save_file

    with atomic_dir(target, overwrite=overwrite) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))


@contextmanager
def reading_adapter(path: Path) -> Iterator[None]:
    """Check an adapter directory's manifest, then make any error while reading it one line."""
    problem = verify_dir(path)
    if problem is not None and problem != "no manifest":
        raise QdyloraError(f"adapter in {path} is damaged: {problem}")
    try:
        yield
    except QdyloraError:
        raise
    except Exception as e:  # safetensors, json and a missing key raise several types; all mean an unreadable file
        raise QdyloraError(f"adapter in {path} is unreadable ({first_line(e)})") from None


def load_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and metadata of an adapter directory; a damaged or unreadable one is a one-line error."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file() or not (path / ADAPTER_CONFIG).is_file():
        raise QdyloraError(f"{path} holds no adapter (expected {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
    with reading_adapter(path):
        return load_file(str(path / ADAPTER_WEIGHTS)), json.loads((path / ADAPTER_CONFIG).read_text())


# --- training checkpoints ------------------------------------------------------------------------


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes its manifest; damaged ones are skipped with a warning."""
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        problem = verify_dir(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping damaged checkpoint %s (%s); trying the one before", ckpt, problem)
    return None


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], keep_last: int) -> Path:
    """Write checkpoint `step` atomically with `write(tmp_dir)`, then drop all but the newest `keep_last`."""
    target = Path(run_dir) / CHECKPOINTS / f"step-{step}"
    try:
        with atomic_dir(target, overwrite=True) as tmp:
            write(tmp)
    except QdyloraError as e:  # a full disk: the checkpoints already written are all still there
        raise type(e)(f"{e}; the last good checkpoint is {latest_good_checkpoint(run_dir) or 'none'}") from None
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


# --- the run's config ------------------------------------------------------------------------------


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML with absolute paths, atomically (a crash never leaves half a file)."""
    atomic_write_text(Path(path), OmegaConf.to_yaml(OmegaConf.structured(absolute_paths(cfg)), resolve=True))


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The typed train config a run was made with (paths are not re-checked: eval may run elsewhere)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        beside = runs_in(Path(run_dir).parent)  # a mistyped name: say which ones would do
        listed = f"; {Path(run_dir).parent}/ holds {', '.join(p.name for p in beside)}" if beside else ""
        raise QdyloraError(f"{run_dir} is not a qdylora run directory (it has no config.yaml){listed}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # any YAML problem is the file's fault
        raise QdyloraError(f"{path}: not a readable config ({first_line(e)})") from None
    return _saved_train_config(node)


def _saved_train_config(node: DictConfig | dict) -> TrainConfig:
    """A saved run config, upgraded and typed (paths are not re-checked: eval may run elsewhere)."""
    return validate_train(to_typed("train", upgrade_saved_config(OmegaConf.create(node))), check_paths=False)


def upgrade_saved_config(node: DictConfig) -> DictConfig:
    """A run config saved by qdylora 0.1, with the values that reproduce it for keys added since.

    0.1 scaled rank b by α/b and drew one rank per step; its bitsandbytes optimizers became adamw.
    """
    node = OmegaConf.create(OmegaConf.to_container(node))  # a copy, without the struct flag
    if "adapter" in node and "scale" not in node.adapter:
        node.adapter.scale = "alpha_over_rank"
    if "rank_schedule" in node and "ranks_per_step" not in node.rank_schedule:
        node.rank_schedule.ranks_per_step = 1
    if "optimizer" in node and node.optimizer.get("name") in RETIRED_OPTIMIZERS:
        node.optimizer.name = "adamw"
    return node


def load_export_info(path: str | Path) -> dict[str, Any] | None:
    """What `qdylora export` recorded in a merged model directory (rank, source run, its config); else None."""
    info = Path(path) / EXPORT_INFO
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QdyloraError(f"{info}: not readable JSON ({e})") from None


def load_eval_source(path: str | Path) -> tuple[TrainConfig, int | None]:
    """The train config behind a run dir or a merged export, and the export's rank (None for a run)."""
    info = None if (Path(path) / CONFIG).is_file() else load_export_info(path)
    if info is None:
        return load_run_config(path), None
    if "run_config" not in info or "rank" not in info:
        raise QdyloraError(f"{Path(path) / EXPORT_INFO}: missing run_config or rank; re-export the model")
    if info["rank"] is None:
        raise QdyloraError(f"{path} is a merged export of an allocation (a rank per layer), not of one rank: its loss "
                           "is in the allocation's summary.json (qdylora allocate)")
    return _saved_train_config(info["run_config"]), int(info["rank"])


# --- the run trained last --------------------------------------------------------------------------

NAME_A_RUN = "name one with +recipe=NAME or run_dir=PATH"


def record_last_run(run_dir: str | Path) -> None:
    """Write `last_run.json` beside `run_dir`, so that eval, export, generate and allocate open this run
    when no run is named. Only its name is kept: a runs folder that is moved or copied keeps its record."""
    run_dir = Path(os.path.abspath(run_dir))  # abspath, not resolve: a symlinked runs folder keeps its names
    record = run_dir.parent / LAST_RUN
    try:
        atomic_write_text(record, json.dumps({"run": run_dir.name, "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    except (OSError, DiskFullError) as e:  # a convenience: the run trains without it, the newest config.yaml stands in
        log.warning("could not write %s (%s): eval and export without run_dir= may open another run", record,
                    getattr(e, "strerror", None) or e)


def runs_in(folder: str | Path) -> list[Path]:
    """The runs directly in `folder` (the folders with a config.yaml), by name; none if there is no folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p / CONFIG).is_file())


def _recorded_run(folder: Path) -> str | None:
    """The name in `folder`'s last_run.json; None if it is missing, unreadable or not a plain name."""
    try:
        name = json.loads((folder / LAST_RUN).read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # a name, never a path: a record cannot send a command out of its folder
    return name if isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name else None


def last_run(folder: str | Path) -> tuple[Path, str]:
    """The run in `folder` trained last, and why that one: the run last_run.json names while it is still a
    run, else (runs trained before qdylora kept the record) the one whose config.yaml is newest."""
    folder = Path(folder)
    runs, record, name = runs_in(folder), folder / LAST_RUN, _recorded_run(folder)
    if name is not None and (folder / name / CONFIG).is_file():
        return folder / name, f"the run trained last, per {record}"
    if not runs:
        gone = f"{record} names {folder / name}, which is gone, and " if name else ""
        raise QdyloraError(f"no run to open: {gone}{folder}/ holds no run (a folder with a config.yaml); train one "
                           f"with `qdylora train +recipe=NAME`, or {NAME_A_RUN}")
    why = (f"{record} names {name}, which is not a run" if name else
           f"{record} is unreadable" if record.exists() else f"no {record}")
    newest = max(runs, key=lambda p: ((p / CONFIG).stat().st_mtime_ns, p.name))
    return newest, f"the run whose config.yaml is newest; {why}"
