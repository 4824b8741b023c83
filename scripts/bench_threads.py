"""CPU threads: training speed at one thread, at every core, and with `train.cpu_threads=auto`.

    python scripts/bench_threads.py            # the tiny recipe, and stories260K on tinyshakespeare
    python scripts/bench_threads.py --steps 10 # quicker
    python scripts/bench_threads.py --busy     # with one core kept busy by another process

Each setting is a real `qdylora train` process (float32, no gradient checkpointing, as on a CPU by
default) of `--steps` optimizer steps; steps/s is measured from the loop alone (the `elapsed` of
metrics.jsonl, so loading and quantizing are left out). OMP_NUM_THREADS is removed from the
processes' environment so that `auto` decides; the count it chose is shown. Run it alone (`--busy`
adds exactly one busy core): other jobs on the cores change what is best.
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


def steps_per_second(setting: list[str], threads: str, steps: int, work: Path) -> tuple[float, str]:
    """Steps/s of the loop, and the thread count the run reported."""
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
    chosen = next((line.split("CPU threads: ")[1].split(" ")[0] for line in done.stderr.splitlines()
                   if "CPU threads: " in line), "?")
    return (last["step"] - first["step"]) / (last["elapsed"] - first["elapsed"]), chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--busy", action="store_true", help="keep one core busy with a spinning process")
    args = parser.parse_args(argv)
    cores = str(os.cpu_count())
    print(f"# {args.steps} steps per run, {os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.2f}"
          f"{'; one core kept busy' if args.busy else ''}")
    print("| setting | 1 thread | all cores | auto (threads) | auto vs best |")
    print("|---|---|---|---|---|")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, setting in SETTINGS.items():
                runs = {t: steps_per_second(setting, t, args.steps, Path(tmp)) for t in ("1", cores, "auto")}
                speed = {t: r[0] for t, r in runs.items()}
                best = max(speed["1"], speed[cores])
                print(f"| {name} | {speed['1']:.2f} steps/s | {speed[cores]:.2f} steps/s | {speed['auto']:.2f} steps/s "
                      f"({runs['auto'][1]}) | {speed['auto'] / best:.2f}x |", flush=True)
    finally:
        if spinner is not None:
            spinner.kill()


if __name__ == "__main__":
    main()
