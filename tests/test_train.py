"""End-to-end training: the tiny recipe through the console script, exact resume, a real pretrained model."""

import json
import shutil
import subprocess

import pytest
from safetensors.torch import load_file

from qdylora_cli import train
from qdylora_cli.cli import compose_config
from qdylora_cli.errors import QdyloraError


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _val(run_dir, rank):
    return [m["val_loss"][str(rank)] for m in _metrics(run_dir) if "val_loss" in m]


def test_tiny_recipe_through_the_console_script(tmp_path):
    run_dir = tmp_path / "tiny"
    done = subprocess.run(["qdylora", "train", "+recipe=tiny", f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for path in ("config.yaml", "metrics.jsonl", "adapter/adapter.safetensors", "adapter/adapter_config.json",
                 "base_model/config.json", "checkpoints/step-300"):
        assert (run_dir / path).exists(), path
    meta = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert meta["r_max"] == 8 and meta["quant"]["type"] == "nf4" and len(meta["target_modules"]) == 28
    weights = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    assert weights[f"{meta['target_modules'][0]}.lora_A"].shape[0] == 8
    first, last = _val(run_dir, 8)[0], _val(run_dir, 8)[-1]
    assert last < first - 1.0, f"validation loss at rank 8 should fall clearly: {first} -> {last}"
    record = _metrics(run_dir)[-1]
    assert {"step", "loss", "rank", "lr", "tokens_per_s", "elapsed"} <= record.keys()
    # A second train into the same run dir must refuse and leave the run alone.
    again = subprocess.run(["qdylora", "train", "+recipe=tiny", f"run_dir={run_dir}"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "train.resume=true" in again.stderr
    assert (run_dir / "adapter" / "adapter.safetensors").exists()


def _tiny(run_dir, *extra):
    return compose_config("train", ["+recipe=tiny", f"run_dir={run_dir}", "train.max_steps=6", "train.save_every=3",
                                    "train.eval_every=0", "train.batch_size=4", "train.log_every=1",
                                    "adapter.dropout=0.1", *extra])


def test_resume_after_a_crash_ends_bit_identical(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train.run(_tiny(straight))
    train.run(_tiny(crashed))
    # Simulate a kill after step 3's checkpoint: later work is lost.
    shutil.rmtree(crashed / "adapter")
    shutil.rmtree(crashed / "checkpoints" / "step-6")
    train.run(_tiny(crashed, "train.resume=true"))
    a = load_file(str(straight / "adapter" / "adapter.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    assert [m["step"] for m in _metrics(crashed)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in _metrics(crashed)] == [m["loss"] for m in _metrics(straight)]


def test_resume_with_a_changed_adapter_is_refused(tmp_path):
    train.run(_tiny(tmp_path / "run"))
    with pytest.raises(QdyloraError, match="adapter"):
        train.run(_tiny(tmp_path / "run", "train.resume=true", "adapter.r_max=4"))


def test_stories260k_on_shakespeare_validation_loss_falls(tmp_path, stories260k, shakespeare):
    run_dir = tmp_path / "stories"
    cfg = compose_config("train", [
        "model=hf", f"model.name_or_path={stories260k}", "model.dtype=float32",
        "data=text", f"data.path={shakespeare}", "data.block_size=128", "data.val_fraction=0.01",
        f"run_dir={run_dir}", "optimizer=adamw", "optimizer.lr=3e-3", "adapter.r_max=8", "adapter.dropout=0.0",
        "train.max_steps=40", "train.batch_size=8", "train.grad_accum=1", "train.eval_every=20",
        "train.eval_batches=4", "train.save_every=0", "train.mixed_precision=no",
        "train.gradient_checkpointing=false",
    ])
    train.run(cfg)
    curve = _val(run_dir, 8)
    assert curve[-1] < curve[0] - 0.2, curve
