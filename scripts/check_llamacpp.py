"""GGUF exports checked by llama.cpp itself (through llama-cpp-python): logits and greedy text equal ours.

On stories260K adapted to tinyshakespeare (a LoRA and a DoRA run trained here in seconds), for a rank
and for an allocation of ranks per layer:

- `format=gguf` (f32, f16, bf16, q8_0): llama.cpp's logits against our model at that rank;
- `format=gguf-lora` on the `rank=0 format=gguf` base: against our model, and against the merged GGUF;
- our PEFT export converted by llama.cpp's own `convert_lora_to_gguf.py` (with --llama-cpp-src, the
  vendor/llama.cpp folder of the llama-cpp-python sdist) and applied to the same base.

Every llama.cpp context keeps its KV cache in float32 (type_k=type_v=0): the default f16 cache alone
moves stories260K's logits by ~2e-2. tests/test_gguf.py runs the same round trips (skipped without
llama_cpp). Usage:

    python scripts/check_llamacpp.py [--work DIR] [--llama-cpp-src PATH/vendor/llama.cpp]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qdylora_cli import export, train  # noqa: E402
from qdylora_cli.adapters import set_rank  # noqa: E402
from qdylora_cli.allocation import run_module_shapes  # noqa: E402
from qdylora_cli.cli import compose_config  # noqa: E402
from qdylora_cli.model import load_run_model  # noqa: E402

SHARED = REPO.parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
GGML_TYPE_F32 = 0  # llama.cpp's ggml_type for the KV cache
PROMPT = "ROMEO:\nWhat light through yonder window"
# What each GGUF type may cost in logits on stories260K (f32 is exact to float rounding); measured maxima
# are printed by this script and recorded in README.md#serving.
TOLERANCE = {"f32": 1e-4, "f16": 5e-2, "bf16": 2.5e-1, "q8_0": 5e-1}


def train_run(run_dir: Path, *extra: str, steps: int = 40) -> Path:
    """A short float32 stories260K run on tinyshakespeare (r_max 8)."""
    train.run(compose_config("train", [
        "model=hf", f"model.name_or_path={STORIES260K}", "model.dtype=float32", "data=text",
        f"data.path={SHAKESPEARE}", "data.block_size=64", "data.val_fraction=0.01", "data.max_samples=200",
        "optimizer=adamw", "optimizer.lr=3e-3", "adapter.r_max=8", "adapter.alpha=16", f"run_dir={run_dir}",
        f"train.max_steps={steps}", "train.batch_size=8", "train.grad_accum=1", "train.save_every=0",
        "train.eval_every=0", "train.mixed_precision=no", "train.gradient_checkpointing=false", *extra,
    ]))
    return run_dir


def mixed_allocation(run_dir: Path) -> Path:
    """An allocation with ranks 1..8 and a rank-0 layer, written beside the run."""
    shapes, _ = run_module_shapes(run_dir)
    allocation = {s.name: [8, 2, 5, 1, 3, 0, 4][i % 7] for i, s in enumerate(shapes)}
    path = run_dir / "mixed-allocation.json"
    path.write_text(json.dumps(allocation))
    return path


def do_export(run_dir: Path, *args: str) -> Path:
    """`qdylora export run_dir=... ARGS overwrite=true`; returns the export folder."""
    return export.run(compose_config("export", [f"run_dir={run_dir}", "overwrite=true", *args]))


@torch.no_grad()
def ours(run_dir: Path, rank: int | Mapping[str, int], ids: Sequence[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """Our NF4 model at `rank`: logits of `ids` (n × vocab) and `new_tokens` greedy continuation tokens."""
    model, _, _ = load_run_model(run_dir)
    set_rank(model, dict(rank) if isinstance(rank, Mapping) else rank)
    logits = model(input_ids=torch.tensor([list(ids)])).logits[0].float().numpy()
    seq = list(ids)
    for _ in range(new_tokens):  # no cache: a tiny model, and nothing of ours between the steps
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return logits, seq[len(ids):]


@contextlib.contextmanager
def llama(model: Path, lora: Path | None = None, n_ctx: int = 256) -> Iterator[object]:
    """llama.cpp on `model` (with the LoRA adapter GGUF `lora`), float32 KV cache, one thread, all logits kept."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=n_ctx,
                logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_threads=1, n_threads_batch=1,
                seed=0, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def theirs(model: Path, ids: Sequence[int], new_tokens: int, lora: Path | None = None) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits of `ids` and its greedy continuation (argmax of its own logits, step by step)."""
    with llama(model, lora) as llm:
        llm.reset()
        llm.eval(list(ids))
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
    return logits, out


def tokenize(model: Path, text: str) -> list[int]:
    """llama.cpp's tokens of `text`, BOS as the GGUF says (add_bos_token)."""
    with llama(model) as llm:
        return llm.tokenize(text.encode(), add_bos=llm._model.add_bos_token(), special=False)


def convert_peft(peft_dir: Path, base_dir: Path, out: Path, llama_cpp_src: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own convert_lora_to_gguf.py on a PEFT export (its base config from `base_dir`)."""
    script = llama_cpp_src / "convert_lora_to_gguf.py"
    cmd = [sys.executable, str(script), str(peft_dir), "--base", str(base_dir), "--outtype", outtype, "--outfile", str(out)]
    # its own gguf-py, from the same llama.cpp checkout (it uses it unless NO_LOCAL_GGUF is set)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"convert_lora_to_gguf.py failed: {done.stderr[-2000:]}")
    return out


def gguf_file(folder: Path) -> Path:
    return next(folder.glob("*.gguf"))


def round_trips(work: Path, llama_cpp_src: Path | None, rank: int = 5, new_tokens: int = 24) -> list[dict]:
    """Every round trip of the module docstring; one row each: case, max |Δlogit|, greedy equal, tolerance."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    ids = tokenizer(PROMPT)["input_ids"]
    rows = []

    def row(case: str, reference: tuple[np.ndarray, list[int]], got: tuple[np.ndarray, list[int]], tol: float) -> None:
        rows.append({"case": case, "max_abs_dlogit": float(np.abs(got[0] - reference[0]).max()),
                     "greedy_equal": got[1] == reference[1], "tolerance": tol})

    for variant in ("lora", "dora"):
        extra = ["adapter.variant=dora", "adapter.mode=full"] if variant == "dora" else []
        run_dir = train_run(work / variant, *extra)
        base = gguf_file(do_export(run_dir, "rank=0", "format=gguf", "gguf_type=f32"))
        row(f"{variant} rank 0 gguf f32 (the dequantized base)", ours(run_dir, 0, ids, new_tokens),
            theirs(base, ids, new_tokens), TOLERANCE["f32"])
        reference = ours(run_dir, rank, ids, new_tokens)
        merged = {}
        for kind in ("f32", "f16", "bf16", "q8_0"):
            merged[kind] = gguf_file(do_export(run_dir, f"rank={rank}", "format=gguf", f"gguf_type={kind}"))
            row(f"{variant} rank {rank} gguf {kind}", reference, theirs(merged[kind], ids, new_tokens), TOLERANCE[kind])
        allocation = mixed_allocation(run_dir)
        alloc_ranks = json.loads(allocation.read_text())
        alloc_ref = ours(run_dir, alloc_ranks, ids, new_tokens)
        alloc_gguf = gguf_file(do_export(run_dir, f"allocation={allocation}", "format=gguf", "gguf_type=f32"))
        row(f"{variant} allocation gguf f32", alloc_ref, theirs(alloc_gguf, ids, new_tokens), TOLERANCE["f32"])
        if variant == "dora":  # a LoRA adapter GGUF cannot express DoRA: the merged model is its GGUF
            continue
        lora = gguf_file(do_export(run_dir, f"rank={rank}", "format=gguf-lora", "gguf_type=f32"))
        row(f"lora rank {rank} gguf-lora f32 on the base", reference, theirs(base, ids, new_tokens, lora), TOLERANCE["f32"])
        row(f"lora rank {rank} gguf-lora f32 vs the merged gguf", theirs(merged["f32"], ids, new_tokens),
            theirs(base, ids, new_tokens, lora), TOLERANCE["f32"])
        for pad in ("false", "true"):
            alloc_lora = gguf_file(do_export(run_dir, f"allocation={allocation}", "format=gguf-lora", "gguf_type=f32",
                                             f"pad={pad}"))
            row(f"lora allocation gguf-lora f32{' padded' if pad == 'true' else ''} on the base", alloc_ref,
                theirs(base, ids, new_tokens, alloc_lora), TOLERANCE["f32"])
        if llama_cpp_src is not None:
            for what, args in ((f"rank {rank}", [f"rank={rank}"]), ("allocation", [f"allocation={allocation}"])):
                peft_dir = do_export(run_dir, *args, "format=peft")
                converted = convert_peft(peft_dir, STORIES260K, work / f"converted-{args[0].split('=')[0]}.gguf", llama_cpp_src)
                row(f"lora {what} PEFT -> convert_lora_to_gguf.py on the base",
                    reference if what.startswith("rank") else alloc_ref, theirs(base, ids, new_tokens, converted),
                    TOLERANCE["f32"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="folder for the runs and exports (default: a temporary one)")
    parser.add_argument("--llama-cpp-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"),
                        help="vendor/llama.cpp of the llama-cpp-python sdist, for convert_lora_to_gguf.py")
    parser.add_argument("--rank", type=int, default=5)
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama_cpp is not installed: build llama-cpp-python (README.md#serving)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = round_trips(args.work or Path(tmp), args.llama_cpp_src, args.rank)
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  max |Δlogit|  greedy equal  within tolerance")
    for r in rows:
        ok = r["max_abs_dlogit"] <= r["tolerance"]
        print(f"{r['case']:<{width}}  {r['max_abs_dlogit']:12.2e}  {str(r['greedy_equal']):>12}  {str(ok):>5} ({r['tolerance']:g})")
    return 0 if all(r["max_abs_dlogit"] <= r["tolerance"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
