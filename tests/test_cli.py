"""The `qdylora` console script: help, one-line errors, --cfg, dispatch and the multi-process launcher."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from runners import qdylora_process as qdylora

from qdylora_cli import cli
from qdylora_cli.config import SCHEMAS, EvalConfig, TrainConfig
from qdylora_cli.rundir import save_config

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_commands_groups_and_recipes():
    out = qdylora("--help")
    assert out.returncode == 0, out.stderr
    for word in ("train", "eval", "export", "generate", "plan", "tiny", "falcon40b_alpaca", "llama2_7b_alpaca",
                 "llama3_8b_alpaca", "model", "tiny*", "rank_schedule", "octave*", "paper", "--config-dir"):
        assert word in out.stdout
    train = qdylora("train", "--help")
    assert train.returncode == 0 and "+recipe=NAME" in train.stdout and "falcon_40b" in train.stdout
    assert "tiny_instructions*" in train.stdout and "--cfg" in train.stdout
    export = qdylora("export", "--help")
    assert re.search(r"^  rank +required +the rank to export", export.stdout, re.M)
    assert re.search(r"^  format +peft +peft: plain LoRA adapter", export.stdout, re.M)
    assert "defaults:" not in export.stdout and "_self_" not in export.stdout  # no raw YAML


def test_bare_qdylora_and_qdylora_help_print_the_help():
    bare, help_, train_help = qdylora(), qdylora("help"), qdylora("help", "train")
    assert bare.returncode == help_.returncode == train_help.returncode == 0, bare.stderr
    assert bare.stdout == help_.stdout == qdylora("--help").stdout and "commands:" in bare.stdout
    assert train_help.stdout == qdylora("train", "--help").stdout


def _leaf_keys(schema: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(schema)
    keys = []
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        section = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
        keys += [prefix + f.name] if section is None else _leaf_keys(section, f"{prefix}{f.name}.")
    return keys


@pytest.mark.parametrize("command", list(SCHEMAS))
def test_help_lists_every_key_with_its_default_and_meaning(command):
    """Generated from the schema and the comments in conf/: a key without a comment fails here."""
    columns = {}
    for line in cli.help_epilog(command).splitlines():
        if line.startswith("  "):
            key, *rest = re.split(r"\s{2,}", line.strip())
            columns[key] = rest
    for key in _leaf_keys(SCHEMAS[command]):
        assert key in columns, f"{key} is missing from `qdylora {command} --help`"
        assert len(columns[key]) == 2, f"{key} needs a default and a meaning (a comment after it in conf/)"
    if command == "train":
        assert columns["train.eval_ranks"][0] == "null" and "1..8" in columns["train.eval_ranks"][1]
        assert columns["adapter.r_max"][0] == "64" and columns["model.tokenizer"][0] == "byte"
    if command == "eval":
        assert columns["data"][0] == "null" and columns["data.path"][0] == "required"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "+recipe=nope"], "error: unknown recipe 'nope' (+recipe=nope); available: falcon40b_alpaca"),
        (["train", "adapter.r_max=0"], "error: adapter.r_max=0: expected a number >= 1"),
        (["train", "x=[1"], "error: malformed override 'x=[1'"),
        (["train", "--bogus"], "error: qdylora train: unrecognized arguments: --bogus"),
        (["fly"], "error: qdylora: unknown command 'fly'"),
        (["eval", "run_dir=nowhere"], "error: nowhere is not a qdylora run directory"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message):
    out = qdylora(*args)
    assert out.returncode == 2
    assert out.stderr.strip() == out.stderr.strip().splitlines()[0]
    assert out.stderr.startswith(message), out.stderr


def test_cfg_prints_the_validated_config(tmp_path):
    out = qdylora("train", "+recipe=tiny", "adapter.r_max=12", "--cfg", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["name"] == "tiny" and cfg["run_dir"] == "runs/tiny" and cfg["adapter"]["r_max"] == 12
    assert not (tmp_path / "runs").exists()  # nothing written, nothing trained


def test_config_is_validated_without_importing_torch():
    code = (
        "import sys; from qdylora_cli.cli import compose_config; "
        "compose_config('train', ['+recipe=falcon40b_alpaca']); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _fake_module(monkeypatch, name: str) -> list:
    calls: list = []
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(run=calls.append))
    return calls


def test_dispatch_passes_the_typed_config(monkeypatch, tmp_path):
    calls = _fake_module(monkeypatch, "qdylora_cli.train")
    assert cli.run(["train", "+recipe=tiny", f"run_dir={tmp_path / 'r'}"]) == 0
    (cfg,) = calls
    assert isinstance(cfg, TrainConfig) and cfg.run_dir == str(tmp_path / "r") and cfg.adapter.r_max == 8

    save_config(cfg, tmp_path / "config.yaml")
    calls = _fake_module(monkeypatch, "qdylora_cli.evaluate")
    assert cli.run(["eval", f"run_dir={tmp_path}", "rank=1..8"]) == 0
    assert isinstance(calls[0], EvalConfig) and calls[0].rank == "1..8"


def test_main_exits_2_on_errors_raised_by_a_command(monkeypatch, capsys):
    from qdylora_cli.errors import QdyloraError

    def fail(cfg):
        raise QdyloraError("runs/x already holds a run;\nsecond line")

    monkeypatch.setitem(sys.modules, "qdylora_cli.train", types.SimpleNamespace(run=fail))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "+recipe=tiny"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: runs/x already holds a run; second line\n"


def test_several_processes_relaunch_under_accelerate(monkeypatch):
    calls = _fake_module(monkeypatch, "qdylora_cli.train")
    launched: list = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["train", "+recipe=tiny", "launcher.num_processes=2"]
    assert cli.run(argv) == 0 and not calls
    (cmd,) = launched
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-5:] == ["-m", "qdylora_cli", *argv]
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a launched process: train
    assert cli.run(argv) == 0 and len(calls) == 1 and len(launched) == 1


def test_interrupt_and_os_errors_outside_training_are_one_line(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    def disk_full(argv):
        raise OSError(28, "No space left on device", "/runs/x/eval")

    for fake, code, line in ((interrupted, 130, "interrupted\n"),
                             (disk_full, 1, "error: No space left on device: /runs/x/eval\n")):
        monkeypatch.setattr(cli, "run", fake)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval"])
        assert exit_info.value.code == code and capsys.readouterr().err == line
