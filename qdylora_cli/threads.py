"""How many CPU threads torch uses: the free cores, as many as the model's matmuls can keep busy.

On a CPU, torch runs every op on all cores by default. Two things decide whether that pays
(scripts/bench_threads.py, docs/performance.md). Other work: a core busy with another process makes
every op's threads wait at a barrier for the descheduled one (stories260K on 2 cores with one of them
busy: 2 threads 3.2× slower than 1). Size: a matmul too small to split spends longer meeting than
computing. So `cpu_threads=auto` takes the cores no other process is running on, one per
THREAD_MACS multiply-accumulates of the model's typical matmul (tokens of a micro-batch × hidden
size × hidden size), at least one. A resumed run keeps the count of its first part: thread counts
change float summation order, and resume is bit-identical. A count the user set (`OMP_NUM_THREADS`,
or `torch.set_num_threads` before qdylora ran) is left alone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from qdylora_cli.config import parse_threads

log = logging.getLogger(__name__)

# Work per thread: stories260K (1,024 tokens × 64²: 4.2M) and the tiny recipe (~8M) both ran faster
# on 2 free cores than on 1 (docs/performance.md); smaller matmuls are not measured.
THREAD_MACS = 1 << 21
_TORCH_DEFAULT = torch.get_num_threads()  # what torch chose before anyone here changed it
_chosen: int | None = None  # what set_cpu_threads last set: not the user's choice


def user_set_threads() -> str | None:
    """How the user chose a thread count themselves, if they did."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    if torch.get_num_threads() not in (_TORCH_DEFAULT, _chosen):
        return f"torch.set_num_threads({torch.get_num_threads()})"
    return None


def busy_cores(samples: int = 5, interval_s: float = 0.05) -> int:
    """Cores other processes are running on: the fewest runnable threads seen, less this one.

    /proc/loadavg's running count is a snapshot; the fewest of a few samples ignores short-lived
    work. 0 where it cannot be read (not Linux).
    """
    loadavg = Path("/proc/loadavg")
    if not loadavg.exists():
        return 0
    seen = []
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        seen.append(int(loadavg.read_text().split()[3].split("/")[0]))
    return max(0, min(seen) - 1)


def auto_threads(hidden_size: int, tokens: int, busy: int) -> int:
    """The cores not `busy`, one per THREAD_MACS of the typical matmul, at least one."""
    free = max(1, _TORCH_DEFAULT - busy)
    return max(1, min(free, tokens * hidden_size * hidden_size // THREAD_MACS))


def set_cpu_threads(key: str, value: str | int, *, hidden_size: int, tokens: int, resumed: int | None = None) -> int:
    """Apply `key=value` (auto or a count) for a CPU run and say what was chosen, in one line.

    `resumed`: the count the run's first part used, which `auto` keeps. Returns the count in use.
    """
    count = parse_threads(key, value)
    if count is None and (reason := user_set_threads()):
        log.info("CPU threads: %d (%s; %s=auto leaves it)", torch.get_num_threads(), reason, key)
        return torch.get_num_threads()
    if count is None and resumed is not None:
        count, why = resumed, "as when the run started, so that resuming is bit-identical"
    elif count is None:
        busy = busy_cores()
        count = auto_threads(hidden_size, tokens, busy)
        why = (f"{busy} core(s) busy with other work, a {tokens} × {hidden_size} × {hidden_size} matmul; "
               f"set {key} to choose")
    else:
        why = f"{key}={count}"
    global _chosen
    torch.set_num_threads(count)
    _chosen = count
    log.info("CPU threads: %d of %d (%s)", count, _TORCH_DEFAULT, why)
    return count
