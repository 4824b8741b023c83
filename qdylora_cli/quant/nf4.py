"""NF4 blockwise quantization (QLoRA), bit-exact with bitsandbytes 0.50 on CPU.

A weight is flattened and cut into blocks of `blocksize` values (64 by default). Each block keeps
its absolute maximum (`absmax`) and, per value, the 4-bit index of the nearest NF4 code to
value / absmax. Two indices share a byte, the first one in the high nibble.

Double quantization stores the block absmax values in 8 bits too: their mean (`nested_offset`) is
subtracted, the rest is quantized in blocks of 256 with bitsandbytes' signed dynamic 8-bit map, and
each 256-block keeps one float32 `nested_absmax`. Cost per parameter: 4 + 8/64 + 32/(64*256) =
4.127 bits instead of 4 + 32/64 = 4.5.

Everything here is plain PyTorch and runs on any device. Rounding follows bitsandbytes exactly:
- 4-bit codes: x * (1 / absmax) in float32, then the index of the nearest code, a value on a
  midpoint between two codes taking the lower one (bitsandbytes' `bucketize` on the midpoints).
- 8-bit absmax codes: bitsandbytes' CPU kernel does not search the code book; it rounds
  ((v + 1) / 2) * 65535 + 0.5 down to one of 65536 cells of [-1, 1] and reads the code from a
  cell table. That table is rebuilt here the same way, so the codes match bit for bit.
- Dequantization: code * absmax in float32, then one rounding to the output dtype.
On CPU the work is done in chunks that fit in cache: large temporaries would cost more in page
faults and memory traffic than the arithmetic itself.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from qdylora_cli.choices import NF4_BLOCKSIZES
from qdylora_cli.errors import QdyloraError

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Values per chunk. On CPU a chunk's float32 temporaries (1 MiB each) stay in L2; on GPUs chunks
# only bound the temporary memory, and are large enough that launches cost nothing.
_CPU_CHUNK = 1 << 18
_GPU_CHUNK = 1 << 24
_CELLS = 1024  # cells per unit of [-1, 1] for the NF4 code search; far finer than the code spacing
_CELL_MARGIN = 1e-5  # widens each cell by far more than the float32 error of the cell index
_GPU_CODE_PATH = contextvars.ContextVar("qdylora_gpu_code_path", default=False)


@contextmanager
def gpu_code_path() -> Iterator[None]:
    """Inside, NF4 code takes the path it takes on a CUDA device whatever device its tensors are on
    (whole weights, GPU chunks, bitsandbytes' kernels when installed): a step on fake CPU tensors then
    allocates what the GPU step allocates (`qdylora plan`)."""
    token = _GPU_CODE_PATH.set(True)
    try:
        yield
    finally:
        _GPU_CODE_PATH.reset(token)


def on_gpu_path(t: Tensor) -> bool:
    """Whether NF4 code for `t` takes the GPU path: `t` is on a CUDA device, or inside `gpu_code_path`."""
    return t.is_cuda or _GPU_CODE_PATH.get()


def dynamic_map() -> Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map()`): 256 sorted float32 values.

    For each exponent e = -6..0 the positive and negative midpoints of 2^(e+6) equal steps of
    [0.1, 1], scaled by 10^e; plus 0 and 1. The float32 arithmetic follows bitsandbytes'.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        parts += [means * scale, means * -scale]
    return torch.cat(parts).sort().values


@dataclass
class NF4State:
    """A weight quantized to NF4, in bitsandbytes' layout."""

    packed: Tensor  # uint8 [numel // 2, 1]: two 4-bit code indices per byte, first in the high nibble
    absmax: Tensor  # float32 [numel // blocksize]; uint8 dynamic-map codes when double-quantized
    shape: torch.Size  # shape of the original weight
    dtype: torch.dtype  # dtype of the original weight; what `dequantize_nf4` returns by default
    blocksize: int = 64
    nested_absmax: Tensor | None = None  # float32 [ceil(blocks / 256)]: one scale per 256 absmax codes
    # The mean of the block absmax values, subtracted before the 8-bit pass (a 0-d tensor in compiled code).
    nested_offset: float | Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def to(self, device: torch.device | str) -> NF4State:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return NF4State(
            self.packed.to(device),
            self.absmax.to(device),
            self.shape,
            self.dtype,
            self.blocksize,
            move(self.nested_absmax),
            self.nested_offset,
        )


def check_quantizable(shape: tuple[int, ...] | torch.Size, blocksize: int) -> None:
    """Raise a one-line QdyloraError unless a weight of this shape can be quantized in blocks of `blocksize`."""
    if blocksize not in NF4_BLOCKSIZES:
        raise QdyloraError(f"NF4 blocksize must be one of {', '.join(map(str, NF4_BLOCKSIZES))}, got {blocksize}")
    numel = 1
    for size in shape:
        numel *= size
    if numel == 0 or numel % blocksize:
        raise QdyloraError(
            f"cannot quantize a weight of shape {tuple(shape)} to NF4: its {numel} values "
            f"are not a positive multiple of the blocksize {blocksize}"
        )


@torch.no_grad()
def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """Quantize a float32/float16/bfloat16 tensor whose element count is a multiple of `blocksize`."""
    check_quantizable(weight.shape, blocksize)
    if weight.dtype not in FLOAT_DTYPES:
        raise QdyloraError(
            f"NF4 quantization needs a float32, float16 or bfloat16 weight, got {weight.dtype}"
        )
    flat = weight.detach().contiguous().view(-1)
    n, device = flat.numel(), flat.device
    tables = _tables(device)
    chunk = _chunk_size(n, blocksize, device)

    absmax = torch.empty(n // blocksize, dtype=torch.float32, device=device)
    packed = torch.empty(n // 2, dtype=torch.uint8, device=device)
    magnitude = torch.empty(chunk, dtype=flat.dtype, device=device)
    scaled = torch.empty(chunk, dtype=torch.float32, device=device)
    cell = torch.empty(chunk, dtype=torch.float32, device=device)
    cell_index = torch.empty(chunk, dtype=torch.int64, device=device)
    inner_midpoint = torch.empty(chunk, dtype=torch.float32, device=device)
    above = torch.empty(chunk, dtype=torch.bool, device=device)
    codes = torch.empty(chunk, dtype=torch.uint8, device=device)

    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m, blocks = stop - start, slice(start // blocksize, stop // blocksize)
        values = flat[start:stop].view(-1, blocksize)

        # absmax of the input dtype is exact, and so is its conversion to float32.
        block_max = torch.abs(values, out=magnitude[:m].view(-1, blocksize)).amax(dim=1).float()
        if not torch.isfinite(block_max).all():
            raise QdyloraError(
                f"cannot quantize a weight of shape {tuple(weight.shape)} to NF4: it holds inf or NaN"
            )
        absmax[blocks] = block_max
        # bitsandbytes: scaled = clamp(x * (1 / absmax.clamp(min=1e-38)), -1, 1) in float32.
        inverse = block_max.clamp_(min=1e-38).reciprocal_()
        s = torch.mul(values, inverse[:, None], out=scaled[:m].view(-1, blocksize)).view(-1).clamp_(-1.0, 1.0)

        # Code index = number of midpoints below s: midpoints below s's cell, plus one comparison
        # with the midpoint that may lie inside the cell (see _tables). The lookups are 2-D gathers
        # (a row per block, the table broadcast to every row): those run on all threads.
        torch.add(s, 1.0, out=cell[:m]).mul_(_CELLS)
        index = cell_index[:m].copy_(cell[:m]).view(-1, blocksize)
        rows = (index.shape[0], tables.cell_count.numel())
        q = torch.gather(tables.cell_count.expand(rows), 1, index, out=codes[:m].view(-1, blocksize)).view(-1)
        torch.gather(tables.cell_midpoint.expand(rows), 1, index, out=inner_midpoint[:m].view(-1, blocksize))
        q.add_(torch.gt(s, inner_midpoint[:m], out=above[:m]))
        torch.add(q[1::2], q[0::2], alpha=16, out=packed[start // 2 : stop // 2])

    state = NF4State(packed.view(-1, 1), absmax, weight.shape, weight.dtype, blocksize)
    if double_quant:
        state.absmax, state.nested_absmax, state.nested_offset = _quantize_absmax(absmax)
    return state


@torch.no_grad()
def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None, *, backend: str = "auto") -> Tensor:
    """The weight back from NF4, shaped `state.shape`, in `dtype` (default: the original dtype).

    backend: "torch" (this module, the reference), "bnb" (bitsandbytes' kernels, same layout and
    same result), or "auto" = "bnb" where bitsandbytes is importable and has a kernel (CUDA; the CPU
    below blocksize 2048, where its C++ kernel dequantizes 1.5-2.3x faster than this module's
    PyTorch code: docs/performance.md), else "torch".
    """
    dtype = dtype or state.dtype
    if backend == "auto":
        kernel = on_gpu_path(state.packed) or (state.packed.device.type == "cpu" and state.blocksize < 2048)
        backend = "bnb" if kernel and _bitsandbytes() is not None else "torch"
    if backend == "bnb":
        return _dequantize_bnb(state, dtype)
    if backend != "torch":
        raise ValueError(f"unknown NF4 dequantize backend {backend!r}; expected 'torch', 'bnb' or 'auto'")

    packed, blocksize, device = state.packed.reshape(-1), state.blocksize, state.packed.device
    n = packed.numel() * 2
    absmax = dequantize_absmax(state)
    pair_table = _tables(device).pairs
    chunk = _chunk_size(n, blocksize, device)

    out = torch.empty(n, dtype=dtype, device=device)
    byte_index = torch.empty(chunk // 2, dtype=torch.int64, device=device)
    pairs = torch.empty(chunk // 2, dtype=torch.int64, device=device)

    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m, bytes_ = stop - start, slice(start // 2, stop // 2)
        # One lookup per byte: its two code values, stored as one int64. A 2-D gather (a row per
        # block, the table broadcast to every row) runs on all threads; index_select would not.
        index = byte_index[: m // 2].copy_(packed[bytes_]).view(-1, blocksize // 2)
        table = pair_table.expand(index.shape[0], 256)
        torch.gather(table, 1, index, out=pairs[: m // 2].view(-1, blocksize // 2))
        codes = pairs[: m // 2].view(torch.float32).view(-1, blocksize)
        scale = absmax[start // blocksize : stop // blocksize, None]
        # The product is computed in float32 and rounded once into `dtype`, as bitsandbytes does.
        torch.mul(codes, scale, out=out[start:stop].view(-1, blocksize))
    return out.view(state.shape)


def dequantize_absmax(state: NF4State) -> Tensor:
    """The float32 absmax of every block (undoing double quantization if there is one)."""
    if state.nested_absmax is None:
        return state.absmax
    groups = state.nested_absmax.numel()
    codes = _tables(state.absmax.device).dynamic[state.absmax.long()]
    codes = torch.nn.functional.pad(codes, (0, groups * NESTED_BLOCKSIZE - codes.numel()))
    absmax = (codes.view(groups, NESTED_BLOCKSIZE) * state.nested_absmax[:, None]).view(-1)
    return absmax[: state.absmax.numel()] + state.nested_offset


def _quantize_absmax(absmax: Tensor) -> tuple[Tensor, Tensor, float]:
    """Double quantization: (uint8 codes, float32 nested absmax per 256-block, offset), as bitsandbytes' CPU kernel."""
    offset = absmax.mean()
    centered = absmax - offset
    groups = -(-centered.numel() // NESTED_BLOCKSIZE)
    # Zero padding changes no group's absmax; the padded codes are dropped below.
    padded = torch.nn.functional.pad(centered, (0, groups * NESTED_BLOCKSIZE - centered.numel()))
    padded = padded.view(groups, NESTED_BLOCKSIZE)
    nested_absmax = padded.abs().amax(dim=1)
    inverse = torch.where(nested_absmax > 0, nested_absmax.reciprocal(), 0.0)
    v = (padded * inverse[:, None]).clamp_(-1.0, 1.0)
    cell = v.add_(1.0).mul_(0.5).mul_(65535.0).add_(0.5).int()
    codes = _tables(absmax.device).dynamic_cells[cell]
    codes.masked_fill_((nested_absmax == 0)[:, None], 0)  # the kernel writes code 0 for an all-zero group
    return codes.view(-1)[: centered.numel()], nested_absmax, offset.item()


def _dequantize_bnb(state: NF4State, dtype: torch.dtype) -> Tensor:
    bnb = _bitsandbytes()
    if bnb is None:
        raise QdyloraError("NF4 dequantize backend 'bnb' needs bitsandbytes, which is not installed")
    ops = torch.ops.bitsandbytes
    absmax = state.absmax
    if state.nested_absmax is not None:
        code = _tables(absmax.device).dynamic
        nested = ops.dequantize_blockwise.default(
            absmax, state.nested_absmax, code, NESTED_BLOCKSIZE, torch.float32
        )
        absmax = nested + state.nested_offset
    # Ask for whole blocks as rows: bitsandbytes' CPU kernel indexes absmax per row, which is
    # wrong for widths that are not a multiple of the blocksize (e.g. 96 with blocksize 64).
    blocks = (state.packed.numel() * 2 // state.blocksize, state.blocksize)
    out = ops.dequantize_4bit.default(state.packed, absmax, state.blocksize, "nf4", blocks, dtype)
    return out.view(state.shape)


def _bitsandbytes():
    # Imported here: the package __init__ imports this module.
    from qdylora_cli.quant import import_bitsandbytes

    return import_bitsandbytes()


def _chunk_size(n: int, blocksize: int, device: torch.device) -> int:
    chunk = _GPU_CHUNK if device.type != "cpu" or _GPU_CODE_PATH.get() else _CPU_CHUNK
    return min(n, max(blocksize, chunk // blocksize * blocksize))


def warm_caches(device: torch.device | str) -> None:
    """Make the lookup tables of `device` (and import bitsandbytes, whose module makes its own) now, as
    real tensors: made first under fake tensors (`qdylora plan`) they would be cached fake, and counted
    as the first step's memory."""
    _tables(torch.device(device))
    _bitsandbytes()


@dataclass(frozen=True)
class _Tables:
    pairs: Tensor  # int64 [256]: the two float32 NF4 values of each byte, as one 8-byte word
    cell_count: Tensor  # uint8 [2 * _CELLS + 1]: midpoints below each cell of [-1, 1]
    cell_midpoint: Tensor  # float32 [2 * _CELLS + 1]: the next midpoint (maybe inside the cell), or inf
    dynamic: Tensor  # float32 [256]: the dynamic 8-bit map
    dynamic_cells: Tensor  # uint8 [65536]: bitsandbytes' CPU lookup table from cell to 8-bit code


@functools.cache
def _tables(device: torch.device) -> _Tables:
    code = NF4_CODE
    # Byte b -> (code[b >> 4], code[b & 15]).
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)

    # Cell c of the NF4 search covers s with (s + 1) * _CELLS in [c, c + 1), widened by a margin.
    # The code spacing is ~80x the cell width, so at most one midpoint falls inside a cell; any
    # midpoint below the cell is below s, any above it is above s.
    midpoints = (code[:-1] + code[1:]) / 2
    cell_low = torch.arange(2 * _CELLS + 1, dtype=torch.float64) / _CELLS - 1 - _CELL_MARGIN
    cell_count = torch.searchsorted(midpoints.double(), cell_low)
    cell_midpoint = torch.cat([midpoints, torch.tensor([float("inf")])])[cell_count]

    # bitsandbytes' table: cell i is the value -1 + 2i / 65535, mapped to the first code whose
    # upper midpoint is not below it.
    dynamic = dynamic_map()
    dynamic_midpoints = (dynamic[:-1] + dynamic[1:]) * 0.5
    cell_values = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    dynamic_cells = torch.searchsorted(dynamic_midpoints, cell_values)

    return _Tables(
        pairs=pairs.contiguous().view(torch.int64).view(-1).to(device),
        cell_count=cell_count.to(torch.uint8).to(device),
        cell_midpoint=cell_midpoint.to(device),
        dynamic=dynamic.to(device),
        dynamic_cells=dynamic_cells.to(torch.uint8).to(device),
    )
