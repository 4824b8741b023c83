"""`train.compile`: the decoder layers compiled with `torch.compile`, with no graph break and few recompiles.

What compiles is each decoder layer (the class the model names in `_no_split_modules`, as FSDP wraps),
in place (`Module.compile`), so parameter names, checkpoints and gradient checkpointing are those of
an eager run. The layers share one compiled graph; what makes the graph stay valid from step to step:

- the adapters use static shapes (`DynamicRankLoRA.use_static_shapes`): their matmuls are r_max wide
  and the ranks reach them as tensors, so a new rank is new data, not a new graph;
- an NF4 matmul is one opaque operator (`qdylora::nf4_linear`, quant/linear.py), not hundreds of
  traced dequantization ops, and its double-quantization offset is a tensor, not a float per layer.

Graphs that remain: the first layer's input needs no gradient (the embeddings are frozen) where the
others' do; training and evaluation mode; a batch whose length differs from the first (Dynamo then
compiles one graph for any length: `dynamic` lengths); k ranks per step against one rank per pass in
validation. `recompile_limit` is raised to cover them, so a run never falls back to eager silently.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qdylora_cli.adapters import DynamicRankLoRA
from qdylora_cli.errors import QdyloraError

log = logging.getLogger(__name__)

# Graphs per layer code: requires_grad of the input (2) × train/eval (2) × static/dynamic length (2) ×
# k ranks/one rank (2), with room to spare.
RECOMPILE_LIMIT = 32


def resolve_compile(setting: str, device: torch.device, fsdp: bool = False) -> bool:
    """`train.compile` made concrete. `auto` is off: on the CPU, compiling costs a minute or more before
    the first step for a gain measured below that (docs/performance.md); on a GPU it is not measured yet."""
    if setting == "true" and fsdp:
        raise QdyloraError("train.compile=true does not work with FSDP here (untested: each FSDP unit would "
                           "need compiling inside its wrapper); use train.compile=false or DDP")
    return setting == "true"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules of the classes in its `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise QdyloraError(f"train.compile: {type(model).__name__} names no decoder layer class "
                           "(_no_split_modules); set train.compile=false")
    return layers


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every decoder layer of `model` in place (its adapters switched to static shapes); the count.
    `backend`: torch.compile's (tests use "eager" or "aot_eager", which skip code generation)."""
    for module in model.modules():
        if isinstance(module, DynamicRankLoRA):
            module.use_static_shapes()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    log.info("compiled %d decoder layers (%s)", len(layers), type(layers[0]).__name__)
    return len(layers)
