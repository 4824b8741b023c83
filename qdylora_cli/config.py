"""Typed configuration: the schema every composed config is checked against before any model loads.

The values live in `conf/` (YAML, composed by Hydra in cli.py); the dataclasses here give each key
its type and a fallback default, and `validate_*` checks what types cannot: ranges, choices and
paths. Every problem becomes one `QdyloraError` line naming the key and what was expected.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, NoReturn, get_args, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    ConfigTypeError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    ValidationError,
)

from qdylora_cli.choices import (
    ADAPTER_MODES,
    ADAPTER_SCALES,
    ADAPTER_VARIANTS,
    DTYPES,
    MIXED_PRECISION,
    NF4_BLOCKSIZES,
    OPTIMIZERS,
    QUANT_TYPES,
    RANK_SCHEDULES,
    RETIRED_OPTIMIZERS,
    SCHEDULERS,
)
from qdylora_cli.errors import QdyloraError

DATA_FORMATS = ("alpaca", "text", "hf")
TEMPLATES = ("alpaca", "plain")
EVAL_TASKS = ("none", "gsm8k", "mcq")
EXPORT_FORMATS = ("peft", "merged")
SEARCH_DATA = ("validation", "train")  # qdylora allocate: what the search measures on
EXPORT_INFO = "qdylora_export.json"  # in a merged export: its rank and the run it came from
BUILTIN_DATA = ("builtin:tiny-instructions",)


# --- schema ----------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # hub id or local directory; null when `config` builds the model
    config: dict[str, Any] | None = None  # a Hugging Face config (with model_type): fresh weights from init_seed
    tokenizer: str | None = None  # path, hub id or `byte`; null: the model's own
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    init_seed: int = 0


@dataclass
class DataConfig:
    path: str = MISSING  # file, directory, hub dataset id or builtin:NAME
    format: str = "alpaca"
    template: str = "alpaca"
    hf_split: str = "train"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    text_field: str | None = None  # hf only: train on this text column as a corpus
    val_path: str | None = None
    val_fraction: float = 0.02
    source_max_len: int = 384
    target_max_len: int = 128
    train_on_source: bool = False
    group_by_length: bool = True
    block_size: int = 512
    max_samples: int | None = None


@dataclass
class QuantConfig:
    type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64


@dataclass
class AdapterConfig:
    r_max: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    mode: str = "full"
    variant: str = "lora"
    scale: str = "rank_stabilized"
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class RankScheduleConfig:
    kind: str = "octave"
    min_rank: int = 1
    rank: int | None = None  # kind=fixed; null: r_max
    ranks_per_step: int = 4


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant"
    warmup_ratio: float = 0.03


@dataclass
class LoopConfig:
    max_steps: int = 1875
    batch_size: int = 1
    grad_accum: int = 16
    seed: int = 42
    save_every: int = 250
    keep_last: int = 3
    eval_every: int = 200
    eval_ranks: list[int] | None = None  # null: [1, r_max/4, r_max]
    eval_batches: int = 20
    log_every: int = 10
    gradient_checkpointing: bool = True
    max_grad_norm: float = 0.3
    max_bad_steps: int = 10
    mixed_precision: str = "bf16"
    resume: bool = False


@dataclass
class LauncherConfig:
    num_processes: int = 1


@dataclass
class TrainConfig:
    name: str = "default"
    run_dir: str = "runs/${name}"
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    rank_schedule: RankScheduleConfig = field(default_factory=RankScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


@dataclass
class EvalConfig:
    name: str = "default"
    run_dir: str = "runs/${name}"
    rank: Any = "all"  # a spec for parse_rank_spec: 8, 1..64, 1..64:4, [1,2,4,8], all
    data: DataConfig | None = None  # null: the run's own validation data
    batch_size: int = 8
    max_batches: int | None = None
    ranks_per_pass: int = 8
    task: str = "none"
    choices_field: str = "choices"
    max_new_tokens: int = 256
    max_samples: int | None = None
    tolerance: float = 0.01
    out_dir: str | None = None  # null: RUN_DIR/eval
    overwrite: bool = False


@dataclass
class ExportConfig:
    name: str = "default"
    run_dir: str = "runs/${name}"
    rank: int | None = MISSING  # null only with `allocation`
    format: str = "peft"
    dtype: str | None = None  # null: the run's model.dtype
    out_dir: str | None = None  # null: RUN_DIR/export/rank-B-FORMAT
    overwrite: bool = False
    allocation: str | None = None  # an allocation.json (a rank per module) instead of `rank`


@dataclass
class AllocateConfig:
    name: str = "default"
    run_dir: str = "runs/${name}"
    budget: float | None = None  # share of the r_max adapter's parameters, in (0, 1]
    budget_params: int | None = None  # or: at most this many adapter parameters
    tolerance: float | None = None  # or: the fewest parameters within this relative margin of the best uniform rank
    ranks: Any = "pow2"  # the ranks a module may take: pow2, or a rank spec (0 = no adapter on the module)
    search_data: str = "validation"
    search_examples: int = 64
    rounds: int = 6
    batch_size: int = 8
    configs_per_pass: int = 8
    out_dir: str | None = None  # null: RUN_DIR/allocate
    overwrite: bool = False


SCHEMAS: dict[str, type] = {"train": TrainConfig, "eval": EvalConfig, "export": ExportConfig,
                            "allocate": AllocateConfig}


# --- composed YAML -> typed object ------------------------------------------------------------------


def _section(schema: type, name: str) -> type | None:
    """The dataclass type of field `name` (also through `X | None`), else None."""
    hint = get_type_hints(schema).get(name)
    return next((t for t in (hint, *get_args(hint)) if is_dataclass(t)), None)


def unknown_key_message(schema: type, full_key: str) -> str:
    """`unknown config key adapter.rmax; adapter has: r_max, alpha, ...`"""
    *parents, _ = full_key.split(".")
    holder: type | None = schema
    for part in parents:
        holder = _section(holder, part) if holder is not None else None
    if holder is None:
        return f"unknown config key {full_key}"
    where = ".".join(parents) or "the top level"
    return f"unknown config key {full_key}; {where} has: {', '.join(f.name for f in fields(holder))}"


def to_typed(command: str, node: DictConfig | dict) -> Any:
    """Merge composed YAML into the command's schema: unknown keys and wrong types stop here."""
    schema = SCHEMAS[command]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise QdyloraError(f"{e.full_key} is required: set it with {e.full_key}=VALUE") from None
    except ConfigKeyError as e:
        raise QdyloraError(unknown_key_message(schema, e.full_key)) from None
    except InterpolationResolutionError as e:
        raise QdyloraError(f"{e.full_key}: {str(e).splitlines()[0]}") from None
    except (ValidationError, ConfigTypeError) as e:
        key = e.full_key or _locate(schema, OmegaConf.create(node))
        raise QdyloraError(f"{key}: {_type_problem(str(e).splitlines()[0])}") from None


def _locate(schema: type, node: DictConfig) -> str:
    """The dotted key whose value does not fit `schema` (OmegaConf leaves it out for some errors)."""
    for key, value in node.items_ex(resolve=False):
        try:
            OmegaConf.merge(OmegaConf.structured(schema), {key: value})
        except Exception:  # this key is the culprit; look inside it if it is a section
            sub = _section(schema, str(key))
            inner = _locate(sub, value) if sub is not None and OmegaConf.is_dict(value) else ""
            return f"{key}.{inner}" if inner else str(key)
    return "config"


_ARTICLE = {"Integer": "an integer", "Float": "a number", "String": "a string"}
_TYPE_PROBLEMS = [
    (r"Value '(.*)' of type '.*' could not be converted to (\w+)", lambda m: f"expected {_ARTICLE.get(m[2], m[2])}, got {m[1]!r}"),
    (r"Value '(.*)' is not a valid bool", lambda m: f"expected true or false, got {m[1]!r}"),
    (r"is not a ListConfig, list or tuple", lambda m: "expected a list, e.g. [a, b]"),
    (r"is not a subclass of|Cannot merge DictConfig with|to Dict\[", lambda m: "expected a mapping of keys to values"),
    (r"Cannot convert 'DictConfig' to string|Cannot convert 'ListConfig'", lambda m: "expected a single value"),
]


def _type_problem(msg: str) -> str:
    for pattern, explain in _TYPE_PROBLEMS:
        if m := re.search(pattern, msg):
            return explain(m)
    return msg


# --- checks types cannot express ---------------------------------------------------------------------


def _fail(key: str, value: Any, expected: str) -> NoReturn:
    raise QdyloraError(f"{key}={value!r}: expected {expected}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = ' (quote "no" in YAML, where a bare no means false)' if value in ("False", False) else ""
        _fail(key, value, "one of " + ", ".join(choices) + hint)


def _at_least(key: str, value: int | float, low: int | float) -> None:
    if value < low:
        _fail(key, value, f"a number >= {low}")


def _fraction(key: str, value: float) -> None:
    if not 0 <= value < 1:
        _fail(key, value, "a number in [0, 1)")


def looks_local(path: str) -> bool:
    """Paths (not hub ids): start with /, . or ~, or exist. `tiiuae/falcon-40b` is a hub id."""
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def _existing(key: str, path: str | None, *, local_only: bool) -> None:
    if path is None:
        return
    if (local_only or looks_local(path)) and not Path(path).expanduser().exists():
        _fail(key, path, "an existing path" if local_only else "an existing local path or a hub id like org/name")


def validate_model(m: ModelConfig, check_paths: bool) -> None:
    if m.config is None and not m.name_or_path:
        raise QdyloraError("model.name_or_path is required: a hub id or local directory (or model.config to build one)")
    if m.config is not None:
        if m.name_or_path:
            _fail("model.name_or_path", m.name_or_path,
                  "null when model.config builds the model (use model=hf to load a pretrained one)")
        if "model_type" not in m.config:
            _fail("model.config", "{...}", "a Hugging Face config with a model_type key (e.g. llama)")
    _choice("model.dtype", m.dtype, DTYPES)
    if check_paths:
        _existing("model.name_or_path", m.name_or_path, local_only=False)
        if m.tokenizer != "byte":
            _existing("model.tokenizer", m.tokenizer, local_only=False)


def validate_data(d: DataConfig, check_paths: bool, key: str = "data") -> None:
    _choice(f"{key}.format", d.format, DATA_FORMATS)
    _choice(f"{key}.template", d.template, TEMPLATES)
    _fraction(f"{key}.val_fraction", d.val_fraction)
    for name in ("source_max_len", "target_max_len", "block_size"):
        _at_least(f"{key}.{name}", getattr(d, name), 1)
    if d.max_samples is not None:
        _at_least(f"{key}.max_samples", d.max_samples, 1)
    if d.path.startswith("builtin:"):
        if d.path not in BUILTIN_DATA:
            _fail(f"{key}.path", d.path, "one of " + ", ".join(BUILTIN_DATA))
        if d.format != "alpaca":
            _fail(f"{key}.format", d.format, f"alpaca for {d.path}")
    elif check_paths:
        # JSON and text files are always local; `hf` may also name a hub dataset.
        _existing(f"{key}.path", d.path, local_only=d.format != "hf")
    if check_paths:
        _existing(f"{key}.val_path", d.val_path, local_only=d.format != "hf")


def validate_train(cfg: TrainConfig, check_paths: bool = True) -> TrainConfig:
    """Ranges, choices and paths of a train config; returns it unchanged."""
    validate_model(cfg.model, check_paths)
    validate_data(cfg.data, check_paths)
    q, a, rs, o, t = cfg.quant, cfg.adapter, cfg.rank_schedule, cfg.optimizer, cfg.train
    _choice("quant.type", q.type, QUANT_TYPES)
    if q.blocksize not in NF4_BLOCKSIZES:
        _fail("quant.blocksize", q.blocksize, f"one of {', '.join(map(str, NF4_BLOCKSIZES))} (64 in QLoRA)")

    _at_least("adapter.r_max", a.r_max, 1)
    if a.alpha <= 0:
        _fail("adapter.alpha", a.alpha, "a number > 0")
    _fraction("adapter.dropout", a.dropout)
    _choice("adapter.mode", a.mode, ADAPTER_MODES)
    _choice("adapter.variant", a.variant, ADAPTER_VARIANTS)
    _choice("adapter.scale", a.scale, ADAPTER_SCALES)
    if not a.target_modules:
        _fail("adapter.target_modules", a.target_modules, "a non-empty list, e.g. [all-linear] or [q_proj, v_proj]")

    _choice("rank_schedule.kind", rs.kind, RANK_SCHEDULES)
    if not 1 <= rs.min_rank <= a.r_max:
        _fail("rank_schedule.min_rank", rs.min_rank, f"1..adapter.r_max ({a.r_max})")
    if rs.kind == "fixed" and rs.rank is not None and not 1 <= rs.rank <= a.r_max:
        _fail("rank_schedule.rank", rs.rank, f"1..adapter.r_max ({a.r_max}) or null for r_max")
    if rs.kind == "fixed" and a.mode == "frozen":
        # Frozen mode trains only slice b at each step; a fixed-rank (plain QLoRA) run must train all of 1..b.
        _fail("adapter.mode", a.mode, "full when rank_schedule.kind=fixed (a plain QLoRA baseline)")
    _at_least("rank_schedule.ranks_per_step", rs.ranks_per_step, 1)

    if o.name in RETIRED_OPTIMIZERS:
        _fail("optimizer.name", o.name, "adamw: the bitsandbytes optimizers are gone (they move rank slices a "
              "step did not train); qdylora's rank-aware AdamW replaces them")
    _choice("optimizer.name", o.name, OPTIMIZERS)
    _choice("optimizer.scheduler", o.scheduler, SCHEDULERS)
    if o.lr <= 0:
        _fail("optimizer.lr", o.lr, "a number > 0")
    _at_least("optimizer.weight_decay", o.weight_decay, 0)
    if o.eps <= 0:
        _fail("optimizer.eps", o.eps, "a number > 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        _fail("optimizer.betas", o.betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    _fraction("optimizer.warmup_ratio", o.warmup_ratio)

    for name in ("max_steps", "batch_size", "grad_accum", "keep_last", "eval_batches", "log_every", "max_bad_steps"):
        _at_least(f"train.{name}", getattr(t, name), 1)
    for name in ("seed", "save_every", "eval_every", "max_grad_norm"):
        _at_least(f"train.{name}", getattr(t, name), 0)
    for r in t.eval_ranks or []:
        if not 0 <= r <= a.r_max:
            _fail("train.eval_ranks", t.eval_ranks, f"ranks in 0..adapter.r_max ({a.r_max}); 0 is the base model")
    _choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    _at_least("launcher.num_processes", cfg.launcher.num_processes, 1)
    if not cfg.run_dir:
        _fail("run_dir", cfg.run_dir, "a directory")
    return cfg


def validate_eval(cfg: EvalConfig, r_max: int, merged_rank: int | None = None) -> EvalConfig:
    """`merged_rank`: the run_dir is a merged export, which holds that one rank and nothing else."""
    if merged_rank is not None:
        if cfg.rank not in ("all", merged_rank, str(merged_rank)):
            _fail("rank", cfg.rank, f"{merged_rank} or all: {cfg.run_dir} is a merged export of rank {merged_rank}")
    else:
        parse_rank_spec(cfg.rank, r_max)
    if cfg.data is not None:
        validate_data(cfg.data, check_paths=True)
    _at_least("batch_size", cfg.batch_size, 1)
    _at_least("ranks_per_pass", cfg.ranks_per_pass, 1)
    for name in ("max_batches", "max_samples"):
        if getattr(cfg, name) is not None:
            _at_least(name, getattr(cfg, name), 1)
    _choice("task", cfg.task, EVAL_TASKS)
    _at_least("max_new_tokens", cfg.max_new_tokens, 1)
    _at_least("tolerance", cfg.tolerance, 0)
    return cfg


def allocation_stands_for_rank(node: DictConfig) -> None:
    """Export: `allocation=PATH` gives a rank per module, so the required `rank` may stay unset."""
    if node.get("allocation") is not None and OmegaConf.is_missing(node, "rank"):
        node.rank = None


def validate_export(cfg: ExportConfig, r_max: int) -> ExportConfig:
    _choice("format", cfg.format, EXPORT_FORMATS)
    if cfg.allocation is not None:
        if cfg.rank is not None:
            _fail("rank", cfg.rank, f"no rank with allocation={cfg.allocation!r}: the allocation gives each module its rank")
        if not Path(cfg.allocation).expanduser().is_file():
            _fail("allocation", cfg.allocation, "an allocation.json file (qdylora allocate writes RUN_DIR/allocate/allocation.json)")
    elif cfg.rank is None:
        raise QdyloraError("rank is required: set it with rank=VALUE (or allocation=PATH for a rank per module)")
    low = 0 if cfg.format == "merged" else 1  # a merged rank 0 is the dequantized base alone
    if cfg.rank is not None and not low <= cfg.rank <= r_max:
        _fail("rank", cfg.rank, f"a rank in {low}..{r_max} (the run's adapter.r_max)")
    if cfg.dtype is not None:
        _choice("dtype", cfg.dtype, DTYPES)
    return cfg


def validate_allocate(cfg: AllocateConfig, r_max: int) -> AllocateConfig:
    """Exactly one budget, in range; the candidate ranks; sizes. A budget below the smallest allocation
    needs the run's layer shapes and is checked by `qdylora allocate` before the model loads."""
    given = [k for k in ("budget", "budget_params", "tolerance") if getattr(cfg, k) is not None]
    if not given:
        raise QdyloraError("budget is required: budget=0.25 (share of the r_max adapter's parameters), "
                           "budget_params=N, or tolerance=0.01 (fewest parameters within 1% of the best uniform rank)")
    if len(given) > 1:
        raise QdyloraError(f"{' and '.join(given)}: set only one of budget, budget_params and tolerance")
    if cfg.budget is not None and not 0 < cfg.budget <= 1:
        _fail("budget", cfg.budget, "a share of the r_max adapter's parameters in (0, 1], e.g. 0.25")
    if cfg.budget_params is not None:
        _at_least("budget_params", cfg.budget_params, 1)
    if cfg.tolerance is not None:
        _at_least("tolerance", cfg.tolerance, 0)
    candidate_ranks(cfg.ranks, r_max)
    _choice("search_data", cfg.search_data, SEARCH_DATA)
    for name in ("search_examples", "rounds", "batch_size", "configs_per_pass"):
        _at_least(name, getattr(cfg, name), 1)
    return cfg


def candidate_ranks(spec: Any, r_max: int) -> list[int]:
    """`qdylora allocate ranks=...`: `pow2` (1, 2, 4, ..., r_max) or a rank spec; 0 lets a module go without adapter."""
    if spec == "pow2":
        return sorted({*(1 << i for i in range(r_max.bit_length()) if 1 << i <= r_max), r_max})
    ranks = parse_rank_spec(spec, r_max, key="ranks")
    if not any(ranks):
        _fail("ranks", spec, "at least one rank >= 1 (0 alone is the base model)")
    return ranks


# --- rank specs ----------------------------------------------------------------------------------------


_RANGE = re.compile(r"^(\d+)\s*\.\.\s*(\d+)(?:\s*:\s*(\d+))?$")


def parse_rank_spec(spec: Any, r_max: int, key: str = "rank") -> list[int]:
    """Ranks named by `spec`, sorted and unique: `8`, `1..64`, `1..64:4` (1, 5, ..., 61), `[1,2,4,8]`, `all`.

    0 is the base model without adapters. Hydra hands over ints and lists as such, strings otherwise.
    Errors name `key`.
    """
    usage = "a rank spec like 8, 1..64, 1..64:4, [1,2,4,8] or all"
    if isinstance(spec, bool):
        _fail(key, spec, usage)
    if isinstance(spec, int):
        ranks = [spec]
    elif isinstance(spec, (list, tuple)) or OmegaConf.is_list(spec):
        ranks = [_rank_item(x, spec, usage, key) for x in spec]
    elif isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            ranks = list(range(1, r_max + 1))
        elif m := _RANGE.match(text):
            lo, hi, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
            if lo > hi or step < 1:
                _fail(key, spec, "LOW..HIGH[:STEP] with LOW <= HIGH and STEP >= 1")
            ranks = list(range(lo, hi + 1, step))
        else:
            items = [x.strip() for x in text.strip("[]").split(",")]
            ranks = [_rank_item(x, spec, usage, key) for x in items]
    else:
        _fail(key, spec, usage)
    if not ranks:
        _fail(key, spec, usage)
    if min(ranks) < 0:
        _fail(key, spec, "ranks >= 0 (0 is the base model)")
    if max(ranks) > r_max:
        raise QdyloraError(f"{key}={spec!r}: rank {max(ranks)} is above the run's adapter.r_max ({r_max})")
    return sorted(set(ranks))


def _rank_item(x: Any, spec: Any, usage: str, key: str = "rank") -> int:
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, str) and x.isdigit():
        return int(x)
    _fail(key, spec, usage)


# --- run directories ---------------------------------------------------------------------------------


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a crash never leaves half a file)."""
    path = Path(path)
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The typed train config a run was made with (paths are not re-checked: eval may run elsewhere)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise QdyloraError(f"{run_dir} is not a qdylora run directory (it has no config.yaml)")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # any YAML problem is the file's fault
        raise QdyloraError(f"{path}: not a readable config ({str(e).splitlines()[0]})") from None
    return validate_train(to_typed("train", upgrade_saved_config(node)), check_paths=False)


def upgrade_saved_config(node: DictConfig) -> DictConfig:
    """A run config saved by qdylora 0.1, with the values that reproduce it for keys added since.

    0.1 scaled rank b by α/b and drew one rank per step; its bitsandbytes optimizers became adamw.
    """
    node = OmegaConf.create(OmegaConf.to_container(node))  # a copy, without the struct flag
    if "adapter" in node and "scale" not in node.adapter:
        node.adapter.scale = "alpha_over_rank"
    if "rank_schedule" in node and "ranks_per_step" not in node.rank_schedule:
        node.rank_schedule.ranks_per_step = 1
    if "optimizer" in node and node.optimizer.get("name") in RETIRED_OPTIMIZERS:
        node.optimizer.name = "adamw"
    return node


def load_export_info(path: str | Path) -> dict[str, Any] | None:
    """What `qdylora export` recorded in a merged model directory (rank, source run, its config); else None."""
    info = Path(path) / EXPORT_INFO
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QdyloraError(f"{info}: not readable JSON ({e})") from None


def load_eval_source(path: str | Path) -> tuple[TrainConfig, int | None]:
    """The train config behind a run dir or a merged export, and the export's rank (None for a run)."""
    info = None if (Path(path) / "config.yaml").is_file() else load_export_info(path)
    if info is None:
        return load_run_config(path), None
    if "run_config" not in info or "rank" not in info:
        raise QdyloraError(f"{Path(path) / EXPORT_INFO}: missing run_config or rank; re-export the model")
    if info["rank"] is None:
        raise QdyloraError(f"{path} is a merged export of an allocation (a rank per layer), not of one rank: its loss "
                           "is in the allocation's summary.json (qdylora allocate)")
    cfg = validate_train(to_typed("train", upgrade_saved_config(OmegaConf.create(info["run_config"]))), check_paths=False)
    return cfg, int(info["rank"])
