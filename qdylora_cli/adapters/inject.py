"""Put dynamic-rank adapters into a Hugging Face causal LM; adapter state dicts; merging at one rank."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from qdylora_cli.adapters.lora import DynamicRankLoRA, check_rank
from qdylora_cli.adapters.rank import ranks_by_module
from qdylora_cli.errors import QdyloraError
from qdylora_cli.quant import NF4Linear

ALL_LINEAR = "all-linear"


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, DynamicRankLoRA]]:
    """(module name, adapter) for every adapter in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, DynamicRankLoRA):
            yield name, module


def _pattern_matches(pattern: str, name: str) -> bool:
    return pattern == name.rsplit(".", 1)[-1] or fnmatchcase(name, pattern)


def find_target_modules(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Names of the linear layers (`nn.Linear`, or `NF4Linear` already) that `target_modules` selects, in order.

    `all-linear` selects every linear layer but the output embeddings (`lm_head`); any other
    pattern matches a layer when it equals the last name component (`q_proj`) or fnmatch-matches
    the full dotted name (`model.layers.*.mlp.*`). A pattern that matches nothing is an error.
    """
    # NF4Linear too: the streaming loader (loading.py) quantizes the targets while it reads them.
    linears = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]
    if ALL_LINEAR in target_modules:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        excluded = {name for name, m in model.named_modules() if m is out} | {"lm_head"}
        selected = [name for name in linears if name not in excluded]
    else:
        for pattern in target_modules:
            if not any(_pattern_matches(pattern, name) for name in linears):
                examples = ", ".join(linears[:6]) + (", ..." if len(linears) > 6 else "")
                raise QdyloraError(
                    f"adapter.target_modules: {pattern!r} matches no linear layer; the model has e.g. {examples} "
                    f"(a pattern matches the last name part or, with wildcards, the full name)"
                )
        selected = [name for name in linears if any(_pattern_matches(p, name) for p in target_modules)]
    if not selected:
        raise QdyloraError(f"adapter.target_modules {list(target_modules)} selects no linear layer in this model")
    return selected


def inject_adapters(
    model: nn.Module,
    *,
    r_max: int,
    alpha: float,
    dropout: float = 0.0,
    mode: str = "full",
    variant: str = "lora",
    scale: str = "alpha_over_rank",
    target_modules: Sequence[str] = (ALL_LINEAR,),
) -> list[str]:
    """Wrap each target linear layer, as it is (`NF4Linear`, or `nn.Linear` with quant.type=none), in
    a `DynamicRankLoRA`; quantizing is the loader's job (loading.py). Everything else in the model is
    frozen. Returns the adapted module names."""
    if any(True for _ in iter_adapters(model)):
        raise QdyloraError("this model already has adapters; inject them once")
    names = find_target_modules(model, target_modules)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = DynamicRankLoRA(getattr(parent, attr), r_max, alpha, dropout=dropout, mode=mode, variant=variant,
                                  scale=scale)
        setattr(parent, attr, adapter)
    return names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; an NF4 weight counts as its out×in logical elements."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        quantized = isinstance(module, NF4Linear)
        if quantized:
            total += module.out_features * module.in_features
        for p in module.parameters(recurse=False):
            # Tied weights are one parameter; an NF4 layer's packed storage was counted logically above.
            if id(p) in seen or (quantized and p is not module.bias):
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<module>.lora_A` (r_max×in), `<module>.lora_B` (out×r_max), `<module>.magnitude` (DoRA): all ranks."""
    return {f"{name}.{key}": t for name, a in iter_adapters(model) for key, t in a.adapter_state().items()}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `adapter_state_dict` output; every key must be present, expected, and of the right shape."""
    adapters = dict(iter_adapters(model))
    expected = {f"{name}.{k}": shape for name, a in adapters.items() for k, shape in a.adapter_shapes().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    wrong = [
        f"{k} is {tuple(state[k].shape)}, the model needs {shape}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape ({'; '.join(wrong[:3])}; a different r_max or model?)")
    if problems:
        raise QdyloraError(f"adapter weights do not fit this model: {'; '.join(problems)}")
    for name, adapter in adapters.items():
        adapter.load_adapter_state({k: state[f"{name}.{k}"] for k in adapter.adapter_shapes()})


def merge_adapters(model: nn.Module, rank: int | Mapping[str, int]) -> None:
    """Replace every adapter by a plain float `nn.Linear` equal to it at `rank` (0 = the base alone).

    `rank` is one rank for every adapter, or a mapping of module name -> rank (an allocation) that
    names every adapter. Everything is checked before the first layer is replaced.
    """
    adapters = list(iter_adapters(model))
    ranks = ranks_by_module([name for name, _ in adapters], rank)
    for name, adapter in adapters:
        if isinstance(check_rank(ranks[name], adapter.r_max), tuple):
            raise QdyloraError(f"merge needs one rank per module, got {ranks[name]} for {name}")
    for name, adapter in adapters:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, adapter.merged_linear(ranks[name]))
