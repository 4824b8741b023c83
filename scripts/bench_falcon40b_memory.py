"""Peak GPU memory of QDyLoRA training on a Falcon-40B-shaped model (the paper's one-32GB-GPU claim).

    python scripts/bench_falcon40b_memory.py            # Falcon-40B shape on CUDA; goal: peak <= 28 GiB
    python scripts/bench_falcon40b_memory.py --tiny     # small shapes on CPU: a smoke test

Random weights are generated and quantized to NF4 one tensor at a time on the GPU
(loading.fill_model), so the 80 GB float model never exists. Then QDyLoRA training as `qdylora
train` does it by default: every linear layer adapted with ranks 1..64 (α 16, dropout 0.05, the
default mode, scale and rank schedule), seq 512, micro-batches of 1 (`--grad-accum` per step),
gradient checkpointing, qdylora's rank-aware AdamW, grad clip 0.3. `--mode frozen` measures the
papers' mode instead.

Printed: the peak while building the model, the quantized model's resident size, the peak of the
training steps (CUDA allocator, weights included), and the device memory in use after them as the
driver sees it (CUDA context included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import FalconConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train, beside this file

from bench_train import (  # noqa: E402
    PeakMemory,
    environment,
    qdylora_model,
    qdylora_schedule,
    train_steps,
)

from qdylora_cli.adapters import count_parameters  # noqa: E402

# tiiuae/falcon-40b's config.json: 60 layers, 128 query heads sharing 8 KV heads, parallel attention.
FALCON_40B = dict(vocab_size=65024, hidden_size=8192, num_hidden_layers=60, num_attention_heads=128,
                  num_kv_heads=8, new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False,
                  ffn_hidden_size=4 * 8192, tie_word_embeddings=True)
FALCON_TINY = FALCON_40B | dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_kv_heads=2, ffn_hidden_size=4 * 128)
GOAL_GIB = 28.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (CI smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 5; tiny 2)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--r-max", type=int, default=64)
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--mode", choices=["full", "frozen"], default=None, help="adapter mode (default: the default)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="compute dtype on the GPU (the paper's V100 has no bf16: float16 there)")
    args = parser.parse_args(argv)
    args.device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.dtype = torch.float32 if args.device.type == "cpu" else getattr(torch, args.dtype)
    args.steps = args.steps or (2 if args.tiny else 5)
    if args.tiny:
        torch.set_num_threads(1)  # see bench_train.parse_args
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, config = args.device, FalconConfig(**(FALCON_TINY if args.tiny else FALCON_40B))
    unit, scale = ("MiB", 2**20) if args.tiny else ("GiB", 2**30)
    print(f"# {'tiny Falcon' if args.tiny else 'Falcon-40B shape'}, r_max {args.r_max}, seq {args.seq}, batch 1 x "
          f"{args.grad_accum}, {args.dtype}, gradient checkpointing, rank-aware AdamW, {args.steps} steps")
    print(f"# {environment(device.type)}")

    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    model = qdylora_model(config, device, args.dtype, args.r_max, mode=args.mode)
    build_s, build_peak = time.perf_counter() - start, memory.peak_bytes()
    trainable, total = count_parameters(model)
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(f"parameters: {total / 1e6:,.1f}M, trainable {trainable / 1e6:,.1f}M (all ranks 1..{args.r_max})")
    print(f"model resident (NF4 base + adapters): {resident / scale:.2f} {unit}; built in {build_s:.1f} s, "
          f"peak while building {build_peak / scale:.2f} {unit}")

    memory.start()
    optimizer, ranks_of_step = qdylora_schedule(model, args.r_max, args.grad_accum, 1, mode=args.mode)
    tokens_per_s = train_steps(model, device=device, dtype=args.dtype, seq=args.seq, batch=1, steps=args.steps,
                               warmup=0, gradient_checkpointing=True, grad_accum=args.grad_accum,
                               optimizer=optimizer, ranks_of_step=ranks_of_step)
    peak = memory.peak_bytes() + memory.base  # weights included: everything the training process holds
    print(f"training: {tokens_per_s:,.0f} tokens/s over {args.steps} steps (first steps included)")
    if device.type == "cuda":
        free, total_device = torch.cuda.mem_get_info(device)
        print(f"peak GPU memory of the training steps (CUDA allocated): {peak / scale:.2f} {unit} "
              f"(goal <= {GOAL_GIB:.0f} GiB: {'met' if peak / 2**30 <= GOAL_GIB else 'NOT met'})")
        print(f"device memory in use after the steps (driver view): {(total_device - free) / scale:.2f} {unit}")
    else:
        print(f"peak RSS of the training steps: {peak / scale:.1f} {unit} (whole process; CPU smoke test)")


if __name__ == "__main__":
    main()
