"""`qdylora plan`: will a run fit on a GPU? One real training step on fake tensors, its memory counted.

The step is the one `qdylora train` takes, from the same config: the model built from its
config.json alone (no weights are read), its target layers NF4 as the loader makes them, adapters
for every rank, the rank-aware AdamW; then the forward at rank r_max (the widest adapters: the
worst case), backward, clipping and the optimizer step, with the configured micro-batch, the
longest sequence the data settings allow and gradient checkpointing as configured. It runs on
PyTorch's fake tensors, which have shapes and dtypes but no data: a 40B model costs no memory and
its step takes seconds. `DeviceMemory` adds up the bytes of every tensor alive at each moment.

Why the numbers are those of a GPU step: fake CUDA tensors fail in a CPU-only PyTorch, so the
tensors are fake CPU tensors, but every op takes its CUDA dtype and code path: CPU autocast with
CUDA's float32 rules added (cuda_autocast.py: LayerNorm, softmax, ... in float32), the NF4 layers
on their GPU path (each weight dequantized whole, with bitsandbytes' kernels where installed:
`quant.gpu_code_path`), and attention through SDPA, whose CPU kernel keeps O(L) memory per head as
the flash and memory-efficient CUDA kernels do (a V100 or T4 has no flash attention; its
memory-efficient kernel has the same footprint). What a step on fake tensors cannot see: the CUDA
context (an allowance is added) and the caching allocator's fragmentation (the headroom).

The step measured is one in the middle of a run: the optimizer state exists and, with gradient
accumulation, so do the gradients of the step's earlier micro-batches.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, PretrainedConfig

from qdylora_cli.adapters import find_target_modules, inject_adapters, set_rank, trained_slices
from qdylora_cli.choices import GPUS
from qdylora_cli.config import PlanConfig, TrainConfig
from qdylora_cli.cuda_autocast import CudaAutocastPolicy
from qdylora_cli.data import max_sequence_length
from qdylora_cli.errors import QdyloraError, ResourceError, first_line
from qdylora_cli.loading import build_skeleton, prequantized_nf4
from qdylora_cli.loss import token_losses
from qdylora_cli.model import enable_gradient_checkpointing, torch_dtype
from qdylora_cli.quant import NF4Linear, gpu_code_path, warm_caches
from qdylora_cli.train import build_optimizer, with_device_defaults, within_context

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    gib: float  # device memory as nvidia-smi reports it
    bf16: bool  # compute capability 8.0 or newer


CUDA_CONTEXT_GIB = 0.5  # PyTorch's CUDA context and cuBLAS workspace: ~0.3-0.6 GiB on these GPUs


def parse_gpu(value: str) -> GPU:
    """A GPU of choices.GPUS by name, or a size in GiB (with bf16: a GPU of compute capability 8 or newer)."""
    if value in GPUS:
        name, mib, bf16 = GPUS[value]
        return GPU(name, mib / 1024, bf16)
    try:
        gib = float(value)
    except ValueError:
        gib = math.nan
    if not gib > 0:
        raise QdyloraError(f"gpu={value!r}: expected one of {', '.join(GPUS)} or a size in GiB (e.g. gpu=24)")
    return GPU(f"{gib:g} GiB GPU", gib, True)


# --- counting bytes --------------------------------------------------------------------------------


class DeviceMemory(TorchDispatchMode):
    """The bytes of every storage alive, by category, and their peak: as ops run, fake tensors included.

    A storage is counted when an op first returns a tensor of it, under the category of the
    current phase, and uncounted when it is freed (a weakref finalizer); views share their storage.
    Storages that exist before (weights) are added with `hold`; `retag` moves one to a category
    found later (a gradient is an op's output until autograd keeps it as `.grad`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.category: dict[int, str] = {}
        self.live: dict[str, int] = defaultdict(int)
        self.total = 0
        self.phase = "activations"
        self.peaks: dict[str, tuple[int, dict[str, int]]] = {}  # phase -> (total, live by category) at its peak

    def hold(self, tensor: torch.Tensor, category: str) -> None:
        self._count(tensor.untyped_storage(), category)

    def retag(self, tensor: torch.Tensor, category: str) -> None:
        key = id(tensor.untyped_storage())
        old = self.category.get(key)
        if old is not None and old != category:
            n = tensor.untyped_storage().nbytes()
            self.live[old] -= n
            self.live[category] += n
            self.category[key] = category

    def reset_peaks(self) -> None:
        self.peaks = {}

    def _count(self, storage: torch.UntypedStorage, category: str) -> None:
        key = id(storage)
        if key in self.category:
            return
        n = storage.nbytes()
        self.category[key] = category
        self.live[category] += n
        self.total += n
        weakref.finalize(storage, self._free, key, n)
        if self.total > self.peaks.get(self.phase, (-1,))[0]:
            self.peaks[self.phase] = (self.total, dict(self.live))

    def _free(self, key: int, n: int) -> None:
        self.live[self.category.pop(key)] -= n
        self.total -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        category = "optimizer temporaries" if self.phase == "optimizer" else "activations and temporaries"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage(), category)
        return out

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        self.phase, before = phase, self.phase
        try:
            yield
        finally:
            self.phase = before


# --- the model and its step ------------------------------------------------------------------------


def model_config(cfg: TrainConfig) -> PretrainedConfig:
    """The model's config alone: `model.config`, or config.json of a local directory or hub id."""
    m = cfg.model
    if m.config is not None:
        config = dict(m.config)
        return AutoConfig.for_model(config.pop("model_type"), **config)
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - missing, offline, gated: the plan cannot start without it
        raise QdyloraError(f"model.name_or_path={m.name_or_path!r}: no readable config.json ({first_line(e)}); "
                           "plan needs the model's config.json only, no weights") from None
    if prequantized_nf4(config):
        del config.quantization_config  # the model we build is ours, as the loader does
    return config


def build_model(cfg: TrainConfig, config: PretrainedConfig, device: str = "cpu") -> torch.nn.Module:
    """The training model of `cfg`, as the loader leaves it (target layers NF4) with adapters on; its
    weights are left unset: the step's memory does not depend on them."""
    m, a, q = cfg.model, cfg.adapter, cfg.quant
    dtype = torch_dtype(m.dtype)
    model = build_skeleton(config, dtype=dtype, trust_remote_code=m.trust_remote_code)
    if q.type == "nf4":
        for name in find_target_modules(model, a.target_modules):
            parent, _, attr = name.rpartition(".")
            linear = model.get_submodule(name)
            setattr(model.get_submodule(parent), attr, NF4Linear(
                linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=dtype,
                blocksize=q.blocksize, double_quant=q.double_quant, device=device))
    _materialize(model, torch.device(device))
    inject_adapters(model, r_max=a.r_max, alpha=a.alpha, dropout=a.dropout, mode=a.mode, variant=a.variant,
                    scale=a.scale, target_modules=a.target_modules)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """The skeleton's `meta` parameters as (unset) tensors on `device`, a tied one staying one tensor; its
    buffers moved there."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)


def _weights(model: torch.nn.Module, memory: DeviceMemory) -> None:
    nf4 = {id(t) for layer in model.modules() if isinstance(layer, NF4Linear)
           for t in (layer.weight, layer.absmax, layer.nested_absmax) if t is not None}
    for t in [*model.parameters(), *model.buffers()]:
        category = ("NF4 weights" if id(t) in nf4 else "adapters" if t.requires_grad else "other frozen weights")
        memory.hold(t, category)


@dataclass
class Measured:
    """The peak bytes of each phase of the measured step (and of a validation pass), by category."""

    peaks: dict[str, tuple[int, dict[str, int]]]  # phase -> (bytes, bytes by category) at its peak
    state_bytes: int  # the optimizer state
    allocator_peak: int | None = None  # on a GPU: torch.cuda.max_memory_allocated over the same step

    @property
    def peak(self) -> tuple[int, dict[str, int], str]:
        phase = max(self.peaks, key=lambda p: self.peaks[p][0])
        return (*self.peaks[phase], phase)


def measure(cfg: TrainConfig, config: PretrainedConfig, length: int, *, on: str = "fake") -> Measured:
    """Build the model and count the bytes of a training step in the middle of a run (and of a validation pass).

    In the middle of a run the optimizer state exists, and with gradient accumulation every micro-batch
    but the first adds into gradients that exist: the one whose peak is measured here (zero gradients
    stand for the earlier micro-batches; accumulating allocates exactly as after a real one).
    `on`: "fake" (the plan: fake CPU tensors), "cpu" (real CPU tensors: the same accounting of the same
    ops, which checks that fake tensors change nothing in it) or "cuda" (a real GPU step, whose
    allocator's peak is recorded beside: scripts/check_plan.py compares it with the plan).
    """
    t, a = cfg.train, cfg.adapter
    device = "cuda" if on == "cuda" else "cpu"
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
    memory = DeviceMemory()
    warm_caches(device)
    with (FakeTensorMode(allow_non_fake_inputs=True) if on == "fake" else nullcontext(), gpu_code_path(),
          CudaAutocastPolicy() if device == "cpu" else nullcontext(), _rows_without_padding()):
        model = build_model(cfg, config, device)
        optimizer = build_optimizer(cfg.optimizer, model)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # a gradient is an op's output until autograd keeps it
            p.register_post_accumulate_grad_hook(lambda p: memory.retag(p.grad, "gradients"))
        ids = torch.zeros(t.batch_size, length, dtype=torch.long, device=device)
        autocast = (lambda: torch.autocast(device, low)) if low is not None else nullcontext
        with memory:
            _weights(model, memory)
            _optimizer_state(optimizer, params, memory)
            set_rank(model, a.r_max)
            if t.grad_accum > 1:
                for p in params:
                    p.grad = torch.zeros_like(p)
                    memory.retag(p.grad, "gradients")
            memory.reset_peaks()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            taught = _taught_rows(cfg)
            with memory.during("forward"), autocast():
                teacher = None
                if taught:  # in-place distillation: the top rank's logits for the lower ranks' rows, kept to backward
                    with torch.no_grad():
                        teacher = model(input_ids=ids[:taught], use_cache=False).logits
                logits = model(input_ids=ids, use_cache=False).logits
                loss = token_losses(logits, ids).sum()
                if teacher is not None:  # loss.distill_losses at every position (fake tensors cannot take its mask)
                    student = F.log_softmax(logits[:taught].float(), dim=-1)
                    target = F.log_softmax(teacher.float(), dim=-1)
                    loss = loss + F.kl_div(student, target, log_target=True, reduction="none").sum()
                del logits
            with memory.during("backward"):
                loss.backward()
            del loss, teacher
            with memory.during("optimizer"):
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
                optimizer.mark_trained(trained_slices(a.r_max, a.mode))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if t.eval_every > 0:
                _validation(model, ids, autocast, memory)
        allocator = torch.cuda.max_memory_allocated() if device == "cuda" else None
        return Measured(memory.peaks, memory.live["optimizer state"], allocator)


def _taught_rows(cfg: TrainConfig) -> int:
    """Rows of the costliest micro-batch that learn from the teacher (rank_schedule.distill): those below
    the step's top rank. With gradient accumulation (or more ranks than rows) some micro-batch has no
    row at the top rank, so all its rows are taught; otherwise all but the top rank's chunk."""
    k, rows = cfg.rank_schedule.ranks_per_step, cfg.train.batch_size
    if cfg.rank_schedule.distill <= 0 or k < 2:
        return 0
    if cfg.train.grad_accum > 1 or k > rows:
        return rows
    return rows - rows // k


@contextmanager
def _rows_without_padding() -> Iterator[None]:
    """Attention as for rows without padding: causal, with no mask tensor, as SDPA's flash and memory-
    efficient kernels run it on a GPU. transformers finds that out by reading the positions' values;
    fake tensors have none, so it would build an L×L mask and send attention down SDPA's math path,
    with L×L scores per head. Its own mask registry tells it instead: no mask."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # transformers 4 before masking_utils: masks come from the model's own code
        yield
        return
    ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


def _optimizer_state(optimizer: Any, params: list[torch.nn.Parameter], memory: DeviceMemory) -> None:
    """The state of every slice, as the first step leaves it: a step over zero gradients allocates it."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                memory.retag(value, "optimizer state")


@torch.no_grad()
def _validation(model: torch.nn.Module, ids: torch.Tensor, autocast: Callable[[], Any], memory: DeviceMemory) -> None:
    """The validation pass of training (train.validate): one rank per forward, the widest one counted."""
    model.eval()
    with memory.during("validation"), autocast():
        token_losses(model(input_ids=ids, use_cache=False).logits, ids).sum()
    model.train()


# --- depth, and what else fits ----------------------------------------------------------------------

# Depths measured to extrapolate from: even (for models whose layers alternate in pairs), and past the
# first few layers, where the per-layer growth of a peak can still change (measured on Falcon-40B).
SHALLOW = (4, 8)


def depth(config: PretrainedConfig) -> int | None:
    return getattr(config, "num_hidden_layers", None)


def with_depth(config: PretrainedConfig, n: int) -> PretrainedConfig:
    """`config` with its first n decoder layers; per-layer lists (e.g. `layer_types`) cut to n too."""
    layers = depth(config)
    shallow = copy.deepcopy(config)
    for key, value in config.to_diff_dict().items():
        if isinstance(value, list) and len(value) == layers:
            setattr(shallow, key, value[:n])
    shallow.num_hidden_layers = n
    return shallow


def estimate(cfg: TrainConfig, config: PretrainedConfig, length: int) -> Measured:
    """`measure` at full depth, from two shallow models: the decoder layers are alike (weights, adapters,
    gradients, optimizer state, checkpointed inputs), so every phase's peak, and each of its categories,
    grows by the same bytes per layer and two depths give the full one. Exact for such models
    (tests/test_plan.py compares), and seconds instead of a minute for a 60-layer model."""
    layers = depth(config)
    if layers is None or layers <= SHALLOW[1]:
        return measure(cfg, config, length)
    a, b = (measure(cfg, with_depth(config, n), length) for n in SHALLOW)

    def full(x: int, y: int) -> int:
        return x + (y - x) * (layers - SHALLOW[0]) // (SHALLOW[1] - SHALLOW[0])

    peaks = {}
    for phase, (total, by_category) in a.peaks.items():
        deeper = b.peaks[phase]
        peaks[phase] = (full(total, deeper[0]),
                        {c: full(by_category.get(c, 0), deeper[1].get(c, 0)) for c in by_category.keys() | deeper[1]})
    return Measured(peaks, full(a.state_bytes, b.state_bytes))


def largest(peak: Callable[[int], int], x0: int, p0: int, budget: int, high: int) -> int | None:
    """The largest x in 1..high with peak(x) <= budget, given p0 = peak(x0). The peak is affine in each of
    r_max, micro-batch and sequence length (adapters, gradients and state grow with r_max; activations
    and logits with tokens; attention is O(L) per head): one more measurement fixes the line
    (tests/test_plan.py checks its answer against a measurement)."""
    x1 = 2 * x0 if 2 * x0 <= high else max(1, x0 // 2)
    if x1 == x0:
        return x0 if p0 <= budget else None
    slope = (peak(x1) - p0) / (x1 - x0)
    if slope <= 0:  # the peak does not grow with x: it fits everywhere or nowhere
        return high if p0 <= budget else None
    best = min(high, math.floor(x0 + (budget - p0) / slope))
    return best if best >= 1 else None


@dataclass
class Limits:
    """What fits on the GPU with every other setting as configured (None: not even 1)."""

    r_max: int | None
    batch_size: int | None
    length: int | None


def limits(cfg: TrainConfig, config: PretrainedConfig, length: int, base: int, budget: int) -> Limits:
    """The largest adapter.r_max, train.batch_size and sequence length that fit in `budget` bytes."""
    context = getattr(config, "max_position_embeddings", None) or 1 << 17

    def with_r(r: int) -> int:
        return estimate(replace(cfg, adapter=replace(cfg.adapter, r_max=r)), config, length).peak[0]

    def with_batch(b: int) -> int:
        return estimate(replace(cfg, train=replace(cfg.train, batch_size=b)), config, length).peak[0]

    def with_length(n: int) -> int:
        return estimate(cfg, config, n).peak[0]

    fits_length = largest(with_length, length, base, budget, context)
    return Limits(largest(with_r, cfg.adapter.r_max, base, budget, 1 << 14),
                  largest(with_batch, cfg.train.batch_size, base, budget, 1 << 14),
                  fits_length // 8 * 8 if fits_length and fits_length >= 8 else fits_length)


# --- the command ------------------------------------------------------------------------------------


CATEGORIES = ("NF4 weights", "other frozen weights", "adapters", "gradients", "optimizer state",
              "optimizer temporaries", "activations and temporaries")


def plan_config(cfg: TrainConfig, gpu: GPU) -> TrainConfig:
    """`cfg` with the auto settings made concrete as on `gpu` (bf16 or fp16, checkpointing on)."""
    return within_context(with_device_defaults(cfg, on_cuda=True, bf16=gpu.bf16))


def run(plan: PlanConfig) -> None:
    """Print the plan; a ResourceError (exit 1) when the run does not fit on the GPU."""
    started = time.perf_counter()
    gpu = parse_gpu(plan.gpu)
    cfg = plan_config(plan.train, gpu)
    config = model_config(cfg)
    length, keys = max_sequence_length(cfg.data)
    measured = estimate(cfg, config, length)
    peak, by_category, phase = measured.peak
    context = int(CUDA_CONTEXT_GIB * GIB)
    budget = int(gpu.gib * GIB) - context
    fits = limits(cfg, config, length, peak, budget)
    _print(cfg, gpu, by_category, phase, peak + context, f"sequence length {length} ({keys})")
    print(f"fits on the {gpu.name}, each with the other settings as given: {_what_fits(fits)}")
    paged = cfg.optimizer.paged != "false"  # on a GPU with bitsandbytes, one process or DDP (optim.resolve_paged)
    if paged:
        # The driver may move the state to host RAM while forward and backward need the memory; the
        # optimizer step prefetches it back, when activations are gone.
        computing = max(total for p, (total, _) in measured.peaks.items() if p != "optimizer")
        paged_peak = max(computing - measured.state_bytes, measured.peaks["optimizer"][0])
        print(f"optimizer.paged: the optimizer state ({_size(measured.state_bytes)}) can wait in host RAM during "
              f"forward and backward; the peak is then {_size(paged_peak + context)} (with bitsandbytes installed; "
              "not under FSDP, which shards the state instead)")
    verdict = ("fits" if peak <= budget else "fits with paging (slower: the state moves every step)"
               if paged and paged_peak <= budget else "does not fit")
    print(f"peak {_size(peak + context)} of {gpu.gib:.2f} GiB: {verdict} (planned in "
          f"{time.perf_counter() - started:.0f}s)")
    if verdict == "does not fit":
        raise ResourceError(f"does not fit: one training step needs {_size(peak + context)} and the {gpu.name} has "
                            f"{gpu.gib:.2f} GiB; it fits with {_what_fits(fits)}")


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def _what_fits(fits: Limits) -> str:
    def at_most(key: str, value: int | None) -> str:
        return f"{key} <= {value}" if value is not None else f"{key}: not even 1"

    return ", ".join([at_most("adapter.r_max", fits.r_max), at_most("train.batch_size", fits.batch_size),
                      at_most("sequence length", fits.length)])


def _print(cfg: TrainConfig, gpu: GPU, by_category: dict[str, int], phase: str, need: int, length: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = cfg.train
    table = Table()
    table.add_column("memory")
    table.add_column("size", justify="right")
    for category in CATEGORIES:
        table.add_row(category, _size(by_category.get(category, 0)))
    table.add_row("CUDA context (an allowance)", _size(CUDA_CONTEXT_GIB * GIB))
    table.add_row("peak", _size(need), style="bold")
    table.add_row(f"headroom on the {gpu.name} ({gpu.gib:.2f} GiB)", f"{gpu.gib - need / GIB:.2f} GiB")
    console = Console()
    console.print(f"one training step on a {gpu.name}, at its peak (during {phase}):", soft_wrap=True)
    console.print(table)
    console.print(f"model.dtype={cfg.model.dtype}, train.mixed_precision={t.mixed_precision}, "
                  f"adapter.r_max={cfg.adapter.r_max}, train.batch_size={t.batch_size}, {length}, "
                  f"train.gradient_checkpointing={str(t.gradient_checkpointing).lower()}", soft_wrap=True)
