"""Training on several processes: FSDP2 sharding of an NF4 model, gathering what it shards, replica checks.

Data parallel (DDP) needs nothing special: every process holds the whole NF4 model and the same
adapters, and accelerate averages the adapters' gradients (every adapter parameter takes part in
every step, so DDP needs no `find_unused_parameters`). FSDP (`conf/accelerate/fsdp.yaml`)
is for models whose NF4 weights do not fit on one GPU: each decoder layer becomes one FSDP2 unit
whose parameters are split across the processes and all-gathered one layer at a time.

FSDP shards parameters only; buffers stay whole on every GPU. NF4Linear keeps its packed 4-bit
codes in a buffer, so `make_nf4_shardable` turns them into a frozen uint8 parameter first. The
codes are 97% of an NF4 layer (half a byte per weight; the 8-bit block statistics add 1/64 of a
byte), so this shards the model. The statistics stay buffers on purpose: FSDP's mixed-precision
policy casts floating parameters to the compute dtype for the all-gather, which would corrupt
float32 statistics; integer parameters it leaves alone. With FSDP2, gathering mixed dtypes in
one unit is supported (the all-gather goes through a byte buffer).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from qdylora_cli.adapters import adapter_state_dict, iter_adapters, upgrade_per_slice_state
from qdylora_cli.errors import QdyloraError
from qdylora_cli.quant import NF4Linear

log = logging.getLogger(__name__)


def make_nf4_shardable(model: nn.Module) -> int:
    """Re-register every NF4Linear's packed codes as a frozen uint8 parameter, so FSDP shards them.

    Forward reads `layer.weight` whichever it is; returns the number of layers changed.
    """
    changed = 0
    for layer in model.modules():
        if isinstance(layer, NF4Linear) and "weight" in layer._buffers:
            packed = layer._buffers.pop("weight")
            layer._non_persistent_buffers_set.discard("weight")
            layer.weight = nn.Parameter(packed, requires_grad=False)
            changed += 1
    return changed


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def gathered_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`adapter_state_dict` of the whole model, on every process, also when FSDP shards it; on the CPU.

    Collective under FSDP: every process must call it. Each sharded tensor is gathered from its
    float32 shards on its own (`full_tensor`), so memory stays at one tensor. FSDP's own `unshard`
    would hand them over in its mixed-precision dtype (bf16), rounding what checkpoints and the
    final adapter keep.
    """
    return {key: (value.full_tensor() if hasattr(value, "full_tensor") else value).cpu()
            for key, value in adapter_state_dict(model).items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict; under FSDP the full (unsharded) one, on the CPU (collective)."""
    if not _fsdp_units(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`: under FSDP the main process's full state is split among the processes.

    A state saved by qdylora 0.1 (one parameter per rank slice) is converted first.
    """
    if not _fsdp_units(model):
        optimizer.load_state_dict(upgrade_per_slice_state(state, [a for _, a in iter_adapters(model)]))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def fingerprint(adapters: dict[str, torch.Tensor], ranks: list[int]) -> str:
    """A short digest of the adapter weights and of the ranks drawn so far."""
    digest = hashlib.sha256(",".join(map(str, ranks)).encode())
    for key in sorted(adapters):
        digest.update(key.encode())
        digest.update(adapters[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_replicas(accelerator: Any, adapters: dict[str, torch.Tensor], ranks: list[int], step: int) -> None:
    """All processes must hold the same adapters and have drawn the same ranks; stop if they do not.

    Data parallelism averages gradients on the assumption that every process trains the same
    model at the same rank; a divergence (a process-dependent seed, a bug) would otherwise go
    unnoticed and average unrelated updates. Runs at every checkpoint.
    """
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    mine = fingerprint(adapters, ranks)
    log.info("process %d/%d at step %d: adapters and ranks fingerprint %s", accelerator.process_index,
             accelerator.num_processes, step, mine)
    prints = gather_object([mine])
    if len(set(prints)) > 1:
        raise QdyloraError(
            f"at step {step} the {accelerator.num_processes} processes hold different adapters or drew different "
            f"ranks (fingerprints {', '.join(prints)}); this is a bug, please report it"
        )
