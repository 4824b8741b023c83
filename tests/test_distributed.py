"""Two processes on the CPU (gloo): data parallel through the CLI, and FSDP2 sharding of the NF4 model."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from test_loading import llama_config, save_sharded

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Trains 3 steps of the NF4 model sharded by FSDP2 over the processes, each on its half of the
# batch; then process 0 trains an unsharded copy on the whole batches and compares.
FSDP_SCRIPT = """
import json, sys, torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from qdylora_cli.adapters import inject_adapters, set_rank
from qdylora_cli.distributed import gathered_adapter_state, load_optimizer_state, make_nf4_shardable, optimizer_state
from qdylora_cli.loading import load_quantized
from qdylora_cli.quant import NF4Linear

model_dir, out = sys.argv[1], sys.argv[2]

def build():
    model = load_quantized(model_dir, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    inject_adapters(model, r_max=4, alpha=8)
    return model

def train(model, part, parts):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for rank in [4, 2, 3]:
        ids = torch.randint(0, 512, (4, 16), generator=g)
        ids = ids[part * 4 // parts:(part + 1) * 4 // parts]
        set_rank(model, rank)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer

dist.init_process_group("gloo")
me, world = dist.get_rank(), dist.get_world_size()
model = build()
total = sum(m.weight.numel() for m in model.modules() if isinstance(m, NF4Linear))
layers = make_nf4_shardable(model)
mesh = init_device_mesh("cpu", (world,))
for layer in model.model.layers:  # one unit per decoder layer, as accelerate's TRANSFORMER_BASED_WRAP
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
local = sum(m.weight.to_local().numel() for m in model.modules() if isinstance(m, NF4Linear))
optimizer = train(model, me, world)
sharded = gathered_adapter_state(model)
state = optimizer_state(model, optimizer)
load_optimizer_state(model, optimizer, state)
if me == 0:
    reference = build()
    train(reference, 0, 1)
    expected = {f"{n}.{k}": v for n, a in reference.named_modules() if hasattr(a, "adapter_state")
                for k, v in a.adapter_state().items()}
    diff = max((sharded[k] - expected[k]).abs().max().item() for k in expected)
    json.dump({"layers": layers, "local_bytes": local, "total_bytes": total, "keys_equal": sharded.keys() == expected.keys(),
               "max_diff": diff, "optimizer_entries": len(state["state"])}, open(out, "w"))
dist.destroy_process_group()
"""


# FSDP2 with bf16 mixed precision and the rank-aware AdamW: 4 steps at different ranks, then what a
# checkpoint holds (the gathered adapters, the full optimizer state) and what resuming from it gives.
FSDP_MIXED_SCRIPT = """
import io, json, sys, torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from qdylora_cli.adapters import RankAwareAdamW, adapter_parameters, inject_adapters, iter_adapters, set_rank
from qdylora_cli.adapters import trained_slices
from qdylora_cli.distributed import gathered_adapter_state, load_optimizer_state, make_nf4_shardable, optimizer_state
from qdylora_cli.loading import load_quantized

model_dir, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
me, world = dist.get_rank(), dist.get_world_size()
model = load_quantized(model_dir, dtype=torch.float32, device="cpu")
torch.manual_seed(0)
inject_adapters(model, r_max=4, alpha=8)
make_nf4_shardable(model)
mesh = init_device_mesh("cpu", (world,))
bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh, mp_policy=bf16)
fully_shard(model, mesh=mesh, mp_policy=bf16)
adamw = RankAwareAdamW(adapter_parameters([a for _, a in iter_adapters(model)]), lr=1e-2)
g = torch.Generator().manual_seed(0)
for rank in [4, 2, 4, 1]:
    ids = torch.randint(0, 512, (4, 16), generator=g)[me * 2:(me + 1) * 2]
    set_rank(model, rank)
    model(input_ids=ids, labels=ids).loss.backward()
    adamw.mark_trained(trained_slices(rank, "full"))
    adamw.step()
    adamw.zero_grad(set_to_none=True)
gathered = gathered_adapter_state(model)
masters = {f"{n}.{k}": getattr(a, k).full_tensor() for n, a in iter_adapters(model) for k in ("lora_A", "lora_B")}
saved = io.BytesIO()
torch.save(optimizer_state(model, adamw), saved)  # as a checkpoint holds it
first_A = next(p for p in adamw.param_groups[0]["params"])  # layer 0's first lora_A: rows 2, 3 on process 1
for entry in adamw.state.values():
    entry["slice_steps"].zero_()  # a fresh process: the counts come from the checkpoint alone
saved.seek(0)
load_optimizer_state(model, adamw, torch.load(saved, weights_only=True))
counts = adamw.state[first_A]["slice_steps"].flatten().tolist()
report = {"counts": counts, "dtypes": sorted({str(v.dtype) for v in gathered.values()}),
          "equal_to_masters": all(gathered[k].equal(masters[k]) for k in masters),
          "beyond_bf16": any((v != v.bfloat16().float()).any().item() for v in gathered.values())}
reports = [None] * world
dist.all_gather_object(reports, report)
if me == 0:
    json.dump(reports, open(out, "w"))
dist.destroy_process_group()
"""

# DDP as train.py builds it: what a forward broadcasts.
DDP_SCRIPT = """
import json, sys, torch
from pathlib import Path
import torch.distributed as dist
from qdylora_cli import train
from qdylora_cli.cli import compose_config

out = sys.argv[1]
cfg = compose_config("train", ["+recipe=tiny", "run_dir=unused"])
accelerator = train._make_accelerator(cfg, Path("unused"))
model = torch.nn.Linear(4, 4)
model.register_buffer("codes", torch.zeros(1000, dtype=torch.uint8))  # as NF4Linear's packed weight
prepared = accelerator.prepare(model)
calls = []
real = dist._broadcast_coalesced
dist._broadcast_coalesced = lambda *args, **kwargs: (calls.append(1), real(*args, **kwargs))[1]
for _ in range(3):
    prepared(torch.randn(2, 4)).sum().backward()
if accelerator.is_main_process:
    json.dump({"broadcast_buffers": prepared.broadcast_buffers, "broadcasts": len(calls)}, open(out, "w"))
"""


def torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def test_fsdp2_shards_the_nf4_codes_and_trains_like_one_process(tmp_path):
    model_dir = save_sharded(tmp_path / "m", llama_config())
    script = tmp_path / "fsdp.py"
    script.write_text(textwrap.dedent(FSDP_SCRIPT))
    out = torchrun(script, str(model_dir), str(tmp_path / "result.json"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["layers"] == 14
    assert result["local_bytes"] == result["total_bytes"] // 2  # each process holds half of every layer's codes
    assert result["keys_equal"] and result["max_diff"] < 1e-6
    assert result["optimizer_entries"] > 0


def test_two_processes_through_the_cli_draw_the_same_ranks_and_hold_the_same_adapters(tmp_path):
    """`launcher.num_processes=2` re-launches the CLI under accelerate; at every checkpoint each
    process logs a fingerprint of its adapters and of the ranks it drew, and they must agree.
    The data is tokenized once: by the main process, while the other waits and then maps the same files."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-m", "qdylora_cli", "train", "+recipe=tiny", "launcher.num_processes=2",
           f"run_dir={run_dir}", "train.max_steps=3", "train.save_every=1", "train.eval_every=0",
           "train.batch_size=4", "train.log_every=1", f"data.cache_dir={cache}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    logs = " ".join((out.stdout + out.stderr).split())  # rich wraps long lines
    assert logs.count("data: tokenized builtin:tiny-instructions") == 1 and "data: reused" not in logs
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1 and not list(cache.glob(".tmp-*"))
    prints = re.findall(r"process (\d)/2 at step (\d+): adapters and ranks fingerprint (\w+)", logs)
    by_step: dict[str, dict[str, str]] = {}
    for process, step, value in prints:
        by_step.setdefault(step, {})[process] = value
    assert set(by_step) == {"1", "2", "3"}
    for step, values in by_step.items():
        assert set(values) == {"0", "1"} and values["0"] == values["1"], step
    assert len({v["0"] for v in by_step.values()}) == 3  # the adapters did change between steps
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()



def test_fingerprint_changes_with_any_adapter_bit_or_rank():
    import torch

    from qdylora_cli.distributed import fingerprint

    adapters = {"a.lora_A": torch.zeros(2, 3), "a.lora_B": torch.zeros(3, 2)}
    base = fingerprint(adapters, [1, 2])
    assert fingerprint({k: v.clone() for k, v in adapters.items()}, [1, 2]) == base
    assert fingerprint(adapters, [2, 1]) != base
    flipped = adapters | {"a.lora_B": torch.zeros(3, 2).index_fill_(0, torch.tensor([2]), 1e-30)}
    assert fingerprint(flipped, [1, 2]) != base


def test_fsdp2_bf16_checkpoints_keep_float32_adapters_and_every_row_s_step_count(tmp_path):
    """With bf16 mixed precision FSDP2 gathers parameters in bf16: checkpoints must hold the float32
    masters. And A's rows are split among the processes: after a save and a load, each row's Adam step
    count must be what it was on the process that holds the row (process 1's used to restart at 0)."""
    model_dir = save_sharded(tmp_path / "m", llama_config())
    script = tmp_path / "fsdp_mixed.py"
    script.write_text(textwrap.dedent(FSDP_MIXED_SCRIPT))
    out = torchrun(script, str(model_dir), str(tmp_path / "result.json"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for report in json.loads((tmp_path / "result.json").read_text()):
        assert report["dtypes"] == ["torch.float32"] and report["equal_to_masters"] and report["beyond_bf16"]
        # Steps at ranks 4, 2, 4, 1 in full mode: row 1 trained 4 times, row 2 three, rows 3-4 twice.
        assert report["counts"] == [4.0, 3.0, 2.0, 2.0], report["counts"]


def test_ddp_does_not_broadcast_buffers_at_each_forward(tmp_path):
    """DDP's default re-sends every buffer from process 0 before each forward: all NF4 codes (3.9 GB per
    step for a 7B model), which never change."""
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = torchrun(script, str(tmp_path / "result.json"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert json.loads((tmp_path / "result.json").read_text()) == {"broadcast_buffers": False, "broadcasts": 0}
