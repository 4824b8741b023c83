"""Every choice and limit of the schema, and random mistakes, through the real `qdylora` command.

Whatever a user types, the command ends with exit 0 or with exactly one `error:` line (the last on
stderr), never a traceback; a refused train writes no run directory, and nothing of an existing
run changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import shutil
import typing
from pathlib import Path

import pytest

from qdylora_cli import choices, cli
from qdylora_cli.cli import compose_config
from qdylora_cli.config import EvalConfig, ExportConfig, TrainConfig
from qdylora_cli.errors import QdyloraError

# A tiny run: one optimizer step, nothing saved along the way, no validation.
QUICK = ["+recipe=tiny", "adapter.r_max=2", "train.batch_size=4", "train.max_steps=1", "train.save_every=0",
         "train.eval_every=0", "train.log_every=1"]


def leaf_fields(schema: type, prefix: str = "") -> dict[str, type]:
    """Dotted key -> type of every leaf of a config schema."""
    out: dict[str, type] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        section = next((t for t in (kind, *typing.get_args(kind)) if dataclasses.is_dataclass(t)), None)
        if section is not None:
            out |= leaf_fields(section, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`qdylora ARGV` in this process: the exit code and stderr. A traceback fails the test."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    if code != 0:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("error: "), f"exit {code} without an error line: {err[-3000:]}"
        assert sum(line.startswith("error: ") for line in lines) == 1, err[-3000:]
    return code, err


def snapshot(root: Path) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    cli.run(["train", *QUICK, f"run_dir={run_dir}"])
    return run_dir



# --- every choice, through the code that uses it -----------------------------------------------------

CHOICES = [
    ("model.dtype", ("auto", *choices.DTYPES)),
    ("quant.type", choices.QUANT_TYPES),
    ("quant.blocksize", choices.NF4_BLOCKSIZES),
    ("adapter.mode", choices.ADAPTER_MODES),
    ("adapter.variant", choices.ADAPTER_VARIANTS),
    ("adapter.scale", choices.ADAPTER_SCALES),
    ("rank_schedule", (*choices.RANK_SCHEDULES, "paper")),
    ("optimizer.name", choices.OPTIMIZERS),
    ("optimizer.scheduler", choices.SCHEDULERS),
    ("optimizer.state_bits", choices.STATE_BITS),
    ("optimizer.paged", choices.PAGED),
    ("rank_schedule.nested_weight", choices.NESTED_WEIGHTS),
    ("train.mixed_precision", ("auto", *choices.MIXED_PRECISION)),
]


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, values in CHOICES for v in values])
def test_every_choice_trains_or_is_refused_before_the_run_dir_exists(key, value, tmp_path, capsys):
    run_dir = tmp_path / "run"
    extra = ["adapter.mode=full"] if value == "fixed" else []  # a fixed rank needs mode full, said in its own line
    if key == "rank_schedule.nested_weight":  # a weighting of nested ranks needs nested ranks to weigh
        extra = ["adapter.mode=full", "rank_schedule.nested_ranks=powers"]
    code, err = run_cli(["train", *QUICK, f"run_dir={run_dir}", f"{key}={value}", *extra], capsys)
    if code == 0:
        assert (run_dir / "adapter" / "adapter.safetensors").is_file()
    else:  # e.g. fp16 needs a GPU; a blocksize that does not divide this model's layers
        assert code == 2 and not run_dir.exists(), err[-2000:]


def test_the_choice_table_covers_every_list_of_choices():
    used_elsewhere = {"DATA_FORMATS", "TEMPLATES", "RETIRED_OPTIMIZERS", "TRACKERS", "GPUS"}  # test_chat, test_data, test_config, test_plan
    for name, values in vars(choices).items():
        if name.isupper() and name not in used_elsewhere:
            assert any(set(values) <= set(listed) for _, listed in CHOICES), name


# --- every numeric limit -------------------------------------------------------------------------------

# key -> (the lowest value accepted, a value just below it that is refused); None: no lower limit
LIMITS = {
    "data.val_fraction": (0.0, -0.01), "data.source_max_len": (1, 0), "data.target_max_len": (1, 0),
    "data.block_size": (1, 0), "data.max_length": (2, 1), "data.max_samples": (1, 0), "quant.blocksize": (32, 16),
    "adapter.r_max": (1, 0), "adapter.alpha": (0.001, 0), "adapter.dropout": (0.0, -0.1),
    "rank_schedule.min_rank": (1, 0), "rank_schedule.rank": (1, 0), "rank_schedule.ranks_per_step": (1, 0),
    "optimizer.lr": (1e-9, 0), "optimizer.weight_decay": (0.0, -0.1), "optimizer.eps": (1e-12, 0),
    "optimizer.warmup_ratio": (0.0, -0.1), "optimizer.state_bits": (8, 7), "train.max_steps": (1, 0), "train.num_epochs": (1, 0),
    "train.batch_size": (1, 0), "train.grad_accum": (1, 0), "train.seed": (0, -1), "train.save_every": (0, -1),
    "train.keep_last": (1, 0), "train.eval_every": (0, -1), "train.eval_batches": (1, 0), "train.log_every": (1, 0),
    "train.max_grad_norm": (0.0, -0.1), "train.max_bad_steps": (1, 0), "launcher.num_processes": (1, 0),
    "data.num_proc": (1, 0), "optimizer.slice_lr": (0.0, -0.1), "rank_schedule.distill": (0.0, -0.1),
    "model.init_seed": None,
}
# Upper limits: key -> (the highest value accepted, a value just above it that is refused)
UPPER = {"data.val_fraction": (0.99, 1.0), "adapter.dropout": (0.99, 1.0), "optimizer.warmup_ratio": (0.99, 1.0),
         "adapter.r_max": (64, None), "rank_schedule.min_rank": (64, 65), "rank_schedule.rank": (64, 65),
         "optimizer.state_bits": (32, 33), "rank_schedule.distill": (1.0, 1.1)}


def test_every_number_of_the_train_schema_has_its_limits_listed():
    numeric = {k for k, t in leaf_fields(TrainConfig).items()
               if {int, float} & {t, *typing.get_args(t)} and k != "optimizer.betas"}
    assert numeric == set(LIMITS), numeric ^ set(LIMITS)


@pytest.mark.parametrize("key", sorted(k for k, v in LIMITS.items() if v is not None))
def test_each_limit_accepts_its_edge_and_refuses_one_step_beyond(key):
    low, below = LIMITS[key]
    base = ["rank_schedule=fixed", "adapter.mode=full"] if key == "rank_schedule.rank" else []
    base += ["train.max_steps=null"] if key == "train.num_epochs" else []
    compose_config("train", [*base, f"{key}={low}"])
    with pytest.raises(QdyloraError, match=key.replace(".", r"\.")):
        compose_config("train", [*base, f"{key}={below}"])
    if key in UPPER:
        high, above = UPPER[key]
        compose_config("train", [*base, f"{key}={high}"])
        if above is not None:
            with pytest.raises(QdyloraError, match=key.replace(".", r"\.")):
                compose_config("train", [*base, f"{key}={above}"])


# --- random mistakes ---------------------------------------------------------------------------------------

# Keys that would start other processes or reach past the test's own directories are left out.
NOT_FUZZED = {"launcher.num_processes", "run_dir", "name", "overwrite", "out_dir", "out_file", "train.report_to"}
VALUES = ["-1", "0", "1", "2", "3", "0.5", "abc", "true", "null", "[1,2]", "[]", "{a: 1}", "''", "1e-3",
          "all", "1..2", "nf4", "full", "frozen", "dora", "octave", "constant", "float16", "no", "auto", "chat"]


def mistakes(schema: type, seed: int, count: int) -> list[list[str]]:
    rng = random.Random(seed)
    keys = sorted(k for k in leaf_fields(schema) if k not in NOT_FUZZED and not k.startswith("hydra"))
    return [[f"{k}={rng.choice(VALUES)}" for k in rng.sample(keys, rng.randint(1, 3))] for _ in range(count)]


@pytest.mark.parametrize("overrides", mistakes(TrainConfig, seed=7, count=30), ids=lambda o: " ".join(o))
def test_random_train_settings_end_in_success_or_one_error_line(overrides, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = run_cli(["train", *QUICK, f"run_dir={run_dir}", *overrides], capsys)
    assert code in (0, 1, 2)
    if code != 0:
        assert not (run_dir / "config.yaml").exists(), f"a refused run left a config: {err[-1000:]}"


@pytest.mark.parametrize(
    ("command", "overrides"),
    [("eval", o) for o in mistakes(EvalConfig, seed=11, count=10)]
    + [("export", o) for o in mistakes(ExportConfig, seed=13, count=8)],
    ids=lambda o: o if isinstance(o, str) else " ".join(o),
)
def test_random_eval_and_export_settings_never_change_the_run(command, overrides, finished, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished, run_dir)
    before = snapshot(run_dir)
    extra = ["rank=1"] if command == "export" and not any(o.startswith("rank=") for o in overrides) else []
    code, _ = run_cli([command, f"run_dir={run_dir}", f"out_dir={tmp_path / 'out'}", *extra, *overrides], capsys)
    assert code in (0, 1, 2)
    assert snapshot(run_dir) == before
