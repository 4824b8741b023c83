"""Time our NF4 against bitsandbytes on the same weights: quantize, dequantize, NF4Linear forward+backward.

    python scripts/bench_nf4.py [--shapes 4096x4096,11008x4096] [--dtypes float32,bfloat16]
                                [--repeat N] [--device cpu|cuda] [--tokens 8x64] [--no-double-quant]

Shapes are out×in (a Hugging Face weight's shape). Each row is the median of --repeat runs after
one warm-up, ours and bitsandbytes' runs interleaved so that load from other processes hits both.
Forward+backward feeds a batch of --tokens (sequences × tokens) with requires_grad input, i.e. the
QLoRA training path: dequantize, matmul; dequantize again, matmul for the input gradient.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from qdylora_cli.quant import NF4Linear, dequantize_nf4, import_bitsandbytes, quantize_nf4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", default="4096x4096,11008x4096", help="comma-separated out×in, e.g. 4096x4096"
    )
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", default="8x64", help="forward+backward batch: sequences x tokens")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    return parser.parse_args()


def timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def compare(ours: Callable[[], object], theirs: Callable[[], object] | None, repeat: int, device: str):
    """Median ms of ours and theirs (None where bitsandbytes fails, with the reason)."""
    ours()
    try:
        if theirs is None:
            raise RuntimeError("bitsandbytes is not installed")
        theirs()
    except Exception as err:  # bitsandbytes' CPU kernels reject some widths; report, don't stop
        return statistics.median(timed(ours, device) for _ in range(repeat)), f"{type(err).__name__}: {err}"
    times_ours, times_theirs = [], []
    for _ in range(repeat):
        times_ours.append(timed(ours, device))
        times_theirs.append(timed(theirs, device))
    return statistics.median(times_ours), statistics.median(times_theirs)


def bnb_linear(bnb, weight: torch.Tensor, double_quant: bool, device: str) -> nn.Module:
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=weight.dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=double_quant, quant_type="nf4", module=layer
    ).to(device)
    return layer  # left in training mode, the path QLoRA training takes


def forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer(x).backward(grad)
        x.grad = None

    return run


def cases(bnb, weight: torch.Tensor, double_quant: bool, batch: tuple[int, int]):
    """(op, ours, theirs) for one weight; theirs is None without bitsandbytes."""
    device, dtype = weight.device, weight.dtype
    out_features, in_features = weight.shape
    state = quantize_nf4(weight, 64, double_quant)
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    layer = NF4Linear.from_linear(linear, double_quant=double_quant)
    x = torch.randn(*batch, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(*batch, out_features, device=device, dtype=dtype)
    ours = [
        ("quantize", lambda: quantize_nf4(weight, 64, double_quant)),
        ("dequantize", lambda: dequantize_nf4(state)),
        ("forward+backward", forward_backward(layer, x, grad)),
    ]
    if bnb is None:
        return [(op, fn, None) for op, fn in ours]

    functional = bnb.functional
    packed, quant_state = functional.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )
    theirs = [
        lambda: functional.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
        ),
        lambda: functional.dequantize_4bit(packed, quant_state),
        forward_backward(bnb_linear(bnb, weight.clone(), double_quant, device), x, grad),
    ]
    return [(op, fn, other) for (op, fn), other in zip(ours, theirs)]


def main() -> None:
    args = parse_args()
    bnb = import_bitsandbytes()
    batch = tuple(int(v) for v in args.tokens.lower().split("x"))
    print(
        f"torch {torch.__version__}, bitsandbytes {bnb.__version__ if bnb else 'not installed'}, "
        f"device {args.device}, {torch.get_num_threads()} threads, double_quant={args.double_quant}, "
        f"batch {batch[0]}x{batch[1]} tokens; median of {args.repeat} runs, ms"
    )
    rows = []
    for shape in args.shapes.split(","):
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
        for dtype_name in args.dtypes.split(","):
            torch.manual_seed(0)
            weight = torch.randn(out_features, in_features) * 0.02
            weight = weight.to(device=args.device, dtype=getattr(torch, dtype_name))
            for op, ours, theirs in cases(bnb, weight, args.double_quant, batch):
                rows.append((op, f"{shape} {dtype_name}", *compare(ours, theirs, args.repeat, args.device)))

    print(f"\n| {'op':<16} | {'shape dtype':<20} | {'ours':>8} | {'bnb':>8} | {'ours/bnb':>8} |")
    print(f"|{'-' * 18}|{'-' * 22}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for op, label, ours_ms, theirs in rows:
        if isinstance(theirs, str):
            print(f"| {op:<16} | {label:<20} | {ours_ms:>8.1f} | {'n/a':>8} | {'n/a':>8} |  {theirs}")
        else:
            print(f"| {op:<16} | {label:<20} | {ours_ms:>8.1f} | {theirs:>8.1f} | {ours_ms / theirs:>8.2f} |")


if __name__ == "__main__":
    main()
