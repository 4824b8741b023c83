"""Does `qdylora plan` predict a GPU step's memory? The plan (fake tensors) beside the same step on CUDA.

    python scripts/check_plan.py                 # on a CUDA machine; prints a table, one row per setting
    python scripts/check_plan.py --only tiny     # one setting

For each setting the step is the one `qdylora plan` counts (plan.measure), run three ways: on fake CPU
tensors (what the plan reports), and on the GPU, where both its own count of the bytes alive
(DeviceMemory) and the caching allocator's `torch.cuda.max_memory_allocated` are taken. The plan is
right when all three agree; the allocator's figure rounds every block up to 512 bytes, so it is a
little higher. The CUDA context is outside all three (the plan adds an allowance for it).
Weights are not loaded: the configs in ../shared/models/configs are enough, as for the plan.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from qdylora_cli import plan  # noqa: E402
from qdylora_cli.cli import compose_config  # noqa: E402
from qdylora_cli.data import max_sequence_length  # noqa: E402

CONFIGS = ROOT.parent / "shared" / "models" / "configs"
# name -> (overrides, the GPU whose auto settings apply, decoder layers kept: None = all)
SETTINGS = {
    "tiny": (["+recipe=tiny", "train.mixed_precision=bf16", "model.dtype=bfloat16"], "h100-80gb", None),
    "falcon40b-8-layers": (["+recipe=falcon40b_alpaca", f"model.name_or_path={CONFIGS / 'falcon-40b'}"],
                           "v100-32gb", 8),
    "falcon40b": (["+recipe=falcon40b_alpaca", f"model.name_or_path={CONFIGS / 'falcon-40b'}"], "v100-32gb", None),
    "llama3-8b-packed-2048": (["+recipe=llama3_8b_alpaca", f"model.name_or_path={CONFIGS / 'llama-3.1-8b'}",
                               "data=json", "data.path=unused.json", "data.packing=true", "data.max_length=2048",
                               "train.batch_size=2", "train.grad_accum=1", "adapter.r_max=8"], "rtx4090-24gb", None),
}
GIB = 1 << 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SETTINGS), action="append", help="settings to run (default all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_plan.py compares the plan with a CUDA step: run it on a GPU machine")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'setting':24} {'plan GiB':>9} {'GPU count':>9} {'allocator':>9} {'plan/alloc':>10} {'seconds':>8}")
    for name in args.only or SETTINGS:
        overrides, gpu, layers = SETTINGS[name]
        cfg = plan.plan_config(compose_config("plan", [*overrides, f"gpu={gpu}"]).train, plan.parse_gpu(gpu))
        config = plan.model_config(cfg)
        if layers is not None:
            config = plan.with_depth(config, layers)
        length = max_sequence_length(cfg.data)[0]
        started = time.perf_counter()
        planned = plan.estimate(cfg, config, length).peak[0]
        real = plan.measure(cfg, config, length, on="cuda")
        torch.cuda.empty_cache()
        print(f"{name:24} {planned / GIB:9.3f} {real.peak[0] / GIB:9.3f} {real.allocator_peak / GIB:9.3f} "
              f"{planned / real.allocator_peak:10.3f} {time.perf_counter() - started:8.1f}", flush=True)


if __name__ == "__main__":
    main()
