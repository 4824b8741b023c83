"""Using qdylora day to day: what a run shows in a log, trackers, resuming without repeating the command
line, self-contained run directories and the settings chosen for a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from runners import qdylora_process as qdylora

REPO = Path(__file__).resolve().parents[1]
TINY = ["+recipe=tiny", "train.batch_size=8", "train.save_every=0", "train.eval_batches=1"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_log_gets_plain_progress_lines_on_stderr_and_results_on_stdout(tmp_path):
    run_dir = tmp_path / "run"
    done = qdylora("train", *TINY, f"run_dir={run_dir}", "train.max_steps=6", "train.log_every=2", "train.eval_every=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [f"done: 6 steps in {done.stdout.split(' in ')[1].split('s;')[0]}s; adapter for "
                                        f"ranks 1..8 in {run_dir.resolve() / 'adapter'}"]
    err = done.stderr.splitlines()
    progress = [line for line in err if line.startswith("step ") and "/6" in line]
    assert [line.split()[1] for line in progress] == ["2/6", "4/6", "6/6"]  # every train.log_every steps
    assert all("loss " in line and "ranks " in line and " lr " in line and "tok/s" in line and "ETA " in line
               for line in progress)
    validation = [line for line in err if "validation loss" in line]
    assert [line.split(":")[0] for line in validation] == ["step 0", "step 3", "step 6"]
    assert "rank 1: " in validation[1] and "rank 8: " in validation[1]
    assert any(line.startswith("data: ") and "training examples" in line and "steps per epoch" in line for line in err)
    assert any(line.startswith("model: ") and "trainable" in line for line in err)
    assert "━" not in done.stderr and "\r" not in done.stderr, "no progress bar outside a terminal"
    assert max(map(len, err)) > 100, "log lines are not wrapped at 80 columns"


def test_tensorboard_receives_the_metrics_and_the_validation_losses(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir = tmp_path / "run"
    done = qdylora("train", *TINY, f"run_dir={run_dir}", "train.max_steps=4", "train.log_every=1", "train.eval_every=2",
                   "train.report_to=[tensorboard]")
    assert done.returncode == 0, done.stderr[-3000:]
    events = run_dir / "logs" / "qdylora"  # the scalars; the hyperparameters are in a folder below it
    acc = event_accumulator.EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "val_loss/rank_1", "val_loss/rank_8"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    written = {m["step"]: m for m in metrics(run_dir)}
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([written[s]["loss"] for s in (1, 2, 3, 4)])
    assert [e.step for e in acc.Scalars("val_loss/rank_8")] == [0, 2, 4]
    assert acc.Scalars("val_loss/rank_8")[-1].value == pytest.approx(written[4]["val_loss"]["8"], abs=1e-6)


def test_resume_needs_only_the_run_dir_and_says_what_changed(tmp_path):
    run_dir = tmp_path / "run"
    first = qdylora("train", *TINY, f"run_dir={run_dir}", "adapter.r_max=4", "train.max_steps=4", "train.save_every=2",
                    "train.eval_every=0")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir / "adapter").rename(tmp_path / "adapter-4")  # as if stopped after step 4's checkpoint
    again = qdylora("train", f"run_dir={run_dir}", "train.resume=true", "train.max_steps=6")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming with train.max_steps: 4 -> 6" in again.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["adapter"]["r_max"] == 4 and saved["model"]["tokenizer"] == "byte"  # the run's own, not the defaults
    assert [m["step"] for m in metrics(run_dir)][-1] == 6

    refused = qdylora("train", f"run_dir={run_dir}", "train.resume=true", "adapter.scale=constant")
    assert refused.returncode == 2
    fixed = "train.seed, train.batch_size, train.grad_accum, launcher.num_processes"
    assert refused.stderr.strip().splitlines() == [
        f"error: train.resume=true: adapter.scale would change from 'rank_stabilized' to 'constant', but only train.* "
        f"and launcher.* keys (except {fixed}) may change when resuming {run_dir}; train into a new run_dir to change "
        "adapter.scale"]
    reordered = qdylora("train", f"run_dir={run_dir}", "train.resume=true", "train.batch_size=4")  # the data order
    assert reordered.returncode == 2 and "train.batch_size would change from 8 to 4" in reordered.stderr


def test_a_run_is_self_contained_and_evaluates_from_anywhere(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    records = [{"instruction": f"Repeat {w}", "output": w} for w in ("cat", "dog", "owl", "fox", "emu", "yak")]
    (work / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 4))
    done = qdylora("train", *TINY, "run_dir=runs/mine", "data=json", "data.path=mine.jsonl", "data.template=plain",
                   "data.val_fraction=0.25", "train.max_steps=2", "train.eval_every=0", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = yaml.safe_load((work / "runs" / "mine" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(work / "mine.jsonl") and saved["run_dir"] == str(work / "runs" / "mine")
    evaluated = qdylora("eval", f"run_dir={work / 'runs' / 'mine'}", "rank=2", f"out_dir={tmp_path / 'out'}",
                        cwd=elsewhere)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]


def test_a_cpu_run_uses_float32_without_checkpointing_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    done = qdylora("train", *TINY, f"run_dir={run_dir}", "model.dtype=auto", "train.mixed_precision=auto",
                   "train.gradient_checkpointing=null", "train.max_steps=1", "train.eval_every=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("no GPU: model.dtype=float32, train.mixed_precision=no, train.gradient_checkpointing=false "
            "(the auto settings)") in done.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["model"]["dtype"], saved["train"]["mixed_precision"], saved["train"]["gradient_checkpointing"]) == (
        "float32", "no", False)


def test_a_handful_of_examples_trains_with_a_warning_and_the_count(tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("a", "b", "c")))
    done = qdylora("train", *TINY, f"run_dir={tmp_path / 'run'}", "data=json", f"data.path={data}", "data.val_fraction=0",
                   "train.max_steps=1", "train.eval_every=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warning: only 3 training examples in {data}: is this the file you meant?" in done.stderr
    assert "data: 3 training examples" in done.stderr
