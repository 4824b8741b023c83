"""An allocation: one rank per adapted module, and what it costs in adapter parameters.

A dynamic-rank run holds every rank of every module, so any mix of ranks can be used without
training again. `qdylora allocate` chooses one (rank_search.py) and writes it as `allocation.json`,
a plain JSON object `{"model.layers.0.self_attn.q_proj": 4, ...}` that names every adapted module
once (rank 0: no adapter on that module). `qdylora export allocation=PATH` turns it into a PEFT
adapter with `rank_pattern`, or into a merged model. Users may write or edit the file by hand: it
is checked against the run before use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from qdylora_cli.errors import QdyloraError, first_line
from qdylora_cli.rundir import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, reading_adapter

Allocation = dict[str, int]


@dataclass(frozen=True)
class ModuleShape:
    """An adapted linear layer: rank b costs b·(in + out) parameters, plus `out` for DoRA's magnitude."""

    name: str
    in_features: int
    out_features: int
    dora: bool = False

    def params(self, rank: int) -> int:
        """Adapter parameters of this module at `rank`; rank 0 is no adapter, so no magnitude either."""
        if rank == 0:
            return 0
        return rank * (self.in_features + self.out_features) + (self.out_features if self.dora else 0)


def run_module_shapes(run_dir: str | Path) -> tuple[list[ModuleShape], dict[str, Any]]:
    """The adapted modules of a run in module order, and its adapter metadata; read from the adapter
    file's header and adapter_config.json, no weights loaded."""
    adapter = Path(run_dir) / ADAPTER
    weights, config = adapter / ADAPTER_WEIGHTS, adapter / ADAPTER_CONFIG
    if not weights.is_file() or not config.is_file():
        raise QdyloraError(f"{run_dir} has no finished adapter ({adapter} lacks {ADAPTER_WEIGHTS} or {ADAPTER_CONFIG})")
    with reading_adapter(adapter):
        meta = json.loads(config.read_text())
        dora = meta["variant"] == "dora"
        with safe_open(str(weights), framework="pt") as f:
            shapes = [ModuleShape(name, f.get_slice(f"{name}.lora_A").get_shape()[1],
                                  f.get_slice(f"{name}.lora_B").get_shape()[0], dora)
                      for name in meta["target_modules"]]
    return shapes, meta


def allocation_params(shapes: list[ModuleShape], allocation: Mapping[str, int]) -> int:
    """Adapter parameters of `allocation`: the sum over modules of their cost at their rank."""
    return sum(s.params(allocation[s.name]) for s in shapes)


def uniform(shapes: list[ModuleShape], rank: int) -> Allocation:
    """Every module at `rank`: what `qdylora eval rank=B` measures."""
    return {s.name: rank for s in shapes}


def read_allocation(path: str | Path, shapes: list[ModuleShape], r_max: int, key: str = "allocation") -> Allocation:
    """The allocation in `path`, checked against the run's modules and r_max; one-line errors name `key`."""
    where = f"{key}={str(path)!r}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QdyloraError(f"{where}: no such file (qdylora allocate writes RUN_DIR/allocate/allocation.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QdyloraError(f"{where}: not a readable JSON file ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise QdyloraError(f"{where}: expected a JSON object of module name -> rank")
    names = [s.name for s in shapes]
    missing, unknown = [n for n in names if n not in data], [n for n in data if n not in names]
    if missing or unknown:
        problems = ([f"{len(missing)} adapted module(s) missing, e.g. {missing[0]}"] if missing else []) + (
            [f"{len(unknown)} name(s) the run does not adapt, e.g. {unknown[0]}"] if unknown else [])
        raise QdyloraError(f"{where}: {'; '.join(problems)} (is it from another run?)")
    for name in names:
        rank = data[name]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= r_max:
            raise QdyloraError(f"{where}: {name}: rank {rank!r} is not an integer in 0..{r_max} (the run's r_max)")
    if not any(data.values()):
        raise QdyloraError(f"{where}: every rank is 0, which is the base model without adapters")
    return {name: data[name] for name in names}
