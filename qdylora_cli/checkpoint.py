"""Files that must survive a crash: atomic directory writes, training checkpoints, the final adapter.

Every directory is written under a temporary name and renamed into place, so a crash mid-write
never leaves a half-written directory where a good one was. Each checkpoint carries a manifest of
SHA-256 sums; a checkpoint whose files do not match it is skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qdylora_cli.errors import QdyloraError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _fsync_dir(path: Path) -> None:
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
        raise QdyloraError(f"cannot write {target}: {e.strerror} ({e.filename})") from None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        (tmp / MANIFEST).write_text(json.dumps(
            {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}, indent=1))
        old = None
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    except OSError as e:  # disk full, permissions, ...: the previous `target` is still in place
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno is None:
            raise
        raise QdyloraError(f"writing {target} failed: {e.strerror} ({e.filename}); nothing was replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    """Write a single file via a temporary name and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


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


def load_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and metadata of an adapter directory; a damaged or unreadable one is a one-line error."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file() or not (path / ADAPTER_CONFIG).is_file():
        raise QdyloraError(f"{path} holds no adapter (expected {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
    problem = verify_dir(path)
    if problem is not None and problem != "no manifest":
        raise QdyloraError(f"adapter in {path} is damaged: {problem}")
    try:
        return load_file(str(path / ADAPTER_WEIGHTS)), json.loads((path / ADAPTER_CONFIG).read_text())
    except Exception as e:  # safetensors and json raise several types; all mean an unreadable file
        raise QdyloraError(f"adapter in {path} is unreadable ({str(e).splitlines()[0]})") from None


# --- training checkpoints ------------------------------------------------------------------------


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
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
    target = Path(run_dir) / "checkpoints" / f"step-{step}"
    with atomic_dir(target, overwrite=True) as tmp:
        write(tmp)
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target
