"""How many CPU threads torch uses: all cores pay only when each matmul has enough work to share.

On a CPU, torch runs every op on all cores by default. For small models each op is too short to
split: the threads spend longer meeting at barriers than computing (a stories260K step measured
4.5× slower on 2 threads than on 1, docs/performance.md). `cpu_threads=auto` uses one thread
unless the model's typical matmul (tokens of a micro-batch × hidden size × hidden size) is large,
then all cores. The rule is deterministic, so a resumed run picks what the first run picked (thread
counts change float summation order, and resume is bit-identical). A thread count the user set
(`OMP_NUM_THREADS`, or `torch.set_num_threads` before qdylora ran) is left alone.
"""

from __future__ import annotations

import logging
import os

import torch

from qdylora_cli.config import parse_threads

log = logging.getLogger(__name__)

# Multiply-accumulates of one tokens × hidden × hidden matmul from which all cores beat one (measured
# with scripts/bench_threads.py, docs/performance.md).
ALL_CORES_FROM_MACS = 1 << 28
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


def auto_threads(hidden_size: int, tokens: int) -> int:
    """1, or every core torch would use, by the size of the model's typical matmul."""
    return _TORCH_DEFAULT if tokens * hidden_size * hidden_size >= ALL_CORES_FROM_MACS else 1


def set_cpu_threads(key: str, value: str | int, *, hidden_size: int, tokens: int) -> None:
    """Apply `key=value` (auto or a count) for a CPU run and say what was chosen, in one line."""
    count = parse_threads(key, value)
    if count is None and (reason := user_set_threads()):
        log.info("CPU threads: %d (%s; %s=auto leaves it)", torch.get_num_threads(), reason, key)
        return
    if count is None:
        count = auto_threads(hidden_size, tokens)
        why = (f"hidden size {hidden_size} × {tokens} tokens per micro-batch is "
               f"{'large' if count > 1 else 'small'}; set {key} to choose")
    else:
        why = f"{key}={count}"
    global _chosen
    torch.set_num_threads(count)
    _chosen = count
    log.info("CPU threads: %d of %d (%s)", count, _TORCH_DEFAULT, why)
