"""The adapter path alone at Llama-7B's layout: qdylora's packed factors + rank-aware AdamW against PEFT's LoRA.

    python scripts/bench_adapters.py                  # 224 layers (32 x q,k,v,o,gate,up,down), r_max 64, 1 thread
    python scripts/bench_adapters.py --tiny           # 3 small layers: a smoke test

Every adapted linear layer of Llama-2-7B (widths 4096 and 11008) gets an adapter whose base layer
costs nothing (it returns zeros), so what is timed is what the adapters add to a training step:
forward + backward of the low-rank path (input gradient included), gradient-norm clipping and the
optimizer step. PEFT: `peft.tuners.lora.Linear` at r = 64 with torch's AdamW (foreach). qdylora:
`DynamicRankLoRA` with r_max 64 and `RankAwareAdamW`, a step at rank b in mode full (slices 1..b
train) and in mode frozen (slice b trains), one rank per step. CPU, one thread by default,
`--tokens` tokens through every layer; the median of `--steps` timed steps after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qdylora_cli.adapters import (  # noqa: E402
    DynamicRankLoRA,
    RankAwareAdamW,
    adapter_parameters,
    trained_slices,
)
from qdylora_cli.quant import import_bitsandbytes  # noqa: E402

ALPHA, LR, MAX_GRAD_NORM = 16.0, 2e-4, 0.3
LLAMA_7B_LAYER = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]  # q, k, v, o, gate, up, down
TINY_LAYER = [(64, 64), (64, 128), (128, 64)]


class FreeLinear(nn.Linear):
    """A stand-in base layer of the given shape that costs nothing: its output is zeros."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(1, 1, bias=False)
        self.in_features, self.out_features = in_features, out_features
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    return (TINY_LAYER if args.tiny else LLAMA_7B_LAYER) * args.layers


def qdylora_layers(args: argparse.Namespace, mode: str) -> nn.ModuleList:
    return nn.ModuleList(DynamicRankLoRA(FreeLinear(i, o), args.r_max, ALPHA, mode=mode, scale="rank_stabilized")
                         for i, o in shapes(args))


def peft_layers(args: argparse.Namespace) -> nn.ModuleList:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    config = LoraConfig(r=args.r_max, lora_alpha=ALPHA, lora_dropout=0.0)
    return nn.ModuleList(LoraLinear(FreeLinear(i, o), "default", config=config, r=args.r_max, lora_alpha=ALPHA)
                         for i, o in shapes(args))


def time_steps(layers: nn.ModuleList, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
               before_step=None) -> tuple[float, float]:
    """Median seconds of (forward + backward, clip + optimizer step) over the timed steps."""
    generator = torch.Generator().manual_seed(0)
    widths = sorted({i for i, _ in shapes(args)})
    inputs = {w: torch.randn(args.tokens, w, generator=generator).requires_grad_() for w in widths}
    upstream = [torch.randn(args.tokens, o, generator=generator) for _, o in shapes(args)]
    params = [p for p in layers.parameters() if p.requires_grad]
    for p in layers.parameters():  # B starts at zero; a trained-looking B gives A real gradients
        if p.dim() == 2 and p.requires_grad:
            nn.init.normal_(p, std=0.02)
    backward_s, update_s = [], []
    for step in range(1 + args.steps):
        if before_step is not None:
            before_step(optimizer)
        start = time.perf_counter()
        total = sum((layer(inputs[layer.in_features]) * g).sum() for layer, g in zip(layers, upstream))
        total.backward()
        middle = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for x in inputs.values():
            x.grad = None
        end = time.perf_counter()
        if step > 0:  # the first step allocates the optimizer state
            backward_s.append(middle - start)
            update_s.append(end - middle)
    return statistics.median(backward_s), statistics.median(update_s)


def measure_qdylora(args: argparse.Namespace, mode: str, rank: int) -> tuple[float, float]:
    layers = qdylora_layers(args, mode)
    for layer in layers:
        layer.rank = rank
    optimizer = RankAwareAdamW(adapter_parameters(layers), lr=LR)
    return time_steps(layers, optimizer, args, lambda opt: opt.mark_trained(trained_slices(rank, mode)))


def measure_peft(args: argparse.Namespace) -> tuple[float, float]:
    layers = peft_layers(args)
    optimizer = torch.optim.AdamW([p for p in layers.parameters() if p.requires_grad], lr=LR, foreach=True)
    return time_steps(layers, optimizer, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="3 small layers (CI smoke test)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; tiny 1)")
    parser.add_argument("--r-max", type=int, default=None, help="qdylora r_max = PEFT r (default 64; tiny 8)")
    parser.add_argument("--ranks", default=None, help="ranks a qdylora step trains (default 8,32,64; tiny 2,8)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens through every layer per step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; tiny 2)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.layers = args.layers or (1 if args.tiny else 32)
    args.r_max = args.r_max or (8 if args.tiny else 64)
    args.ranks = [int(r) for r in (args.ranks or ("2,8" if args.tiny else "8,32,64")).split(",")]
    args.steps = args.steps or (2 if args.tiny else 5)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import_bitsandbytes()  # peft imports it; this keeps its CPU warning quiet
    import peft

    n = len(shapes(args))
    print(f"# {n} adapted layers ({'tiny' if args.tiny else 'Llama-7B'} widths), r_max {args.r_max}, "
          f"{args.tokens} tokens per layer, CPU, {torch.get_num_threads()} thread(s), median of {args.steps} steps")
    print(f"# torch {torch.__version__}, peft {peft.__version__}")
    print("| system | rank trained | fwd+bwd ms | clip+optimizer ms | total ms | vs PEFT |")
    print("|---|---|---|---|---|---|")
    peft_fb, peft_up = measure_peft(args)
    peft_total = peft_fb + peft_up
    print(f"| peft r={args.r_max} | {args.r_max} | {peft_fb * 1e3:,.0f} | {peft_up * 1e3:,.0f} | "
          f"{peft_total * 1e3:,.0f} | 1.00x |", flush=True)
    for mode in ("full", "frozen"):
        for rank in args.ranks:
            fb, up = measure_qdylora(args, mode, rank)
            print(f"| qdylora {mode} | {rank} | {fb * 1e3:,.0f} | {up * 1e3:,.0f} | {(fb + up) * 1e3:,.0f} | "
                  f"{(fb + up) / peft_total:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
