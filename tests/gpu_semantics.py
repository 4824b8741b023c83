"""A GPU training step's dtypes on the CPU, for tests: CUDA's autocast policy and fp16 loss scaling.

CPU autocast keeps `layer_norm`, softmax and the other ops of CUDA's float32 list in bf16/fp16, so a
LayerNorm model never feeds float32 into its adapters on a CPU as it does on a GPU
(qdylora_cli/cuda_autocast.py). And accelerate scales fp16 losses only on a GPU. Inside
`gpu_semantics(monkeypatch, precision)` every run a test starts computes as on CUDA: CUDA's
float32 ops under autocast, and for fp16 accelerate's GradScaler path with the
`torch.amp.GradScaler("cpu")` that PyTorch provides.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from qdylora_cli import train
from qdylora_cli.cuda_autocast import CudaAutocastPolicy


def fp16_accelerator(cfg, run_dir) -> Accelerator:
    """What `train._make_accelerator` returns on a GPU for mixed_precision=fp16, on the CPU."""
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="fp16",
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    accelerator.native_amp = True  # autocast to float16, unscale before clipping
    accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


@contextmanager
def gpu_semantics(monkeypatch, precision: str) -> Iterator[None]:
    """Runs started inside compute as a CUDA step with `precision` (bf16 or fp16) would."""
    if precision == "fp16":
        monkeypatch.setattr(train, "_make_accelerator", fp16_accelerator)
    with CudaAutocastPolicy():
        yield
