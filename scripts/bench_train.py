"""Training-step speed and peak memory: qdylora against PEFT + bitsandbytes QLoRA, same model, same settings.

    python scripts/bench_train.py                       # Llama-7B shape on CUDA, seq 512 and 2048
    python scripts/bench_train.py --tiny                # small shapes on CPU: a smoke test
    python scripts/bench_train.py --dora                # DoRA on both sides
    python scripts/bench_train.py --seqs 512 --steps 20 --no-gradient-checkpointing
    python scripts/bench_train.py --systems qdylora,qdylora+compile,qdylora+full_loss,peft

The model has Llama-2-7B's shape with random weights, generated and quantized to NF4 one tensor
at a time on the device (loading.fill_model), so a float copy of the model never exists. The PEFT
model gets the *same* NF4 codes: each of our NF4Linear layers becomes a `bnb.nn.Linear4bit` from
its state dict (the layouts are the same), then `peft.get_peft_model` adds LoRA at r = r_max.

Both sides: all linear layers but lm_head adapted, α 16, dropout 0.05, embeddings and norms in the
compute dtype, adapters in float32 under autocast, gradient checkpointing, grad-norm clipping at
0.3, micro-batches of 1 with `--grad-accum` of them per optimizer step (QLoRA's settings). qdylora
trains as `qdylora train` does by default (conf/train.yaml: mode, scale, rank schedule and ranks per
step, each step's ranks shared among its micro-batches) with its rank-aware AdamW; PEFT uses
torch's AdamW (foreach) at r = r_max. qdylora's loss is train's (loss.py: chunked float32 cross-entropy);
`qdylora+full_loss` uses the model's own (float32 logits and softmax whole), `qdylora+compile` compiles
the decoder layers as `train.compile=true` does (the first steps, compiling, are the warm-up). Reported: tokens/s over the timed steps after warm-up, and the
peak memory of the whole training step (weights included): CUDA allocator peak on a GPU, process
RSS peak on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qdylora_cli.adapters import (  # noqa: E402
    assign_ranks,
    build_rank_sampler,
    inject_adapters,
    set_rank,
    trained_slices,
)
from qdylora_cli.compile import compile_decoder_layers  # noqa: E402
from qdylora_cli.config import AdapterConfig, OptimizerConfig, RankScheduleConfig  # noqa: E402
from qdylora_cli.loading import build_skeleton, fill_model, random_tensors  # noqa: E402
from qdylora_cli.loss import token_losses  # noqa: E402
from qdylora_cli.model import enable_gradient_checkpointing  # noqa: E402
from qdylora_cli.quant import NF4Linear, import_bitsandbytes  # noqa: E402
from qdylora_cli.train import build_optimizer  # noqa: E402

ALPHA, DROPOUT, MAX_GRAD_NORM, LR = 16.0, 0.05, 0.3, 2e-4
warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls transformers' deprecated names

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
# Widths that are multiples of 64: bitsandbytes' CPU kernels fail on some others.
LLAMA_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


# --- measuring -------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory added since `start()`: the CUDA allocator's on a GPU, the process RSS's (Linux) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            self.base = _proc_status("VmRSS") * 1024

    def peak_bytes(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if not Path("/proc/self/status").exists():
            return float("nan")
        # Growth, so never below 0 (RSS can shrink, e.g. when gc returns pages, below the level at start).
        return max(0.0, _proc_status("VmHWM") * 1024 - self.base)


def _proc_status(key: str) -> int:
    """A /proc/self/status value in KiB."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the two models --------------------------------------------------------------------------------


def nf4_base(config: PretrainedConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """Random weights, each linear one quantized to NF4 as soon as it is generated (no float model ever)."""
    model = build_skeleton(config, dtype=dtype)
    return fill_model(model, random_tensors(model, device=device, seed=seed), dtype=dtype, device=device)


def qdylora_model(config: PretrainedConfig, device: torch.device, dtype: torch.dtype, r_max: int,
                  mode: str | None = None, dora: bool = False) -> PreTrainedModel:
    """The NF4 base with qdylora's adapters in the default training setting (or `mode`; DoRA with `dora`)."""
    defaults = AdapterConfig()
    model = nf4_base(config, device, dtype)
    inject_adapters(model, r_max=r_max, alpha=ALPHA, dropout=DROPOUT, mode=mode or defaults.mode,
                    variant="dora" if dora else "lora", scale=defaults.scale)
    return model


def peft_model(config: PretrainedConfig, device: torch.device, dtype: torch.dtype, r: int,
               dora: bool = False) -> nn.Module:
    """The same NF4 base as bitsandbytes Linear4bit layers, with PEFT's LoRA (or DoRA) at rank r."""
    import peft

    bnb = import_bitsandbytes()
    model = nf4_base(config, device, dtype)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        swapped = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    compute_dtype=dtype, compress_statistics=layer.nested_absmax is not None,
                                    quant_type="nf4", device="meta")
        state = {k.removeprefix("weight."): v.to(device) for k, v in layer.state_dict().items() if k != "weight"}
        state.pop("bias", None)
        swapped.weight = bnb.nn.Params4bit.from_prequantized(layer.weight, state, device=device, module=swapped)
        if layer.bias is not None:
            swapped.bias = nn.Parameter(layer.bias.to(dtype), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, swapped)
    lora = peft.LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                           use_dora=dora, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)


# --- the step ----------------------------------------------------------------------------------------


def train_steps(
    model: nn.Module,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seq: int,
    batch: int,
    steps: int,
    warmup: int,
    gradient_checkpointing: bool,
    grad_accum: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    ranks_of_step: Callable[[], list] | None = None,
    chunked_loss: bool = False,
) -> float:
    """Run warm-up + timed optimizer steps on random tokens; the timed steps' tokens per second.

    `ranks_of_step()`, called before each step, sets up qdylora's ranks and returns the rank of
    each micro-batch; `optimizer` defaults to torch's AdamW; `chunked_loss`: train's loss instead of the model's.
    """
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=LR)
    vocab = model.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        plan = ranks_of_step() if ranks_of_step is not None else [None] * grad_accum
        for micro in range(grad_accum):
            if plan[micro] is not None:
                set_rank(model, plan[micro])
            ids = torch.randint(0, vocab, (batch, seq), device=device, generator=generator)
            with autocast:
                if chunked_loss:
                    logits = model(input_ids=ids, use_cache=False).logits
                    loss = token_losses(logits, ids).sum() / (ids[:, 1:].numel() * grad_accum)
                    del logits
                else:
                    loss = model(input_ids=ids, labels=ids).loss / grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return batch * seq * grad_accum * steps / (time.perf_counter() - start)


def qdylora_schedule(model: nn.Module, r_max: int, grad_accum: int, batch: int,
                     mode: str | None = None) -> tuple[torch.optim.Optimizer, Callable[[], list]]:
    """qdylora's optimizer and training schedule (conf/train.yaml's): each step draws its ranks, tells the
    optimizer which slices they train and shares them among the micro-batches."""
    schedule, mode = RankScheduleConfig(), mode or AdapterConfig().mode
    optimizer = build_optimizer(OptimizerConfig(lr=LR), model)
    sampler = build_rank_sampler(schedule.kind, r_max=r_max, seed=0)
    k = schedule.ranks_per_step

    def ranks_of_step() -> list:
        ranks = sampler.sample(k)
        optimizer.mark_trained(trained_slices(tuple(ranks), mode))
        return assign_ranks(ranks, 1, grad_accum, batch)[0]

    return optimizer, ranks_of_step


def measure(system: str, args: argparse.Namespace, config: PretrainedConfig, seq: int) -> dict[str, float]:
    device, dtype = torch.device(args.device), args.dtype
    memory = PeakMemory(device)
    memory.start()
    optimizer, ranks_of_step = None, None
    name, *options = system.split("+")
    if name == "qdylora":
        model = qdylora_model(config, device, dtype, args.r_max, dora=args.dora)
        optimizer, ranks_of_step = qdylora_schedule(model, args.r_max, args.grad_accum, args.batch)
        if "compile" in options:
            compile_decoder_layers(model)
    else:
        model = peft_model(config, device, dtype, args.r_max, dora=args.dora)
    tokens_per_s = train_steps(model, device=device, dtype=dtype, seq=seq, batch=args.batch, steps=args.steps,
                               warmup=args.warmup, gradient_checkpointing=args.gradient_checkpointing,
                               grad_accum=args.grad_accum, optimizer=optimizer, ranks_of_step=ranks_of_step,
                               chunked_loss=name == "qdylora" and "full_loss" not in options)
    result = {"tokens_per_s": tokens_per_s, "peak_bytes": memory.peak_bytes()}
    del model, optimizer, ranks_of_step
    gc.collect()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (CI smoke test)")
    parser.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 512,2048; tiny 64,128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step (default 4)")
    parser.add_argument("--r-max", type=int, default=None, help="qdylora r_max = PEFT r (default 64; tiny 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    parser.add_argument("--systems", default="qdylora,peft",
                        help="which of qdylora, qdylora+compile, qdylora+full_loss, peft to run")
    parser.add_argument("--dora", action="store_true", help="DoRA on both sides (PEFT's use_dora)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    args.seqs = [int(s) for s in (args.seqs or ("64,128" if tiny else "512,2048")).split(",")]
    args.r_max = args.r_max or (8 if tiny else 64)
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.systems = args.systems.split(",")
    known = {"qdylora", "qdylora+compile", "qdylora+full_loss", "peft"}
    if unknown := [x for x in args.systems if x not in known]:
        parser.error(f"--systems: unknown {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    if tiny:
        # Tiny matmuls gain nothing from threads, and on a busy machine OpenMP barriers waiting for a
        # descheduled thread cost milliseconds per op: one thread gives stable numbers.
        torch.set_num_threads(1)
    return args


def environment(device: str) -> str:
    bitsandbytes = import_bitsandbytes()  # first and quietly: PEFT's plain import logs a line about `kernels`
    import peft
    import transformers

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return (f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = LlamaConfig(**(LLAMA_TINY if args.tiny else LLAMA_7B))
    # GiB of the CUDA allocator's peak on a GPU; MiB of RSS growth on the CPU, where the tiny model is small.
    unit, scale = ("peak GiB (CUDA allocated)", 2**30) if args.device == "cuda" else ("peak MiB (RSS growth)", 2**20)
    adapter, schedule = AdapterConfig(), RankScheduleConfig()
    print(f"# {'tiny Llama' if args.tiny else 'Llama-7B shape'}, r_max {args.r_max}, batch {args.batch} x "
          f"{args.grad_accum} micro-batches, {args.dtype}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.steps} timed steps after {args.warmup}")
    print(f"# {'DoRA' if args.dora else 'LoRA'}; qdylora: mode {adapter.mode}, scale {adapter.scale}, {schedule.kind} ranks, "
          f"{schedule.ranks_per_step} per step, rank-aware AdamW; peft: r {args.r_max}, torch AdamW")
    print(f"# {environment(args.device)}")
    print(f"| seq | system | tokens/s | {unit} |")
    print("|---|---|---|---|")
    results = {}
    for seq in args.seqs:
        for system in args.systems:
            r = results[seq, system] = measure(system, args, config, seq)
            print(f"| {seq} | {system} | {r['tokens_per_s']:,.0f} | {r['peak_bytes'] / scale:.2f} |", flush=True)
    for other in [x for x in args.systems if x != "qdylora"]:
        if "qdylora" not in args.systems:
            break
        for seq in args.seqs:
            q, p = results[seq, "qdylora"], results[seq, other]
            memory = f"{q['peak_bytes'] / p['peak_bytes']:.2f}x" if p["peak_bytes"] > 0 else f"n/a ({other}'s is 0)"
            print(f"seq {seq}: qdylora/{other} tokens/s {q['tokens_per_s'] / p['tokens_per_s']:.2f}x, peak memory {memory}")


if __name__ == "__main__":
    main()
