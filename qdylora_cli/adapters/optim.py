"""`RankAwareAdamW`: AdamW for dynamic-rank adapters that updates only the rank slices a step trained.

A step at rank b uses `A[:b]` and `B[:, :b]`; plain AdamW would still decay the weights of the
other slices and move them with their old momentum. Before each step the training loop says which
slices it trained (`mark_trained`, from `trained_slices`), and only those rows of A and columns of B
are updated, together with their moments. Each slice counts its own steps, so its bias correction
is the one a LoRA trained only on the steps that used it would have. Every update is a handful of
`torch._foreach_*` calls over views of the trained slices: no Python loop over slices.

Parameters carry a slice dimension: 0 for A (a slice is a row), 1 for B (a column), None for
parameters every step trains (DoRA's magnitude). Under FSDP2 each process holds rows of A and B
(dim 0); the trained rows of A are intersected with the local ones.

`slice_lr` = γ > 0 scales the step of each slice by (n_max / n_i)^γ, n_i its own step count and
n_max the count of the parameter's most-trained slice: a slice trained in a quarter of the steps
moves 4^γ times as far when it does (DoRA's magnitude, trained by every step, is never scaled).
Counts, not the draw probabilities, so it follows any schedule and resumes exactly.

The moments are float32 (`state_bits=32`: `exp_avg`, `exp_avg_sq`, shaped like the parameter) or
8-bit (`state_bits=8`), in the format of bitsandbytes' blockwise 8-bit optimizers: each moment is
uint8 indices into a 256-value map, the signed dynamic map for `exp_avg` and the unsigned one for
`exp_avg_sq`, times one float32 absmax per block of 256 values. Unlike bitsandbytes, blocks are
cut per rank slice: the state is laid out one row per slice (A's rows; B's columns, stored
transposed; DoRA's magnitude as one row), each row in its own blocks (`*_codes` [slices, length],
`*_absmax` [slices, ceil(length / 256)]). A step dequantizes the trained slices' rows to float32,
runs the same AdamW update as the 32-bit state on them, and quantizes them back; no other row is
read or written, so untrained slices keep their state bytes exactly, as with 32-bit state.
Quantizing rounds x / absmax to the nearest map value (a midpoint to the lower one), as
bitsandbytes' CUDA kernels and its portable backend do. Its CPU kernel first rounds x / absmax to
one of 65536 equal cells of [-1, 1] and takes that cell's code: values within a cell (3e-5) of a
midpoint may get the farther code, and every value below 1.5e-5 of its block's absmax gets one and
the same code, where the map itself resolves down to 3e-7. Codes are therefore not bit-identical
with that kernel's (ours are never farther from the value); the format is the same, and
dequantizing is bit-identical with bitsandbytes' (`code[index] * absmax` in float32).

`paged=True` puts the large moment tensors in CUDA unified memory allocated by bitsandbytes (what
its paged optimizers do): the driver may evict them to host RAM when the GPU runs short, and each
step prefetches them back before it reads them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qdylora_cli.choices import STATE_BITS
from qdylora_cli.errors import QdyloraError, first_line
from qdylora_cli.quant import import_bitsandbytes
from qdylora_cli.quant.nf4 import dynamic_map

log = logging.getLogger(__name__)

Slices = Sequence[tuple[int, int]]
BLOCKSIZE = 256  # values per absmax of the 8-bit state, as bitsandbytes' blockwise optimizers
MOMENTS = ("exp_avg", "exp_avg_sq")
# Trained slices are updated in groups of about this many values: the 8-bit state's float32 copies
# of a group are the only full-precision moments alive at once (64 MiB each), not the whole state.
_GROUP_VALUES = 1 << 24
# Like bitsandbytes, smaller moments are not paged: unified memory moves in pages of 64 KiB and more,
# and what a small tensor could free is not worth a page fault.
_MIN_PAGED = 100_000
_UNIFIED = ("cuda",)  # device types whose moments can be paged (tests add "cpu" to run the bookkeeping)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The process-local part of a (possibly FSDP-sharded) tensor; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _first_local_row(p: torch.Tensor) -> int:
    """The global index of the first row this process holds (FSDP2 shards dim 0 like torch.chunk)."""
    if not hasattr(p, "placements") or all(pl.is_replicate() for pl in p.placements):
        return 0
    if len(p.placements) != 1 or not p.placements[0].is_shard(0):
        raise QdyloraError(f"adapter parameters sharded as {p.placements} are not supported; FSDP2 shards dim 0")
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    return min(rank * -(-p.shape[0] // world), p.shape[0])


# --- the 8-bit format ------------------------------------------------------------------------------


def unsigned_dynamic_map() -> torch.Tensor:
    """bitsandbytes' unsigned dynamic 8-bit map (`create_dynamic_map(signed=False)`): 256 sorted float32 values.

    As the signed map (`dynamic_map`) without negative values, so each exponent e = -6..0 gets twice
    the steps: the midpoints of 2^(e+7) equal steps of [0.1, 1], scaled by 10^e; plus 0 and 1.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (i + 1) + 1, dtype=torch.float32)
        parts.append((edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - 6))
    return torch.cat(parts).sort().values


# Plain floats, computed at import: under FakeTensorMode (`qdylora plan`) tensors have no values to
# read, and a cached tensor would stay fake.
_MAP_VALUES = {"exp_avg": tuple(dynamic_map().tolist()), "exp_avg_sq": tuple(unsigned_dynamic_map().tolist())}


def state_map(key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 8-bit map of a moment: signed for `exp_avg`, unsigned for `exp_avg_sq` (which is never negative)."""
    return torch.tensor(_MAP_VALUES[key], dtype=torch.float32, device=device)


def _zero_code(key: str) -> int:
    """The index of 0.0 in `key`'s map: what a fresh state holds (its absmax of 0 makes any index 0 anyway)."""
    return _MAP_VALUES[key].index(0.0)


def quantize_rows(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `x` [rows, length] in its own blocks of BLOCKSIZE values (the last one may be short):
    uint8 indices [rows, length] of the nearest `code` value to x / absmax, and float32 absmax
    [rows, blocks]. An all-zero block has absmax 0 and the index of the code nearest 0."""
    rows, length = x.shape
    blocks = -(-length // BLOCKSIZE)
    # Zero padding changes no block's absmax; the padded indices are dropped below.
    padded = F.pad(x.float(), (0, blocks * BLOCKSIZE - length)).view(rows, blocks, BLOCKSIZE)
    absmax = padded.abs().amax(dim=2)
    inverse = torch.where(absmax > 0, absmax.reciprocal(), 0.0)
    scaled = (padded * inverse[..., None]).clamp_(-1.0, 1.0)
    midpoints = (code[:-1] + code[1:]) * 0.5
    # bucketize on the midpoints: the nearest code, a value on a midpoint taking the lower code
    indices = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    return indices.view(rows, blocks * BLOCKSIZE)[:, :length], absmax


def dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_rows`: float32 [rows, length], `code[index] * absmax` of each value's block."""
    rows, length = codes.shape
    blocks = absmax.shape[1]
    values = F.pad(code[codes.int()], (0, blocks * BLOCKSIZE - length)).view(rows, blocks, BLOCKSIZE)
    return (values * absmax[..., None]).view(rows, blocks * BLOCKSIZE)[:, :length]


def _as_rows(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """`t`, shaped like a parameter with slice dim `dim`, as one row per slice (the 8-bit state's layout)."""
    return t.reshape(1, -1) if dim is None else t if dim == 0 else t.T


# --- paged (CUDA unified) memory --------------------------------------------------------------------


class _UnifiedArray:
    """bitsandbytes' paged buffer as a CUDA array (`__cuda_array_interface__`), so torch makes a CUDA tensor of it.

    bitsandbytes hands its unified memory over as a CPU tensor (its own kernels take raw pointers);
    torch's kernels need a CUDA tensor. A unified pointer is a valid device pointer (CUDA reports it
    as managed memory of the device it was allocated on), so torch wraps it without a copy; the
    wrapper, and with it the handle, lives as long as that tensor.
    """

    def __init__(self, handle: torch.Tensor) -> None:
        self.handle = handle
        self.__cuda_array_interface__ = {
            "shape": tuple(handle.shape), "typestr": {torch.float32: "<f4", torch.uint8: "|u1"}[handle.dtype],
            "data": (handle.data_ptr(), False), "strides": None, "version": 2,
        }


def _bnb_functional() -> Any:
    import_bitsandbytes()  # imported through it (it quiets bitsandbytes' import warning on a CPU)
    import bitsandbytes.functional

    return bitsandbytes.functional


def _paged_full(shape: tuple[int, ...], fill: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A CUDA tensor of `fill` in unified memory, and bitsandbytes' handle of it (which prefetching takes).

    bitsandbytes never frees this memory (nor do its paged optimizers): it lives until the process
    ends, so it is allocated once per moment (`load_state_dict` copies into it).
    """
    if device.index is None:  # bitsandbytes prefetches to the handle's device index
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        handle = _bnb_functional().get_paged(*shape, dtype=dtype, device=device)
    tensor = torch.as_tensor(_UnifiedArray(handle), device=device)
    if tensor.data_ptr() != handle.data_ptr():  # a copy in ordinary GPU memory would page nothing
        raise RuntimeError(f"torch copied the unified buffer to {tensor.device} instead of wrapping it")
    return tensor.fill_(fill), handle


def _paging_unavailable(device: torch.device) -> str | None:
    """Why paged state cannot be allocated on `device` (None: it can)."""
    if device.type != "cuda":
        return f"no CUDA device ({device.type}), nothing to page"
    if import_bitsandbytes() is None:
        return "bitsandbytes, which allocates paged memory, is not installed"
    try:  # a CPU-only bitsandbytes build stands in a library that fails when called, not when imported
        _paged_full((1,), 0, torch.uint8, device)  # a probe through the whole path; its byte is never freed
    except Exception as e:  # whatever the library raises, the answer is the same: no paging here
        return f"bitsandbytes cannot allocate paged memory here ({first_line(e)})"
    return None


def resolve_paged(setting: str, device: torch.device | str, fsdp: bool = False) -> bool:
    """`optimizer.paged` made concrete: `auto` is on with CUDA. Where paging cannot work (a CPU, no
    bitsandbytes, FSDP) it is off, and one log line says so when it was asked for."""
    device = torch.device(device)
    if setting == "false" or (setting == "auto" and device.type != "cuda"):
        return False
    why = ("FSDP shards the optimizer state over the GPUs instead" if fsdp and device.type == "cuda"
           else _paging_unavailable(device))
    if why is not None:
        log.info("optimizer.paged=%s: %s; the optimizer state is ordinary %s memory", setting, why,
                 "GPU" if device.type == "cuda" else device.type.upper())
        return False
    return True


# --- the optimizer ---------------------------------------------------------------------------------


class _Piece(NamedTuple):
    """The trained slices of one parameter held here: its views, and where they are in its state."""

    param: torch.Tensor
    grad: torch.Tensor
    steps: torch.Tensor
    state: dict[str, torch.Tensor]
    dim: int | None
    rows: slice  # the slices, local indices: rows of A (and of every 8-bit state), columns of B
    lr_scale: torch.Tensor | None = None  # slice_lr: the factor of each slice's step, shaped like `steps`


def _take(t: torch.Tensor, dim: int | None, rows: slice) -> torch.Tensor:
    """The slices `rows` of `t` (shaped like a parameter with slice dim `dim`)."""
    return t if dim is None else t[rows] if dim == 0 else t[:, rows]


class RankAwareAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) that steps only the marked rank slices.

    `params` are (parameter, slice dim) pairs. `mark_trained(slices)` before `step()` names the
    slices; an unmarked step trains every slice (plain AdamW). `state_bits`: 32 or 8 (see the module
    docstring); `paged`: moments in CUDA unified memory (on a CPU, ordinary tensors); `slice_lr`: γ of
    the slice-aware step sizes (module docstring; 0: off).
    """

    def __init__(
        self,
        params: Iterable[tuple[nn.Parameter, int | None]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_bits: int = 32,
        paged: bool = False,
        slice_lr: float = 0.0,
    ) -> None:
        if state_bits not in STATE_BITS:
            raise QdyloraError(f"optimizer.state_bits={state_bits!r}: expected 32 or 8")
        if slice_lr < 0:
            raise QdyloraError(f"optimizer.slice_lr={slice_lr!r}: expected a number >= 0")
        pairs = list(params)
        group = {"params": [p for p, _ in pairs], "slice_dims": [d for _, d in pairs]}
        # state_bits is saved with the groups, so that a state is never read in the other format.
        super().__init__([group], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                       state_bits=state_bits))
        self.state_bits, self.paged, self.slice_lr = state_bits, paged, float(slice_lr)
        self.trained: list[tuple[int, int]] | None = None
        self._paged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (moment, bitsandbytes' handle)

    def mark_trained(self, slices: Slices) -> None:
        """The slices ([start, stop) ranges) the coming `step()` updates; none (an empty list): nothing moves."""
        self.trained = list(slices)

    def _ranges(self, p: torch.Tensor, dim: int | None) -> list[tuple[int, int]]:
        """The trained [start, stop) slice ranges of `p` in global indices; for dim None, [(0, 1)] or []."""
        if self.trained is None:
            return [(0, 1 if dim is None else p.shape[dim])]
        if dim is None:  # trained by every step that trained any slice
            return [(0, 1)] if self.trained else []
        return self.trained

    def _count(self, p: torch.Tensor, dim: int | None, steps: torch.Tensor) -> None:
        """One more step for every trained slice, this process's or not: under FSDP2 each process holds
        only some rows of A but the same counts for all of them, so any process's copy (the one a full
        optimizer state dict saves) is right for every row."""
        for start, stop in self._ranges(p, dim):
            if dim is None:
                steps.add_(1.0)
            elif dim == 0:
                steps[start:stop].add_(1.0)
            else:
                steps[:, start:stop].add_(1.0)

    def _pieces(self, p: torch.Tensor, dim: int | None, state: dict[str, torch.Tensor]) -> Iterator[_Piece]:
        """Every trained slice range of `p` held here."""
        param, grad, steps = _local(p), _local(p.grad), state["slice_steps"]
        if dim is None:
            if self._ranges(p, dim):
                yield _Piece(param, grad, steps, state, dim, slice(0, 1))
            return
        offset = _first_local_row(p) if dim == 0 else 0
        held = param.shape[0] if dim == 0 else p.shape[1]
        most = steps.max() if self.slice_lr > 0 else None  # every slice's count is on every process
        for start, stop in self._ranges(p, dim):
            lo, hi = max(start, offset), min(stop, offset + held)
            if lo >= hi:
                continue
            rows = slice(lo - offset, hi - offset)
            counts = steps[lo:hi] if dim == 0 else steps[:, lo:hi]
            scale = None if most is None else (most / counts).pow(self.slice_lr)  # trained: counts >= 1
            yield _Piece(_take(param, dim, rows), _take(grad, dim, rows), counts, state, dim, rows, scale)

    # --- state ---

    def _moment(self, shape: tuple[int, ...], fill: float, dtype: torch.dtype, device: torch.device,
                like: torch.Tensor | None = None) -> torch.Tensor:
        """A moment's storage, paged where that is on and worth it; `like`: a tensor to copy (a loaded state)."""
        if self.paged and device.type in _UNIFIED and math.prod(shape) >= _MIN_PAGED:
            tensor, handle = _paged_full(shape, fill, dtype, device)
            self._paged.append((tensor, handle))
            return tensor if like is None else tensor.copy_(like)
        if like is not None:
            return like
        return torch.full(shape, fill, dtype=dtype, device=device)

    def _init_state(self, p: torch.Tensor, dim: int | None, state: dict[str, torch.Tensor]) -> None:
        device = _local(p).device
        if self.state_bits == 32:
            for key in MOMENTS:
                # zeros_like keeps an FSDP parameter's sharding (a DTensor state, as its state dict expects)
                state[key] = (torch.zeros_like(p, memory_format=torch.preserve_format) if hasattr(p, "placements")
                              else self._moment(tuple(p.shape), 0.0, p.dtype, device))
        else:
            if hasattr(p, "placements"):
                raise QdyloraError("optimizer.state_bits=8 cannot step FSDP-sharded adapters; use optimizer.state_bits=32")
            rows = _as_rows(p, dim).shape
            for key in MOMENTS:
                state[f"{key}_codes"] = self._moment(tuple(rows), _zero_code(key), torch.uint8, device)
                state[f"{key}_absmax"] = torch.zeros(rows[0], -(-rows[1] // BLOCKSIZE), dtype=torch.float32,
                                                     device=device)
        # One count per slice, shaped to broadcast over it: (r, 1) for A, (1, r) for B.
        shape = () if dim is None else (p.shape[0], 1) if dim == 0 else (1, p.shape[1])
        state["slice_steps"] = torch.zeros(shape, dtype=torch.float32, device=device)

    def _load(self, piece: _Piece, key: str, code: torch.Tensor) -> torch.Tensor:
        """The moment `key` of a piece, shaped like its parameter view: a view of the 32-bit state, or
        the 8-bit state's rows dequantized to float32 (written back by `_store`)."""
        if self.state_bits == 32:
            return _take(_local(piece.state[key]), piece.dim, piece.rows)
        rows = dequantize_rows(piece.state[f"{key}_codes"][piece.rows], piece.state[f"{key}_absmax"][piece.rows], code)
        return rows.view(piece.param.shape) if piece.dim is None else rows if piece.dim == 0 else rows.T

    def _store(self, piece: _Piece, key: str, value: torch.Tensor, code: torch.Tensor) -> None:
        codes, absmax = quantize_rows(_as_rows(value, piece.dim), code)
        piece.state[f"{key}_codes"][piece.rows] = codes
        piece.state[f"{key}_absmax"][piece.rows] = absmax

    def _update(self, pieces: list[_Piece], group: dict[str, Any], codes: dict[str, torch.Tensor]) -> None:
        """One AdamW update of `pieces`; the 8-bit state is read before it and written after it."""
        moments = {key: [self._load(piece, key, codes.get(key)) for piece in pieces] for key in MOMENTS}
        scales = None
        if self.slice_lr > 0:
            scales = [x.lr_scale if x.lr_scale is not None else torch.ones_like(x.steps) for x in pieces]
        _adamw([x.param for x in pieces], [x.grad for x in pieces], moments["exp_avg"], moments["exp_avg_sq"],
               [x.steps for x in pieces], group, scales)
        if self.state_bits == 8:
            for key in MOMENTS:
                for piece, value in zip(pieces, moments[key], strict=True):
                    self._store(piece, key, value, codes[key])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        functional = _bnb_functional() if self._paged else None
        # Prefetch every paged moment back to its GPU before the kernels read it (asynchronous, on
        # the stream they run on); the first used last, so that it is the last one evicted again.
        for _, handle in reversed(self._paged):
            functional.prefetch_tensor(handle)
        for group in self.param_groups:
            codes = {} if self.state_bits == 32 else {key: state_map(key, _local(group["params"][0]).device)
                                                      for key in MOMENTS}
            pieces: list[_Piece] = []
            values = 0
            for p, dim in zip(group["params"], group["slice_dims"], strict=True):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, dim, state)
                self._count(p, dim, state["slice_steps"])
                for piece in self._pieces(p, dim, state):
                    pieces.append(piece)
                    values += piece.param.numel()
                    if values >= _GROUP_VALUES:
                        self._update(pieces, group, codes)
                        pieces, values = [], 0
            if pieces:
                self._update(pieces, group, codes)
        self.trained = None
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, for both formats: a state saved with other `state_bits` is refused; paged moments are
        copied into paged memory (into the buffers there are already, which are never freed, where they fit)."""
        saved = state_dict["param_groups"][0].get("state_bits", 32)  # states from before 8-bit were 32-bit
        if saved != self.state_bits:
            raise QdyloraError(f"the checkpoint's optimizer state is {saved}-bit but optimizer.state_bits="
                               f"{self.state_bits}; resume with the run's own optimizer.state_bits")
        params = self.param_groups[0]["params"]
        paged = {id(t): (t, h) for t, h in self._paged}
        reuse = {(i, key): paged[id(t)] for i, p in enumerate(params) for key, t in self.state.get(p, {}).items()
                 if id(t) in paged}
        # torch casts every state tensor to its parameter's dtype: the uint8 codes go around it, which
        # also spares a float32 copy of them (the size of a 32-bit state) while loading.
        codes = {index: {k: v for k, v in entry.items() if k.endswith("_codes")}
                 for index, entry in state_dict["state"].items()}
        rest = {index: {k: v for k, v in entry.items() if not k.endswith("_codes")}
                for index, entry in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": rest})
        self._paged = []  # rebuilt below: the buffers now holding a moment
        for i, (index, p) in enumerate(zip(state_dict["param_groups"][0]["params"], params, strict=True)):
            if codes.get(index):
                self.state[p].update({k: v.to(_local(p).device) for k, v in codes[index].items()})
            state = self.state.get(p, {})
            for key in list(state):
                if (key in MOMENTS or key.endswith("_codes")) and not hasattr(p, "placements"):
                    loaded, (old, handle) = state[key], reuse.get((i, key), (None, None))
                    if old is not None and old.shape == loaded.shape and old.dtype == loaded.dtype:
                        state[key] = old.copy_(loaded)
                        self._paged.append((old, handle))
                    else:
                        state[key] = self._moment(tuple(loaded.shape), 0, loaded.dtype, loaded.device, like=loaded)
        for group in self.param_groups:
            group["state_bits"] = self.state_bits


def _adamw(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list, group: dict,
           lr_scales: list | None = None) -> None:
    """One AdamW update of every view, each with the bias correction of its own slices' step counts
    (already counting this step); `lr_scales`: a factor of each view's step, per slice (weight decay unscaled)."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bias1 = torch._foreach_pow(beta1, steps)  # β1^t -> 1 - β1^t, per slice
    torch._foreach_neg_(bias1)
    torch._foreach_add_(bias1, 1.0)
    bias2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias2)
    torch._foreach_add_(bias2, 1.0)
    torch._foreach_sqrt_(bias2)
    # p -= lr · m / (1 - β1^t) / (√v / √(1 - β2^t) + ε), as torch.optim.AdamW computes it
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2)
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, bias1)
    if lr_scales is not None:
        torch._foreach_div_(denom, lr_scales)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


def adapter_parameters(adapters: Iterable[nn.Module]) -> list[tuple[nn.Parameter, int | None]]:
    """(parameter, slice dim) of every adapter, in the order `RankAwareAdamW` and its checkpoints use."""
    pairs: list[tuple[nn.Parameter, int | None]] = []
    for adapter in adapters:
        pairs += [(adapter.lora_A, 0), (adapter.lora_B, 1)]
        if adapter.variant == "dora":
            pairs.append((adapter.magnitude, None))
    return pairs


def upgrade_per_slice_state(state_dict: dict[str, Any], adapters: Sequence[nn.Module]) -> dict[str, Any]:
    """An optimizer state saved by qdylora 0.1 (one parameter per rank slice), in `RankAwareAdamW`'s layout.

    0.1 registered, per adapter in module order, r_max rows of A, r_max columns of B and DoRA's
    magnitude, stepped by torch's AdamW (or bitsandbytes' 32-bit AdamW on CUDA). Slices no step had
    trained have no state: zero moments and a step count of 0. Already-upgraded states pass through.
    """
    groups = state_dict["param_groups"]
    if "slice_dims" in groups[0]:
        return state_dict
    old = state_dict["state"]
    expected = sum(2 * a.r_max + (a.variant == "dora") for a in adapters)
    if len(groups) != 1 or len(groups[0]["params"]) != expected:
        raise QdyloraError(
            f"the checkpoint's optimizer state holds {sum(len(g['params']) for g in groups)} tensors; "
            f"this model's adapters need {expected}: it belongs to another model or setting"
        )

    def part(index: int, key: str) -> torch.Tensor | None:
        entry = old.get(index)
        if entry is None:
            return None
        if key == "step":
            return torch.as_tensor(entry["step"], dtype=torch.float32)
        legacy = {"exp_avg": "state1", "exp_avg_sq": "state2"}[key]
        value = entry.get(key, entry.get(legacy))
        if value is None or not value.is_floating_point():
            raise QdyloraError("the checkpoint's optimizer state is 8-bit (bitsandbytes), which this version cannot "
                               "resume; start a new run (the finished adapter still evaluates and exports)")
        return value.float()

    new_state: dict[int, dict[str, torch.Tensor]] = {}
    dims: list[int | None] = []
    index = 0
    for adapter in adapters:
        for dim, shape in ((0, (1, adapter.in_features)), (1, (adapter.out_features, 1))):
            slices = range(index, index + adapter.r_max)
            index += adapter.r_max
            zero = torch.zeros(shape)
            new_state[len(dims)] = {
                key: torch.cat([part(i, key) if i in old else zero for i in slices], dim=dim)
                for key in ("exp_avg", "exp_avg_sq")
            }
            counts = torch.stack([part(i, "step") if i in old else torch.zeros(()) for i in slices])
            new_state[len(dims)]["slice_steps"] = counts.view(-1, 1) if dim == 0 else counts.view(1, -1)
            dims.append(dim)
        if adapter.variant == "dora":
            if index in old:
                new_state[len(dims)] = {key: part(index, key) for key in ("exp_avg", "exp_avg_sq")}
                new_state[len(dims)]["slice_steps"] = part(index, "step")
            dims.append(None)
            index += 1
    saved = groups[0]
    group = {k: saved[k] for k in ("lr", "betas", "eps", "weight_decay", "initial_lr") if k in saved}
    group["betas"] = tuple(group["betas"])
    group |= {"params": list(range(len(dims))), "slice_dims": dims}
    return {"state": new_state, "param_groups": [group]}
