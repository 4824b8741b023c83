"""NF4Linear: a frozen linear layer whose weight is kept in NF4, never as floats.

forward(x) = x · dequant(W)ᵀ + b, in `compute_dtype`. The weight is dequantized for the matmul
and dropped; backward dequantizes it again for the input gradient (the weight gets none), so a
float copy of W never lives from forward to backward. On CPU, W is not even whole at any time:
the matmuls run over slabs of ~1M values, dequantized one after the other. A slab stays in cache
and reuses freed memory, where a whole W would cost a page fault per 4 KiB (more time than the
dequantization) and |W| of extra peak memory.

The state dict has bitsandbytes' `Linear4bit` layout (prefix P):
    P.weight                                uint8 [numel // 2, 1], packed 4-bit codes
    P.bias                                  if the layer has one
    P.weight.absmax                         float32 [blocks], or uint8 [blocks] with double quantization
    P.weight.quant_map                      float32 [16], the NF4 code book
    P.weight.nested_absmax                  float32 [ceil(blocks / 256)]   (double quantization only)
    P.weight.nested_quant_map               float32 [256], the dynamic map (double quantization only)
    P.weight.quant_state.bitsandbytes__nf4  uint8 bytes of a JSON object with the rest
so bitsandbytes-quantized checkpoints load here, and ours load into bitsandbytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdylora_cli.errors import QdyloraError
from qdylora_cli.quant.nf4 import (
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4State,
    check_quantizable,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_map,
    on_gpu_path,
    quantize_nf4,
)

_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_SLAB = 1 << 20  # values of W dequantized at a time on CPU


def _slabs(state: NF4State, by_columns: bool) -> Iterator[tuple[slice, NF4State]]:
    """W (out × in) as slabs of rows or of columns, each its own NF4State; the whole W off the CPU.

    A slab of rows is a contiguous range of the flat layout as long as it holds whole blocks. A
    slab of columns needs rows made of whole blocks (in_features a multiple of the blocksize).
    """
    out_features, in_features = state.shape
    blocksize = state.blocksize
    if on_gpu_path(state.packed) or (by_columns and in_features % blocksize):
        yield slice(None), state
        return
    absmax = dequantize_absmax(state)
    if by_columns:
        step = max(blocksize, _SLAB // out_features // blocksize * blocksize)
        packed = state.packed.view(out_features, in_features // 2)
        absmax = absmax.view(out_features, in_features // blocksize)
        for start in range(0, in_features, step):
            stop = min(start + step, in_features)
            yield (
                slice(start, stop),
                NF4State(
                    packed[:, start // 2 : stop // 2].contiguous(),
                    absmax[:, start // blocksize : stop // blocksize].contiguous().view(-1),
                    torch.Size((out_features, stop - start)),
                    state.dtype,
                    blocksize,
                ),
            )
    else:
        whole_blocks = blocksize // math.gcd(in_features, blocksize)  # rows
        step = max(whole_blocks, _SLAB // in_features // whole_blocks * whole_blocks)
        for start in range(0, out_features, step):
            stop = min(start + step, out_features)
            first, last = start * in_features, stop * in_features
            yield (
                slice(start, stop),
                NF4State(
                    state.packed[first // 2 : last // 2],
                    absmax[first // blocksize : last // blocksize],
                    torch.Size((stop - start, in_features)),
                    state.dtype,
                    blocksize,
                ),
            )


def _linear(x: Tensor, state: NF4State, bias: Tensor | None) -> Tensor:
    """x · Wᵀ + b, one slab of W's rows (output features) at a time."""
    x2 = x.reshape(-1, x.shape[-1])
    out = x2.new_empty(x2.shape[0], state.shape[0])
    for rows, slab in _slabs(state, by_columns=False):
        w = dequantize_nf4(slab, x.dtype)
        if bias is None:
            torch.mm(x2, w.t(), out=out[:, rows])
        else:
            torch.addmm(bias[rows], x2, w.t(), out=out[:, rows])
    return out.view(*x.shape[:-1], -1)


def _grad_input(grad_out: Tensor, state: NF4State) -> Tensor:
    """grad_out · W, one slab of W's columns (input features) at a time."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    out = g2.new_empty(g2.shape[0], state.shape[1])
    for cols, slab in _slabs(state, by_columns=True):
        torch.mm(g2, dequantize_nf4(slab, g2.dtype), out=out[:, cols])
    return out.view(*grad_out.shape[:-1], -1)


class _NF4Matmul(torch.autograd.Function):
    """x · Wᵀ + b with W dequantized from NF4; backward dequantizes again instead of keeping W."""

    @staticmethod
    def forward(ctx, x, bias, weight, state):
        # Only the packed tensors are saved (with version checks); the rest is plain metadata.
        ctx.save_for_backward(state.packed, state.absmax, state.nested_absmax)
        ctx.layout = dict(
            shape=state.shape, dtype=state.dtype, blocksize=state.blocksize, nested_offset=state.nested_offset
        )
        ctx.has_bias = bias is not None
        return _forward(x, bias, weight, state)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            packed, absmax, nested_absmax = ctx.saved_tensors
            state = NF4State(packed, absmax, nested_absmax=nested_absmax, **ctx.layout)
            grad_x = _grad_input(grad_out, state)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


def _forward(x: Tensor, bias: Tensor | None, weight: Tensor | None, state: NF4State) -> Tensor:
    return _linear(x, state, bias) if weight is None else F.linear(x, weight.to(x.dtype), bias)


# The same matmul as one opaque operator, for torch.compile: traced, the dequantization would be a few
# hundred unrolled ops per layer for Inductor to compile (minutes on CPU), to run no faster than these
# loops. Eager training and `qdylora plan` keep `_NF4Matmul`, whose dequantized weight plan's fake
# tensors count (an opaque operator shows its output only). The offset of double quantization is a
# tensor here: a float read from the layer would be a guard, and every layer has its own.
def _op_state(packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_offset: Tensor | None,
              out_features: int, in_features: int, weight_dtype: torch.dtype, blocksize: int) -> NF4State:
    """The NF4State of an operator's arguments (`NF4Linear._op_args`)."""
    return NF4State(packed, absmax, torch.Size((out_features, in_features)), weight_dtype, blocksize, nested_absmax,
                    nested_offset)


@torch.library.custom_op("qdylora::nf4_linear", mutates_args=())
def _nf4_linear(x: Tensor, bias: Tensor | None, weight: Tensor | None, packed: Tensor, absmax: Tensor,
                nested_absmax: Tensor | None, nested_offset: Tensor | None, out_features: int, in_features: int,
                weight_dtype: torch.dtype, blocksize: int) -> Tensor:
    return _forward(x, bias, weight, _op_state(packed, absmax, nested_absmax, nested_offset, out_features,
                                               in_features, weight_dtype, blocksize))


@_nf4_linear.register_fake
def _(x, bias, weight, packed, absmax, nested_absmax, nested_offset, out_features, in_features, weight_dtype,
      blocksize):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("qdylora::nf4_grad_input", mutates_args=())
def _nf4_grad_input(grad_out: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None,
                    nested_offset: Tensor | None, out_features: int, in_features: int, weight_dtype: torch.dtype,
                    blocksize: int) -> Tensor:
    return _grad_input(grad_out, _op_state(packed, absmax, nested_absmax, nested_offset, out_features, in_features,
                                           weight_dtype, blocksize))


@_nf4_grad_input.register_fake
def _(grad_out, packed, absmax, nested_absmax, nested_offset, out_features, in_features, weight_dtype, blocksize):
    return grad_out.new_empty(*grad_out.shape[:-1], in_features)


@torch.library.custom_op("qdylora::nf4_dequantize", mutates_args=())
def _nf4_dequantize(packed: Tensor, absmax: Tensor, nested_absmax: Tensor | None, nested_offset: Tensor | None,
                    out_features: int, in_features: int, weight_dtype: torch.dtype, blocksize: int,
                    dtype: torch.dtype) -> Tensor:
    return dequantize_nf4(_op_state(packed, absmax, nested_absmax, nested_offset, out_features, in_features,
                                    weight_dtype, blocksize), dtype)


@_nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_offset, out_features, in_features, weight_dtype, blocksize, dtype):
    return packed.new_empty(out_features, in_features, dtype=dtype)


def _setup_nf4_linear(ctx, inputs, output):
    x, bias, _, packed, absmax, nested_absmax, nested_offset, *layout = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_offset)
    ctx.layout, ctx.has_bias = layout, bias is not None


def _backward_nf4_linear(ctx, grad_out):
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _nf4_grad_input(grad_out, *ctx.saved_tensors, *ctx.layout)
    if ctx.has_bias and ctx.needs_input_grad[1]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, grad_bias, *[None] * 9


_nf4_linear.register_autograd(_backward_nf4_linear, setup_context=_setup_nf4_linear)


class NF4Linear(nn.Module):
    """Frozen linear layer with an NF4 weight (buffers: packed codes and block statistics) and an optional frozen bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        """An empty layer (all codes zero), to be filled by `load_state_dict`; see `from_linear`."""
        super().__init__()
        check_quantizable((out_features, in_features), blocksize)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.blocksize = blocksize
        self.weight_dtype = compute_dtype  # dtype the weight had when quantized (kept in the state dict)
        # Non-persistent: the state dict is written and read by the two methods at the bottom.
        blocks = in_features * out_features // blocksize
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        groups = math.ceil(blocks / NESTED_BLOCKSIZE)
        nested = torch.zeros(groups, dtype=torch.float32, device=device) if double_quant else None
        self.register_buffer(
            "weight", torch.zeros(blocks * blocksize // 2, 1, dtype=torch.uint8, device=device), False
        )
        self.register_buffer("absmax", torch.zeros(blocks, dtype=absmax_dtype, device=device), False)
        self.register_buffer("nested_absmax", nested, False)
        self.nested_offset = 0.0 if double_quant else None
        # float32 like bitsandbytes' bias, so a loaded bias keeps every bit.
        zeros = torch.zeros(out_features, dtype=torch.float32, device=device)
        frozen_bias = nn.Parameter(zeros, requires_grad=False) if bias else None
        self.register_parameter("bias", frozen_bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
    ) -> NF4Linear:
        """Quantize an nn.Linear on its device; compute_dtype defaults to its weight dtype."""
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            compute_dtype=compute_dtype or weight.dtype,
            blocksize=blocksize,
            double_quant=double_quant,
            device="meta",  # every tensor is replaced below; meta allocates nothing
        )
        layer._set_state(quantize_nf4(weight, blocksize, double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def state(self) -> NF4State:
        return NF4State(
            self.weight,
            self.absmax,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.blocksize,
            self.nested_absmax,
            self.nested_offset,
        )

    def dequantize(self) -> Tensor:
        """The weight, out_features × in_features, in compute_dtype."""
        if torch.compiler.is_compiling():
            return _nf4_dequantize(*self._op_args(), self.compute_dtype)
        return dequantize_nf4(self.state, self.compute_dtype)

    def _op_args(self) -> tuple:
        """The layer as the custom operators take it (see `_nf4_linear`)."""
        return (self.weight, self.absmax, self.nested_absmax, self._offset, self.out_features, self.in_features,
                self.weight_dtype, self.blocksize)

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """x · Wᵀ + b computed in compute_dtype, returned in x's dtype.

        weight: this layer's `dequantize()` if the caller already has it (DoRA needs W anyway);
        it is used as is and not saved for backward, and no gradient flows into it.
        """
        if weight is not None and weight.requires_grad:
            raise ValueError(
                "NF4Linear.forward(weight=...) takes the frozen dequantized weight; it gets no gradient"
            )
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        x_c = x.to(self.compute_dtype)
        if torch.compiler.is_compiling():
            out = _nf4_linear(x_c, bias, weight, *self._op_args())
        else:
            out = _NF4Matmul.apply(x_c, bias, weight, self.state)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        nested = "double_quant" if self.nested_absmax is not None else "single_quant"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}, blocksize={self.blocksize}, {nested}"
        )

    @property
    def nested_offset(self) -> float | None:
        return self._nested_offset

    @nested_offset.setter
    def nested_offset(self, value: float | None) -> None:
        self._nested_offset = value
        # The same value as a tensor for the compiled path (not a buffer: it is not in the state dict).
        self._offset = None if value is None else torch.tensor(value, dtype=torch.float32, device=self.absmax.device)

    def _set_state(self, state: NF4State) -> None:
        self.weight, self.absmax, self.nested_absmax = state.packed, state.absmax, state.nested_absmax
        self.nested_offset, self.blocksize, self.weight_dtype = (
            state.nested_offset,
            state.blocksize,
            state.dtype,
        )

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) and .half() cast every floating buffer, but the float32 block
        # statistics are part of the format: keep the originals and only move them.
        stats = {"absmax": self.absmax, "nested_absmax": self.nested_absmax}
        super()._apply(fn, recurse)
        for name, before in stats.items():
            after = getattr(self, name)
            if after is not None and after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        if self._offset is not None:
            self._offset = self._offset.to(self.absmax.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        def value(t: Tensor) -> Tensor:
            return t if keep_vars else t.detach()

        destination[prefix + "weight"] = value(self.weight)
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        device = self.weight.device
        destination[prefix + "weight.absmax"] = value(self.absmax)
        destination[prefix + "weight.quant_map"] = NF4_CODE.to(device)
        info = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.weight_dtype],
            "shape": [self.out_features, self.in_features],
        }
        if self.nested_absmax is not None:
            destination[prefix + "weight.nested_absmax"] = value(self.nested_absmax)
            destination[prefix + "weight.nested_quant_map"] = dynamic_map().to(device)
            info |= {
                "nested_blocksize": NESTED_BLOCKSIZE,
                "nested_dtype": "float32",
                "nested_offset": self.nested_offset,
            }
        # bitsandbytes keeps this JSON tensor on the CPU whatever the layer's device.
        destination[prefix + _QUANT_STATE_KEY] = torch.tensor(
            list(json.dumps(info).encode()), dtype=torch.uint8
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )  # the bias, and strictness for everything else
        ours = {k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]
        required = [
            prefix + "weight",
            prefix + "weight.absmax",
            prefix + "weight.quant_map",
            prefix + _QUANT_STATE_KEY,
        ]
        missing = [k for k in required if k not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        state = _state_from_bnb({k[len(prefix) :]: state_dict[k] for k in ours}, prefix)
        if state.shape != (self.out_features, self.in_features):
            raise QdyloraError(
                f"{prefix}weight was quantized with shape {tuple(state.shape)}, "
                f"but this layer is {self.out_features}×{self.in_features}"
            )
        device = state.packed.device if self.weight.is_meta else self.weight.device
        self._set_state(state.to(device))


def _state_from_bnb(tensors: dict[str, Tensor], prefix: str) -> NF4State:
    """Read one layer's bitsandbytes quant state (keys without the layer prefix); one-line errors name the key."""
    info = json.loads(bytes(tensors[_QUANT_STATE_KEY].cpu().tolist()).decode())
    where = prefix + _QUANT_STATE_KEY
    if info.get("quant_type") != "nf4":
        raise QdyloraError(f"{where}: quant_type is {info.get('quant_type')!r}, only 'nf4' is supported")
    if not torch.equal(tensors["weight.quant_map"].cpu().float(), NF4_CODE):
        raise QdyloraError(f"{prefix}weight.quant_map is not bitsandbytes' NF4 code book")
    nested = "weight.nested_absmax" in tensors
    if nested and "weight.nested_quant_map" not in tensors:
        raise QdyloraError(f"{prefix}weight.nested_absmax comes without {prefix}weight.nested_quant_map")
    if nested and not torch.equal(tensors["weight.nested_quant_map"].cpu().float(), dynamic_map()):
        raise QdyloraError(f"{prefix}weight.nested_quant_map is not bitsandbytes' dynamic 8-bit map")
    if nested and info.get("nested_blocksize") != NESTED_BLOCKSIZE:
        raise QdyloraError(
            f"{where}: nested_blocksize is {info.get('nested_blocksize')}, expected {NESTED_BLOCKSIZE}"
        )
    dtype = getattr(torch, info["dtype"], None)
    if dtype not in _DTYPE_NAMES:
        raise QdyloraError(f"{where}: dtype {info['dtype']!r} is not float32, float16 or bfloat16")
    shape = torch.Size(info["shape"])
    check_quantizable(shape, info["blocksize"])
    # bitsandbytes may store the packed bytes in another dtype (quant_storage); the bytes are what count.
    packed = tensors["weight"].reshape(-1).view(torch.uint8).reshape(-1, 1)
    if packed.numel() * 2 != shape.numel():
        raise QdyloraError(
            f"{prefix}weight holds {packed.numel()} bytes, expected {shape.numel() // 2} for shape {tuple(shape)}"
        )
    return NF4State(
        packed,
        tensors["weight.absmax"],
        shape,
        dtype,
        info["blocksize"],
        tensors["weight.nested_absmax"] if nested else None,
        float(info["nested_offset"]) if nested else None,
    )
