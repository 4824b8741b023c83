"""CPU threads: training speed at one thread, at every core, and with `train.cpu_threads=auto`.

    python scripts/bench_threads.py            # the tiny recipe, and stories260K on tinyshakespeare
    python scripts/bench_threads.py --steps 10 # quicker

Each setting is a real `qdylora train` process (float32, no gradient checkpointing, as on a CPU by
default) of `--steps` optimizer steps; steps/s is measured from the loop alone (the `elapsed` of
metrics.jsonl, so loading and quantizing are left out). OMP_NUM_THREADS is removed from the
processes' environment so that `auto` decides. Run it alone: two jobs on two cores measure nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

SETTINGS = {
    "tiny recipe": ["+recipe=tiny"],
    "stories260K on tinyshakespeare": [
        "model=hf", f"model.name_or_path={SHARED / 'models' / 'stories260K'}", "data=text",
        f"data.path={SHARED / 'data' / 'tinyshakespeare.txt'}", "data.block_size=128", "adapter.r_max=8",
        "train.batch_size=8", "train.grad_accum=1", "optimizer.lr=3e-3",
    ],
}


def steps_per_second(setting: list[str], threads: str, steps: int, work: Path) -> float:
    run_dir = work / f"run-{threads}-{abs(hash(tuple(setting)))}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env |= {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "qdylora_cli", "train", *setting, f"run_dir={run_dir}", "overwrite=true",
           f"train.max_steps={steps}", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
           f"train.cpu_threads={threads}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]  # from the end of step 1: the first step warms up
    return (last["step"] - first["step"]) / (last["elapsed"] - first["elapsed"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    cores = str(os.cpu_count())
    print(f"# {args.steps} steps per run, {os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.2f}")
    print("| setting | 1 thread | all cores | auto | auto vs best |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, setting in SETTINGS.items():
            speed = {t: steps_per_second(setting, t, args.steps, Path(tmp)) for t in ("1", cores, "auto")}
            best = max(speed["1"], speed[cores])
            print(f"| {name} | {speed['1']:.2f} steps/s | {speed[cores]:.2f} steps/s | {speed['auto']:.2f} steps/s | "
                  f"{speed['auto'] / best:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
