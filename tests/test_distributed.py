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
    process logs a fingerprint of its adapters and of the ranks it drew, and they must agree."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "qdylora_cli", "train", "+recipe=tiny", "launcher.num_processes=2",
           f"run_dir={run_dir}", "train.max_steps=3", "train.save_every=1", "train.eval_every=0",
           "train.batch_size=4", "train.log_every=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    logs = " ".join((out.stdout + out.stderr).split())  # rich wraps long lines
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
