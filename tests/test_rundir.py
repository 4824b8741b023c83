"""The run directory: atomic directories, manifests, and skipping damaged checkpoints."""

import logging

import pytest
import torch

from qdylora_cli.errors import QdyloraError
from qdylora_cli.rundir import (
    atomic_dir,
    checkpoint_dirs,
    latest_good_checkpoint,
    load_adapter,
    save_adapter,
    save_checkpoint,
    verify_dir,
)


def _write(tmp, text="x"):
    (tmp / "a.txt").write_text(text)


def test_atomic_dir_leaves_old_contents_when_the_writer_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        _write(tmp, "good")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:
            _write(tmp, "half")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "good"
    assert verify_dir(target) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary directories must be cleaned up"


def test_atomic_dir_refuses_to_overwrite_without_permission(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(QdyloraError, match="overwrite=true"):
        with atomic_dir(target) as tmp:
            _write(tmp)
    assert (target / "keep.txt").read_text() == "user data"


def test_verify_dir_detects_changed_and_missing_files(tmp_path):
    target = tmp_path / "ck"
    with atomic_dir(target) as tmp:
        _write(tmp, "abc")
        (tmp / "b.bin").write_bytes(b"\x00" * 10)
    (target / "b.bin").write_bytes(b"\x00" * 9)
    assert "b.bin" in verify_dir(target)
    (target / "b.bin").unlink()
    assert "missing" in verify_dir(target)


def test_latest_good_checkpoint_skips_a_damaged_one_and_keep_last_prunes(tmp_path, caplog):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, lambda tmp, s=step: _write(tmp, str(s)), keep_last=3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-20", "step-30", "step-40"]
    (tmp_path / "checkpoints" / "step-40" / "a.txt").write_text("torn")
    with caplog.at_level(logging.WARNING):
        assert latest_good_checkpoint(tmp_path).name == "step-30"
    assert "step-40" in caplog.text


def test_adapter_round_trip_and_damage_detection(tmp_path):
    weights = {"layer.lora_A": torch.randn(4, 8), "layer.lora_B": torch.zeros(6, 4)}
    save_adapter(tmp_path / "adapter", weights, {"r_max": 4})
    loaded, meta = load_adapter(tmp_path / "adapter")
    assert meta == {"r_max": 4}
    assert torch.equal(loaded["layer.lora_A"], weights["layer.lora_A"])
    with open(tmp_path / "adapter" / "adapter.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(QdyloraError, match="damaged"):
        load_adapter(tmp_path / "adapter")
    with pytest.raises(QdyloraError, match="holds no adapter"):
        load_adapter(tmp_path)
