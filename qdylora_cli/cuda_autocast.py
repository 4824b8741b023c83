"""CUDA's autocast dtype policy, reproduced on the CPU: the dtypes a GPU step would compute in.

CPU autocast casts the same matmuls as CUDA's to the low dtype, but CUDA also runs a list of ops
in float32 that CPU autocast leaves in bf16/fp16: normalisations, softmax, exp/log/pow, sums. The
difference changes dtypes inside a step: on a GPU a model with `nn.LayerNorm` (Falcon, GPT-NeoX,
Phi) feeds float32 activations to the next linear layer under a bf16/fp16 step, on a CPU it does
not. `CudaAutocastPolicy` adds CUDA's float32 rule for those ops to CPU autocast, so tests (and a
step run on fake CPU tensors to measure a GPU's memory) see the dtypes a GPU would.

The rule is registered with the dispatcher under the AutocastCPU key, exactly where autocast's own
casts live: it applies wherever CPU autocast is on (also when backward recomputes a checkpointed
layer) and nowhere else. The ops are those of PyTorch's "CUDA ops that can autocast to float32"
that CPU autocast does not already run in float32. As on CUDA, a call with an explicit dtype is
left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

FLOAT32_OPS = (
    "layer_norm", "group_norm", "softmax.int", "log_softmax.int", "exp", "expm1", "log", "log1p", "log2", "log10",
    "reciprocal", "rsqrt", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "sum",
    "sum.dim_IntList", "cumsum", "cumprod", "linalg_vector_norm", "norm.Scalar", "norm.ScalarOpt_dim", "acos",
    "asin", "cosh", "sinh", "tan", "erfinv", "cosine_similarity", "dist", "pdist", "renorm", "logsumexp",
    "frobenius_norm.dim", "nuclear_norm",
)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _upcast(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION else value


def _in_float32(op: torch._ops.OpOverload) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", enabled=False):  # below autocast: the op itself, on upcast inputs
            if any(isinstance(v, torch.dtype) for v in tree_flatten((args, kwargs))[0]):
                return op(*args, **kwargs)
            return op(*tree_map(_upcast, args), **tree_map(_upcast, kwargs))

    return kernel


class CudaAutocastPolicy:
    """While open, CPU autocast also runs CUDA's float32-list ops in float32 (their inputs upcast)."""

    def __enter__(self) -> CudaAutocastPolicy:
        self._library = torch.library.Library("aten", "IMPL")
        for name in FLOAT32_OPS:
            base, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.aten, base), overload or "default")
            self._library.impl(name, _in_float32(op), "AutocastCPU")
        return self

    def __exit__(self, *exc: Any) -> None:
        del self._library  # the library's finalizer takes its kernels out of the dispatcher
