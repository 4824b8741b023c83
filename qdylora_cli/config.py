"""Typed configuration: the schema every composed config is checked against before any model loads.

The values live in `conf/` (YAML, composed by Hydra in cli.py); the dataclasses here give each key
its type and a fallback default, and `validate_*` checks what types cannot: ranges, choices and
paths. Every problem becomes one `QdyloraError` line naming the key and what was expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
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
    COMPILE,
    DATA_FORMATS,
    DTYPES,
    MIXED_PRECISION,
    NESTED_WEIGHTS,
    NF4_BLOCKSIZES,
    OPTIMIZERS,
    PAGED,
    QUANT_TYPES,
    RANK_SCHEDULES,
    RETIRED_OPTIMIZERS,
    SCHEDULERS,
    STATE_BITS,
    TEMPLATES,
    TRACKERS,
)
from qdylora_cli.errors import QdyloraError, first_line

EVAL_TASKS = ("none", "gsm8k", "mcq")
EXPORT_FORMATS = ("peft", "merged", "gguf", "gguf-lora")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what gguf-py writes and llama.cpp loads without a quantize step
DEFAULT_GGUF_TYPE = "f16"
SEARCH_DATA = ("validation", "train")  # qdylora allocate: what the search measures on
BUILTIN_DATA = ("builtin:tiny-instructions",)


# --- schema ----------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # hub id or local directory; null when `config` builds the model
    config: dict[str, Any] | None = None  # a Hugging Face config (with model_type): fresh weights from init_seed
    tokenizer: str | None = None  # path, hub id or `byte`; null: the model's own
    dtype: str = "auto"  # auto: bfloat16 (float16 without bf16) on a GPU, float32 on a CPU
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
    messages_field: str | None = None  # chat: the field with the messages (null: `messages`); hf: set it for chat
    role_field: str = "role"
    content_field: str = "content"
    system_prompt: str | None = None  # chat: first message of records that have no system message
    chat_template: str | None = None  # chat: Jinja text, a file, or `chatml`; null: the tokenizer's own
    max_length: int = 2048  # chat: tokens kept per conversation; packing: tokens per row
    packing: bool = False
    num_proc: int | None = None  # processes that tokenize; null: the cores this process may use
    cache_dir: str | None = None  # the tokenized data's cache; null: $HF_DATASETS_CACHE/qdylora


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
    # The fallbacks below are what runs saved before these keys existed did: no mixture, no sandwich,
    # no distillation.
    nested_ranks: Any = None  # null, powers, or a list of ranks: each chunk trains their mixture (lora.NestedRanks)
    nested_weight: str = "one"  # s_r of the mixture: one, inverse, inverse_sqrt
    sandwich: bool = False  # every step's ranks include min_rank and r_max
    distill: float = 0.0  # weight of the KL to the step's top rank for the lower ranks' rows (0: labels only)


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant"
    warmup_ratio: float = 0.03
    state_bits: int = 32  # 32 or 8: Adam's moments in float32, or 8-bit blockwise (as bitsandbytes' 8-bit optimizers)
    slice_lr: float = 0.0  # γ: a rank slice's step times (the most-trained slice's steps / its own)^γ
    paged: str = "auto"  # auto (on with CUDA), true or false: the moments in CUDA unified memory


@dataclass
class LoopConfig:
    max_steps: int | None = 1875
    num_epochs: int | None = None  # the alternative to max_steps: exactly one of them is set
    batch_size: int = 1
    grad_accum: int = 16
    seed: int = 42
    save_every: int = 250
    keep_last: int = 3
    eval_every: int = 200
    eval_ranks: Any = None  # a rank spec as for `eval rank=` (1..8, [1,2,4], all); null: [1, r_max/4, r_max]
    eval_batches: int = 20
    log_every: int = 10
    gradient_checkpointing: bool | None = None  # null: on with a GPU, off on a CPU
    compile: str = "auto"  # auto, true or false: torch.compile the decoder layers (compile.py)
    max_grad_norm: float = 0.3
    max_bad_steps: int = 10
    mixed_precision: str = "auto"  # auto: from model.dtype
    resume: bool = False
    cpu_threads: str = "auto"  # without a GPU: auto (by model size) or a count
    report_to: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb, mlflow


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
    out_dir: str | None = None  # null: RUN_DIR/eval/<task>-<data name>
    overwrite: bool = False


@dataclass
class ExportConfig:
    name: str = "default"
    run_dir: str = "runs/${name}"
    rank: int | None = MISSING  # null only with `allocation`
    format: str = "peft"
    dtype: str | None = None  # null: the run's model.dtype
    out_dir: str | None = None  # null: export_dir (rank-B-FORMAT[-TYPE][-padded] under RUN_DIR/export)
    overwrite: bool = False
    allocation: str | None = None  # an allocation.json (a rank per module) instead of `rank`
    pad: bool = False  # an allocation at one rank (its largest, zero-padded) for runtimes that need one (vLLM)
    gguf_type: str | None = None  # gguf, gguf-lora: f32, f16, bf16, q8_0; null: f16
    base_gguf: str | None = None  # gguf-lora: the base GGUF; null: RUN_DIR/export/rank-0-gguf-TYPE/model.gguf


@dataclass
class GenerateConfig:
    name: str = "default"
    run_dir: str = "runs/${name}"
    rank: Any = None  # a rank spec (8, [1,4,8], 1..8); null: r_max, or a merged export's rank
    prompt: str | None = None  # literal text (cli.py keeps Hydra from parsing it)
    input: str | None = None  # the template's optional input, with `prompt`
    prompts: str | None = None  # a file: one prompt per line, or JSONL records
    raw: bool = False  # true: the prompt text as is, without the run's template
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    ranks_per_pass: int = 8
    out_file: str | None = None  # JSONL of every answer; null: print only
    overwrite: bool = False


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


@dataclass
class PlanConfig:
    """`qdylora plan`: the config `qdylora train` takes, and the GPU (a name or a size in GiB) it should fit."""

    train: TrainConfig
    gpu: str


SCHEMAS: dict[str, type] = {
    "train": TrainConfig, "eval": EvalConfig, "export": ExportConfig, "generate": GenerateConfig,
    "allocate": AllocateConfig,
}


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
        raise QdyloraError(f"{e.full_key}: {first_line(e)}") from None
    except (ValidationError, ConfigTypeError) as e:
        key = e.full_key or _locate(schema, OmegaConf.create(node))
        raise QdyloraError(f"{key}: {_type_problem(first_line(e))}") from None


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


def parse_nested_ranks(spec: Any, r_max: int, min_rank: int = 1) -> list[int] | None:
    """`rank_schedule.nested_ranks` as a sorted list: null (none), `powers` (min_rank, the powers of two
    between it and r_max, and r_max: 1, 2, 4, 8, 16 for r_max 16) or a list of ranks in 1..r_max."""
    key = "rank_schedule.nested_ranks"
    if spec is None:
        return None
    if spec == "powers":
        return sorted({min_rank, r_max, *(1 << i for i in range(r_max.bit_length()) if min_rank < 1 << i < r_max)})
    # A string other than powers is a mistake: Hydra hands a list typed on the command line over as a list.
    ranks = [] if isinstance(spec, str) else list(spec) if hasattr(spec, "__iter__") else [spec]
    if not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= r_max for r in ranks):
        _fail(key, spec, f"null, powers, or a list of ranks in 1..adapter.r_max ({r_max}), e.g. [1, 2, 4, 8, {r_max}]")
    return sorted(set(ranks))


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
    _choice("model.dtype", m.dtype, ("auto", *DTYPES))
    if check_paths:
        _existing("model.name_or_path", m.name_or_path, local_only=False)
        if m.tokenizer != "byte":
            _existing("model.tokenizer", m.tokenizer, local_only=False)


def is_chat(d: DataConfig) -> bool:
    """Conversations (lists of messages): `format=chat`, or an `hf` dataset with a messages column."""
    return d.format == "chat" or (d.format == "hf" and d.messages_field is not None)


def is_inline_template(text: str) -> bool:
    """A `data.chat_template` value that is Jinja text itself rather than a file name."""
    return "{{" in text or "{%" in text


def validate_data(d: DataConfig, check_paths: bool, key: str = "data") -> None:
    _choice(f"{key}.format", d.format, DATA_FORMATS)
    _choice(f"{key}.template", d.template, TEMPLATES)
    _fraction(f"{key}.val_fraction", d.val_fraction)
    for name in ("source_max_len", "target_max_len", "block_size"):
        _at_least(f"{key}.{name}", getattr(d, name), 1)
    _at_least(f"{key}.max_length", d.max_length, 2)
    if d.max_samples is not None:
        _at_least(f"{key}.max_samples", d.max_samples, 1)
    if d.num_proc is not None:
        _at_least(f"{key}.num_proc", d.num_proc, 1)
    if d.cache_dir is not None and Path(d.cache_dir).expanduser().exists() and not Path(d.cache_dir).expanduser().is_dir():
        _fail(f"{key}.cache_dir", d.cache_dir, "a directory (it is a file)")
    _validate_chat_keys(d, check_paths, key)
    if d.packing and (d.format == "text" or (d.format == "hf" and d.text_field is not None)):
        _fail(f"{key}.packing", d.packing, f"false for a text corpus (its blocks of {key}.block_size are already full)")
    if d.packing and not is_chat(d) and d.max_length < d.source_max_len + d.target_max_len:
        _fail(f"{key}.max_length", d.max_length,
              f">= {key}.source_max_len + {key}.target_max_len ({d.source_max_len + d.target_max_len}) "
              "with packing, so that every example fits in a row")
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


def _validate_chat_keys(d: DataConfig, check_paths: bool, key: str) -> None:
    if d.messages_field == "":
        _fail(f"{key}.messages_field", d.messages_field,
              "the record field holding the list of messages (messages; conversations for ShareGPT)")
    if d.format in ("alpaca", "text") and d.messages_field is not None:
        _fail(f"{key}.messages_field", d.messages_field, "null unless data.format is chat or hf")
    if d.format == "hf" and d.messages_field is not None and d.text_field is not None:
        _fail(f"{key}.text_field", d.text_field, f"null when {key}.messages_field is set (one kind of data at a time)")
    if not is_chat(d):
        for name in ("system_prompt", "chat_template"):
            if getattr(d, name) is not None:
                _fail(f"{key}.{name}", getattr(d, name), "null unless the data is chat (data=chat)")
        return
    for name in ("role_field", "content_field"):
        if not getattr(d, name):
            _fail(f"{key}.{name}", getattr(d, name), "a field name, e.g. role/content (from/value for ShareGPT)")
    template = d.chat_template
    if template is not None and template != "chatml" and not is_inline_template(template):
        if check_paths and not Path(template).expanduser().is_file():
            _fail(f"{key}.chat_template", template, "Jinja text (with {{ or {%), chatml, or an existing file")


def validate_train(cfg: TrainConfig, check_paths: bool = True) -> TrainConfig:
    """Ranges, choices and paths of a train config; returns it with train.eval_ranks as a list of ints."""
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
    rs.nested_ranks = parse_nested_ranks(rs.nested_ranks, a.r_max, rs.min_rank)
    _choice("rank_schedule.nested_weight", rs.nested_weight, NESTED_WEIGHTS)
    if rs.nested_ranks is not None and a.mode != "full":
        _fail("adapter.mode", a.mode, "full with rank_schedule.nested_ranks (a mixture trains every slice of its ranks)")
    if rs.kind == "matryoshka" and rs.nested_ranks is None:
        _fail("rank_schedule.nested_ranks", None, "powers or a list of ranks with rank_schedule.kind=matryoshka "
              "(without them it is a plain QLoRA run at r_max: use kind=fixed)")
    if rs.sandwich and (rs.kind in ("fixed", "matryoshka") or rs.ranks_per_step < 2):
        _fail("rank_schedule.sandwich", True, "false with kind=fixed or matryoshka (no ranks are drawn) or "
              "ranks_per_step < 2 (the sandwich is min_rank and r_max among each step's ranks)")
    if not 0 <= rs.distill <= 1:
        _fail("rank_schedule.distill", rs.distill, "a number in [0, 1] (the share of the lower ranks' loss that is "
              "the KL to the top rank)")

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
    _at_least("optimizer.slice_lr", o.slice_lr, 0)
    if o.state_bits not in STATE_BITS:
        _fail("optimizer.state_bits", o.state_bits, "32 or 8 (bits per Adam moment value)")
    # YAML reads true/false as booleans, which the str field holds as "True"/"False"
    o.paged = str(o.paged).lower()
    _choice("optimizer.paged", o.paged, PAGED)

    if (t.max_steps is None) == (t.num_epochs is None):
        hint = "set train.max_steps=null to train by epochs" if t.num_epochs is not None else "set one of them"
        _fail("train.num_epochs", t.num_epochs, f"exactly one of train.max_steps and train.num_epochs ({hint})")
    for name in ("max_steps", "num_epochs", "batch_size", "grad_accum", "keep_last", "eval_batches", "log_every",
                 "max_bad_steps"):
        if getattr(t, name) is not None:
            _at_least(f"train.{name}", getattr(t, name), 1)
    for name in ("seed", "save_every", "eval_every", "max_grad_norm"):
        _at_least(f"train.{name}", getattr(t, name), 0)
    if t.eval_ranks is not None:  # the same syntax as `eval rank=`; the training loop gets the list
        t.eval_ranks = parse_rank_spec(t.eval_ranks, a.r_max, key="train.eval_ranks")
    _choice("train.mixed_precision", t.mixed_precision, ("auto", *MIXED_PRECISION))
    t.compile = str(t.compile).lower()
    _choice("train.compile", t.compile, COMPILE)
    for tracker in t.report_to:
        _choice("train.report_to", tracker, TRACKERS)
    parse_threads("train.cpu_threads", t.cpu_threads)
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
        if cfg.data.packing:
            _fail("data.packing", True, "false for eval (losses are measured example by example)")
    _at_least("batch_size", cfg.batch_size, 1)
    _at_least("ranks_per_pass", cfg.ranks_per_pass, 1)
    for name in ("max_batches", "max_samples"):
        if getattr(cfg, name) is not None:
            _at_least(name, getattr(cfg, name), 1)
    _choice("task", cfg.task, EVAL_TASKS)
    _at_least("max_new_tokens", cfg.max_new_tokens, 1)
    _at_least("tolerance", cfg.tolerance, 0)
    return cfg


def validate_generate(cfg: GenerateConfig, r_max: int, merged_rank: int | None = None) -> GenerateConfig:
    """`merged_rank`: the run_dir is a merged export, which holds that one rank and nothing else."""
    if merged_rank is not None:
        if cfg.rank not in (None, merged_rank, str(merged_rank)):
            _fail("rank", cfg.rank, f"{merged_rank} or null: {cfg.run_dir} is a merged export of rank {merged_rank}")
    elif cfg.rank is not None:
        parse_rank_spec(cfg.rank, r_max)
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise QdyloraError('give one of prompt="TEXT" or prompts=FILE (one prompt per line, or JSONL)')
    if cfg.input is not None and cfg.prompt is None:
        _fail("input", cfg.input, "null with prompts=FILE (each record there has its own input field)")
    if cfg.prompts is not None and not Path(cfg.prompts).expanduser().is_file():
        _fail("prompts", cfg.prompts, "an existing file")
    for name in ("max_new_tokens", "batch_size", "ranks_per_pass"):
        _at_least(name, getattr(cfg, name), 1)
    _at_least("seed", cfg.seed, 0)
    _at_least("temperature", cfg.temperature, 0)
    if not 0 < cfg.top_p <= 1:
        _fail("top_p", cfg.top_p, "a number in (0, 1]")
    if cfg.temperature == 0 and cfg.top_p != 1:
        _fail("top_p", cfg.top_p, "1.0 with temperature=0 (greedy decoding); set temperature > 0 to sample")
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
    low = 0 if cfg.format in ("merged", "gguf") else 1  # a merged rank 0 is the dequantized base alone
    if cfg.rank is not None and not low <= cfg.rank <= r_max:
        _fail("rank", cfg.rank, f"a rank in {low}..{r_max} (the run's adapter.r_max)")
    gguf = cfg.format in ("gguf", "gguf-lora")
    if cfg.dtype is not None:
        if gguf:
            _fail("dtype", cfg.dtype, f"null with format={cfg.format}: gguf_type sets the GGUF's precision")
        _choice("dtype", cfg.dtype, DTYPES)
    if cfg.gguf_type is not None:
        if not gguf:
            _fail("gguf_type", cfg.gguf_type, "null unless format=gguf or format=gguf-lora")
        _choice("gguf_type", cfg.gguf_type, GGUF_TYPES)
    if cfg.base_gguf is not None and cfg.format != "gguf-lora":
        _fail("base_gguf", cfg.base_gguf, "null unless format=gguf-lora (the base GGUF a LoRA adapter applies to)")
    if cfg.pad:
        if cfg.allocation is None:
            _fail("pad", cfg.pad, "false with rank=B: every module has that one rank already (pad is for allocation=PATH)")
        if cfg.format not in ("peft", "gguf-lora"):
            _fail("pad", cfg.pad, f"false with format={cfg.format}: a merged model has no adapter ranks to pad")
    return cfg


def parse_threads(key: str, value: str | int) -> int | None:
    """A CPU thread setting: `auto` -> None, a positive count -> itself; else a one-line error naming `key`."""
    text = str(value).strip()
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        _fail(key, value, "auto or a number of threads >= 1")
    return int(text)


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


def _rank_item(x: Any, spec: Any, usage: str, key: str) -> int:
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, str) and x.isdigit():
        return int(x)
    _fail(key, spec, usage)


# --- run directories ---------------------------------------------------------------------------------


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its local paths made absolute, so a run's config.yaml works from any directory."""

    def fixed(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path and looks_local(path) else path

    m, d = cfg.model, cfg.data
    return replace(cfg, run_dir=str(Path(cfg.run_dir).expanduser().resolve()),
                   model=replace(m, name_or_path=fixed(m.name_or_path),
                                 tokenizer=m.tokenizer if m.tokenizer == "byte" else fixed(m.tokenizer)),
                   data=replace(d, path=d.path if d.path.startswith("builtin:") else fixed(d.path),
                                val_path=fixed(d.val_path),
                                cache_dir=str(Path(d.cache_dir).expanduser().resolve()) if d.cache_dir else None))


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """{"adapter.r_max": 64, ...}: every key of a config as a dotted name (model.config stays one value)."""

    def walk(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict) and key != "config":
                out |= walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    return walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")


def unflatten(flat: dict[str, Any]) -> DictConfig:
    """The inverse of `flat_config`, as a DictConfig for `to_typed`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return OmegaConf.create(tree)
