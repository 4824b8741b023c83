"""Evaluating 16 ranks: one multi-rank sweep against 16 separate single-rank evaluations, same data, same run.

    python scripts/bench_eval.py                 # Llama-7B shape on CUDA, a 4-layer 512-wide Llama on CPU
    python scripts/bench_eval.py --tiny          # small shapes: a smoke test
    python scripts/bench_eval.py --ranks-per-pass 4 --batches 8

The model has random NF4 weights and random adapter factors with r_max 16 (every linear layer but
lm_head). "separate" calls `rank_losses` once per rank, as a loop over `qdylora eval rank=b` would;
"sweep" is one call over ranks 1..16, which repeats each batch once per rank in a pass of
`--ranks-per-pass` ranks, so each NF4 weight is dequantized once per pass instead of once per rank.
Both must give the same losses; the script checks it and prints the largest difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qdylora_cli.adapters import inject_adapters, iter_adapters  # noqa: E402
from qdylora_cli.loading import build_skeleton, fill_model, random_tensors  # noqa: E402
from qdylora_cli.multirank import rank_losses  # noqa: E402

R_MAX = 16
SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "small": dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    model = build_skeleton(config, dtype=dtype)
    model = fill_model(model, random_tensors(model, device=device), dtype=dtype, device=device)
    inject_adapters(model, r_max=R_MAX, alpha=16.0)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():  # trained-looking factors: B is zero at init, which would make every rank equal
        for _, adapter in iter_adapters(model):
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) * 0.01)
    return model.eval()


def timed(fn, device: torch.device) -> tuple[float, dict[int, float]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke test)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512 on CUDA, 128 on CPU)")
    p.add_argument("--ranks-per-pass", type=int, default=8)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = "tiny" if args.tiny else ("7b" if device.type == "cuda" else "small")
    seq = args.seq or (32 if args.tiny else 512 if device.type == "cuda" else 128)
    model = build_model(shape, device, dtype)
    vocab = SHAPES[shape]["vocab_size"]
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(vocab, (args.batch_size, seq), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    ranks = list(range(1, R_MAX + 1))

    rank_losses(model, batches[:1], [1, 2], device=device)  # warm-up: kernels, allocator
    t_sep, separate = timed(lambda: {r: rank_losses(model, batches, [r], device=device)[r] for r in ranks}, device)
    t_sweep, sweep = timed(lambda: rank_losses(model, batches, ranks, ranks_per_pass=args.ranks_per_pass,
                                               device=device), device)
    diff = max(abs(separate[r] - sweep[r]) for r in ranks)

    tokens = args.batches * args.batch_size * seq * len(ranks)
    print(f"{shape} Llama on {device.type} ({dtype}), r_max {R_MAX}, {args.batches} batches of "
          f"{args.batch_size}x{seq} tokens, 16 ranks, {args.ranks_per_pass} ranks per pass")
    print("| method | seconds | tokens/s (all ranks) |")
    print("|---|---|---|")
    print(f"| separate | {t_sep:.2f} | {tokens / t_sep:,.0f} |")
    print(f"| sweep | {t_sweep:.2f} | {tokens / t_sweep:,.0f} |")
    print(f"sweep speed-up over 16 separate evaluations: {t_sep / t_sweep:.2f}x; largest loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
