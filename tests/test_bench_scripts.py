"""The GPU benchmark scripts run end to end on small shapes on the CPU (`--tiny`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(SCRIPTS / name), "--tiny", *args], capture_output=True, text=True,
                         timeout=120, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_train_compares_qdylora_and_peft_on_the_same_model():
    pytest.importorskip("peft")
    out = run_script("bench_train.py")
    rows = re.findall(r"^\| (\d+) \| (qdylora|peft) \| ([\d,]+) \| ([\d.]+) \|$", out, re.M)
    assert {(seq, system) for seq, system, *_ in rows} == {(s, x) for s in ("64", "128") for x in ("qdylora", "peft")}
    assert all(float(tps.replace(",", "")) > 0 for *_, tps, _ in rows)
    assert len(re.findall(r"^seq \d+: qdylora/peft tokens/s [\d.]+x, peak memory ([\d.]+x|n/a \(peft's is 0\))$",
                          out, re.M)) == 2


def test_bench_falcon40b_memory_trains_a_falcon_shaped_model():
    out = run_script("bench_falcon40b_memory.py")
    assert "tiny Falcon, r_max 64, seq 512" in out
    assert re.search(r"^training: [\d,]+ tokens/s over 2 steps", out, re.M)
    assert re.search(r"^peak RSS of the training steps: [\d.]+ MiB", out, re.M)


def test_bench_eval_sweep_gives_the_same_losses_as_separate_evaluations():
    out = run_script("bench_eval.py")
    rows = dict(re.findall(r"^\| (separate|sweep) \| ([\d.]+) \| [\d,]+ \|$", out, re.M))
    assert set(rows) == {"separate", "sweep"}
    diff = float(re.search(r"largest loss difference ([\d.e+-]+)$", out, re.M).group(1))
    assert diff < 1e-5


def test_bench_adapters_times_qdylora_against_peft_at_each_rank_and_mode():
    pytest.importorskip("peft")
    out = run_script("bench_adapters.py")
    rows = re.findall(r"^\| (peft r=8|qdylora full|qdylora frozen) \| (\d+) \| [\d,]+ \| [\d,]+ \| [\d,]+ \| ([\d.]+)x \|$",
                      out, re.M)
    assert [(system, rank) for system, rank, _ in rows] == [
        ("peft r=8", "8"), ("qdylora full", "2"), ("qdylora full", "8"), ("qdylora frozen", "2"), ("qdylora frozen", "8")]
    assert rows[0][2] == "1.00"


def test_bench_packing_compares_packed_and_padded_training():
    shared = Path(__file__).resolve().parents[2] / "shared"
    if not (shared / "models" / "stories260K").exists() or not (shared / "data" / "alpaca_1k.json").exists():
        pytest.skip(f"{shared} lacks stories260K or alpaca_1k.json")
    out = run_script("bench_packing.py")
    rows = re.findall(r"^\| (padded|padded, grouped|packed) \| [^|]+ \| ([\d.]+)% \| ([\d,]+) \| ([\d.]+)x \|$", out, re.M)
    assert [r[0] for r in rows] == ["padded", "padded, grouped", "packed"]
    padding = {name: float(p) for name, p, *_ in rows}
    assert padding["packed"] < padding["padded"] / 3 and rows[0][3] == "1.00"


def test_the_gpu_benchmark_script_is_valid_bash_and_runs_every_gpu_benchmark():
    script = SCRIPTS / "gpu_benchmarks.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for bench in ("bench_train.py", "bench_falcon40b_memory.py", "bench_eval.py"):
        assert bench in text
