"""`qdylora train +recipe=NAME`, then `qdylora eval` / `export` with no recipe: the reading commands open
the run trained last (runs/last_run.json, else the newest config.yaml), and say which on stderr."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from runners import qdylora

from qdylora_cli.cli import compose_config
from qdylora_cli.errors import QdyloraError
from qdylora_cli.logs import setup_logging
from qdylora_cli.rundir import record_last_run, save_config

FAST = ["train.max_steps=2", "train.eval_every=0", "train.save_every=0", "train.batch_size=8", "train.eval_batches=1"]
HOW = "+recipe=NAME or run_dir=PATH"


@pytest.fixture
def cwd(tmp_path, monkeypatch, capsys) -> Path:
    monkeypatch.chdir(tmp_path)
    setup_logging()  # log to this test's captured stderr, also for compose_config called directly
    return tmp_path


def train(capsys, *args: str) -> None:
    assert qdylora("train", "+recipe=tiny", *FAST, *args) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()


def opened(capsys, *args: str) -> tuple[str, str]:
    """stdout and the `opening ...` line on stderr of a command that must succeed."""
    capsys.readouterr()  # not what came before
    code = qdylora(*args)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    lines = [line for line in err.splitlines() if ": opening " in line]
    assert len(lines) <= 1, lines
    return out, lines[0] if lines else ""


def fake_run(folder: Path, name: str) -> None:
    """A run directory as far as the reading commands' config needs: its config.yaml."""
    (folder / name).mkdir(parents=True)
    save_config(compose_config("train", ["+recipe=tiny", f"name={name}"]), folder / name / "config.yaml")


def test_eval_and_export_after_train_open_that_run_without_its_recipe(cwd, capsys):
    train(capsys)
    assert json.loads((cwd / "runs" / "last_run.json").read_text())["run"] == "tiny"
    out, line = opened(capsys, "eval", "rank=1..8")
    assert line.startswith("eval: opening runs/tiny (the run trained last") and HOW in line
    assert "opening" not in out and "runs/tiny/eval/loss-val" in out  # stdout carries the results only
    assert (cwd / "runs" / "tiny" / "eval" / "loss-val" / "summary.json").is_file()
    _, line = opened(capsys, "export", "rank=8")
    assert line.startswith("export: opening runs/tiny") and HOW in line
    assert (cwd / "runs" / "tiny" / "export" / "rank-8-peft" / "adapter_config.json").is_file()


def test_the_run_trained_last_wins_and_a_named_run_wins_over_it(cwd, capsys):
    train(capsys)
    train(capsys, "name=other")
    assert compose_config("eval", []).run_dir == "runs/other"
    _, line = opened(capsys, "eval", "rank=8", "--cfg")
    assert line.startswith("eval: opening runs/other (the run trained last")
    for named in (["run_dir=runs/tiny"], ["name=tiny"], ["+recipe=tiny"]):
        assert compose_config("eval", named).run_dir == "runs/tiny"
        assert opened(capsys, "export", "rank=8", *named, "--cfg")[1] == ""  # nothing chosen, nothing said
    train(capsys, "train.resume=true", "train.max_steps=3")  # a resumed run is the one trained last too
    assert compose_config("export", ["rank=8"]).run_dir == "runs/tiny"
    assert qdylora("eval", "name=tyni") == 2
    assert capsys.readouterr().err.strip().endswith("runs/ holds other, tiny")  # a mistyped name lists the runs


def test_without_any_run_the_error_is_one_line_naming_both_ways(cwd, capsys):
    for args in (["eval", "rank=1..8"], ["export", "rank=8"], ["generate", "prompt=hi"], ["allocate", "budget=0.5"]):
        assert qdylora(*args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: no run to open: runs/ holds no run") and HOW in err, err
        assert len(err.strip().splitlines()) == 1
    (cwd / "runs" / "gone").mkdir(parents=True)  # trained once, then config.yaml (the run) removed
    record_last_run(cwd / "runs" / "gone")
    with pytest.raises(QdyloraError, match=r"runs/last_run.json names runs/gone, which is gone, and runs/ holds no "
                                           r"run .*\+recipe=NAME or run_dir=PATH"):
        compose_config("eval", [])


def test_runs_without_a_record_fall_back_to_the_newest_config(cwd, capsys):
    runs = cwd / "runs"
    fake_run(runs, "b")
    fake_run(runs, "a")
    os.utime(runs / "b" / "config.yaml", (1e9, 1e9))  # b is older than a
    assert compose_config("eval", []).run_dir == "runs/a"
    _, line = opened(capsys, "eval", "--cfg")
    assert line.startswith("eval: opening runs/a (the run whose config.yaml is newest; no runs/last_run.json)")
    os.utime(runs / "a" / "config.yaml", (1e8, 1e8))
    assert compose_config("export", ["rank=2"]).run_dir == "runs/b"


@pytest.mark.parametrize("record", [{"run": "half"}, {"run": "../elsewhere"}, {"run": "."}, {"run": 3}, "not json"])
def test_a_record_never_opens_a_folder_that_is_not_a_run(cwd, record):
    runs = cwd / "runs"
    fake_run(runs, "good")
    fake_run(cwd, "elsewhere")  # a run, but outside the folder: a record names a run in its own folder only
    (runs / "half").mkdir()  # a training that stopped before writing its config.yaml
    (runs / "last_run.json").write_text(record if isinstance(record, str) else json.dumps(record))
    assert compose_config("allocate", ["budget=0.5"]).run_dir == "runs/good"
