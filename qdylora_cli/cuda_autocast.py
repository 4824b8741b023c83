"""CUDA's autocast dtype policy, reproduced on another device (the CPU): what a GPU step would compute in.

CPU autocast casts the same matmuls as CUDA's to the low dtype, but CUDA also runs a list of ops
in float32 that CPU autocast leaves in bf16/fp16: normalisations, softmax, exp/log/pow, sums. The
difference changes dtypes inside a step: on a GPU a model with `nn.LayerNorm` (Falcon, GPT-NeoX,
Phi) feeds float32 activations to the next linear layer under a bf16/fp16 step, on a CPU it does
not. `CudaAutocastPolicy` applies CUDA's float32 list on top of the device's own autocast, so
tests (and `qdylora plan`, which runs a step on fake CPU tensors) see the dtypes a GPU would.

The list is PyTorch's documented "CUDA ops that can autocast to float32". As on CUDA, an op called
with an explicit `dtype=` is left alone, and in-place and `out=` variants are never cast.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

FLOAT32_OPS = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits",
    "cosh", "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum",
    "dist", "erfinv", "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm",
    "log", "log_softmax", "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss",
    "multilabel_margin_loss", "multi_margin_loss", "nll_loss", "norm", "normalize", "pdist",
    "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh", "smooth_l1_loss", "soft_margin_loss",
    "softmax", "softmin", "softplus", "sum", "renorm", "tan", "triplet_margin_loss",
})
LOW_PRECISION = (torch.float16, torch.bfloat16)


class CudaAutocastPolicy(TorchFunctionMode):
    """While autocast is on for `device_type`, run CUDA's float32-list ops in float32 (inputs upcast)."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (getattr(func, "__name__", None) not in FLOAT32_OPS or kwargs.get("dtype") is not None
                or "out" in kwargs or not torch.is_autocast_enabled(self.device_type)):
            return func(*args, **kwargs)

        def upcast(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
                return value.float()
            return value

        with torch.autocast(self.device_type, enabled=False):
            return func(*tree_map(upcast, args), **tree_map(upcast, kwargs))
