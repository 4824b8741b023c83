"""End-to-end training: the tiny recipe through the console script, exact resume, a real pretrained model."""

import hashlib
import json
import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from qdylora_cli import train
from qdylora_cli.cli import compose_config
from qdylora_cli.errors import QdyloraError


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _val(run_dir, rank):
    return [m["val_loss"][str(rank)] for m in _metrics(run_dir) if "val_loss" in m]


def test_tiny_recipe_through_the_console_script(tmp_path):
    run_dir = tmp_path / "tiny"
    done = subprocess.run(["qdylora", "train", "+recipe=tiny", f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for path in ("config.yaml", "metrics.jsonl", "adapter/adapter.safetensors", "adapter/adapter_config.json",
                 "base_model/config.json", "checkpoints/step-300"):
        assert (run_dir / path).exists(), path
    meta = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert meta["r_max"] == 8 and meta["quant"]["type"] == "nf4" and len(meta["target_modules"]) == 28
    weights = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    assert weights[f"{meta['target_modules'][0]}.lora_A"].shape[0] == 8
    first, last = _val(run_dir, 8)[0], _val(run_dir, 8)[-1]
    assert last < first - 1.0, f"validation loss at rank 8 should fall clearly: {first} -> {last}"
    record = _metrics(run_dir)[-1]
    assert {"step", "loss", "ranks", "lr", "tokens_per_s", "elapsed"} <= record.keys()
    # The default draws 4 ranks per step, one from each quarter of the octave schedule's mass.
    assert all(len(m["ranks"]) == 4 and m["ranks"] == sorted(m["ranks"]) for m in _metrics(run_dir) if "ranks" in m)
    # A second train into the same run dir must refuse and leave the run alone.
    again = subprocess.run(["qdylora", "train", "+recipe=tiny", f"run_dir={run_dir}"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "train.resume=true" in again.stderr
    assert (run_dir / "adapter" / "adapter.safetensors").exists()


def _tiny(run_dir, *extra):
    return compose_config("train", ["+recipe=tiny", f"run_dir={run_dir}", "train.max_steps=6", "train.save_every=3",
                                    "train.eval_every=0", "train.batch_size=4", "train.log_every=1",
                                    "adapter.dropout=0.1", *extra])


def assert_resumed_like_straight(straight, resumed) -> None:
    """The resumed 6-step run ends with the straight run's adapter, bit for bit, and logged the same losses."""
    a = load_file(str(straight / "adapter" / "adapter.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    assert [m["step"] for m in _metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in _metrics(resumed)] == [m["loss"] for m in _metrics(straight)]


def test_resume_after_a_crash_ends_bit_identical(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train.run(_tiny(straight))
    train.run(_tiny(crashed))
    # Simulate a kill after step 3's checkpoint: later work is lost.
    shutil.rmtree(crashed / "adapter")
    shutil.rmtree(crashed / "checkpoints" / "step-6")
    train.run(_tiny(crashed, "train.resume=true"))
    assert_resumed_like_straight(straight, crashed)


def _as_saved_by_version_0_1(run_dir, step):
    """Rewrite a run as qdylora 0.1 saved it: a config without the keys added since, and the optimizer
    state of one parameter per rank slice (A's rows, then B's columns, then DoRA's magnitude per
    adapter), with no state for slices no step had trained."""
    config = (run_dir / "config.yaml").read_text()
    config = re.sub(r"\n  (scale|ranks_per_step): \w+", "", config).replace("name: adamw", "name: paged_adamw_32bit")
    (run_dir / "config.yaml").write_text(config)
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    new = torch.load(ckpt / "optimizer.pt", weights_only=True)
    old_state, index = {}, 0
    for i, dim in enumerate(new["param_groups"][0]["slice_dims"]):
        s = new["state"][i]
        if dim is None:  # DoRA's magnitude
            old_state[index] = {"step": s["slice_steps"].clone(), "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
            index += 1
            continue
        steps = s["slice_steps"].flatten()
        for j in range(len(steps)):
            if steps[j] > 0:
                old_state[index + j] = {"step": steps[j].clone(), **{
                    k: s[k].narrow(dim, j, 1).clone() for k in ("exp_avg", "exp_avg_sq")}}
        index += len(steps)
    group = {k: v for k, v in new["param_groups"][0].items() if k != "slice_dims"} | {"params": list(range(index))}
    torch.save({"state": old_state, "param_groups": [group]}, ckpt / "optimizer.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["optimizer.pt"] = hashlib.sha256((ckpt / "optimizer.pt").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_run_of_version_0_1_resumes_as_if_never_interrupted(tmp_path, variant):
    """0.1 runs (α/b, one rank per step, per-slice optimizer state) continue exactly where they stopped."""
    old = ("adapter.scale=alpha_over_rank", "rank_schedule.ranks_per_step=1", "adapter.mode=frozen",
           f"adapter.variant={variant}")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train.run(_tiny(straight, *old))
    train.run(_tiny(crashed, *old))
    shutil.rmtree(crashed / "adapter")
    shutil.rmtree(crashed / "checkpoints" / "step-6")
    _as_saved_by_version_0_1(crashed, 3)
    train.run(_tiny(crashed, "train.resume=true"))  # the saved config decides: no need to repeat it
    a = load_file(str(straight / "adapter" / "adapter.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter.safetensors"))
    for key in a:
        assert a[key].equal(b[key]), key
    assert [m["loss"] for m in _metrics(crashed)] == [m["loss"] for m in _metrics(straight)]


def test_resume_with_a_changed_adapter_is_refused(tmp_path):
    train.run(_tiny(tmp_path / "run"))
    with pytest.raises(QdyloraError, match="adapter"):
        train.run(_tiny(tmp_path / "run", "train.resume=true", "adapter.r_max=4"))


def test_stories260k_on_shakespeare_validation_loss_falls(tmp_path, stories260k, shakespeare):
    run_dir = tmp_path / "stories"
    cfg = compose_config("train", [
        "model=hf", f"model.name_or_path={stories260k}", "model.dtype=float32",
        "data=text", f"data.path={shakespeare}", "data.block_size=128", "data.val_fraction=0.01",
        f"run_dir={run_dir}", "optimizer=adamw", "optimizer.lr=3e-3", "adapter.r_max=8", "adapter.dropout=0.0",
        "train.max_steps=40", "train.batch_size=8", "train.grad_accum=1", "train.eval_every=20",
        "train.eval_batches=4", "train.save_every=0", "train.mixed_precision=no",
        "train.gradient_checkpointing=false",
    ])
    train.run(cfg)
    curve = _val(run_dir, 8)
    assert curve[-1] < curve[0] - 0.2, curve


# --- what one optimizer step computes -------------------------------------------------------------


def test_every_loss_token_of_a_step_weighs_the_same_across_micro_batches(tmp_path):
    """grad_accum=2 with micro-batches of different lengths: the gradient is that of the per-token mean
    over both, as one batch of all their rows gives; a mean of the two micro-batch means is not."""
    from contextlib import ExitStack

    from qdylora_cli.adapters import set_rank
    from qdylora_cli.data import collate
    from qdylora_cli.loss import token_losses

    cfg = _tiny(tmp_path / "run", "train.grad_accum=2", "train.batch_size=2", "adapter.dropout=0",
                "rank_schedule=fixed", "rank_schedule.ranks_per_step=1", "train.mixed_precision=no")
    with ExitStack() as cleanup:
        s = train.setup(cfg, cleanup)
        for adapter in s.model.modules():  # B = 0 would give A no gradient
            if hasattr(adapter, "lora_B"):
                torch.nn.init.normal_(adapter.lora_B, std=0.02)
        position = s.batches.state_dict()
        train.forward_backward(s, [8])
        grads = {n: p.grad.clone() for n, p in s.model.named_parameters() if p.requires_grad}
        s.model.zero_grad(set_to_none=True)

        s.batches.load_state_dict(position)
        rows = [s.batches.examples[i] for batch in s.batches._order[:2] for [i] in batch]
        micro = [collate(rows[:2], 0), collate(rows[2:], 0)]
        tokens = [(m["labels"][:, 1:] != -100).sum().item() for m in micro]
        assert tokens[0] != tokens[1], "the test needs micro-batches of different sizes"
        whole = collate(rows, s.batches.pad_id)
        set_rank(s.model, 8)
        logits = s.model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
        (token_losses(logits, whole["labels"]).sum() / sum(tokens)).backward()
        for name, p in s.model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)  # float32 sums in another order


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_a_distillation_step_is_the_gradient_of_its_loss_written_out(tmp_path, nested):
    """rank_schedule.distill = λ, one step at ranks 2 and 8: the rows at rank 2 learn (1 - λ)·CE + λ·KL(q ‖ p),
    q the softmax of rank 8 on the same rows (the plain rank 8 also when training mixes nested ranks; a
    constant), the rows at rank 8 CE alone, over the step's loss tokens. Loss, gradient and teacher tokens."""
    from contextlib import ExitStack

    import torch.nn.functional as F

    from qdylora_cli.adapters import ranks_of_rows, set_rank
    from qdylora_cli.loss import loss_tokens

    lam = 0.3
    cfg = _tiny(tmp_path / "run", f"rank_schedule.distill={lam}", "rank_schedule.ranks_per_step=2", "train.batch_size=4",
                "train.grad_accum=1", "adapter.dropout=0", "train.mixed_precision=no",
                *(["rank_schedule.nested_ranks=powers"] if nested else []))
    with ExitStack() as cleanup:
        s = train.setup(cfg, cleanup)
        for adapter in s.model.modules():  # B = 0 would make every rank the base model: nothing to distil
            if hasattr(adapter, "lora_B"):
                torch.nn.init.normal_(adapter.lora_B, std=0.05)
        position = s.batches.state_dict()
        loss, _, trained, teacher_tokens = train.forward_backward(s, [2, 8])
        grads = {n: p.grad.clone() for n, p in s.model.named_parameters() if p.requires_grad}
        s.model.zero_grad(set_to_none=True)

        s.batches.load_state_dict(position)
        batch = next(s.batches)
        labels = batch.pop("labels")
        low = ranks_of_rows((2, 8), len(labels)) == 2
        assert low.any() and (~low).any()
        model = s.model
        model.eval()  # evaluation computes plain ranks, mixtures or not: the teacher by definition
        set_rank(model, 8)
        with torch.no_grad():
            q_log = F.log_softmax(model(**{k: v[low] for k, v in batch.items()}).logits.double(), dim=-1)
        model.train()
        logits = {}
        for rank, rows in ((2, low), (8, ~low)):
            set_rank(model, rank)
            logits[rank] = model(**{k: v[rows] for k, v in batch.items()}).logits.double()
        total = loss_tokens(labels).sum()

        def per_position(rank, rows):
            """(CE, KL to the teacher) at every position of `rows` whose next label carries a loss, float64."""
            target = labels[rows][:, 1:]
            keep = target != -100
            p_log = F.log_softmax(logits[rank][:, :-1], dim=-1)
            ce = -p_log.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
            kl = (q_log[:, :-1].exp() * (q_log[:, :-1] - p_log)).sum(-1) if rank == 2 else torch.zeros_like(ce)
            return ce[keep], kl[keep]

        ce_low, kl_low = per_position(2, low)
        ce_high, _ = per_position(8, ~low)
        by_hand = (((1 - lam) * ce_low + lam * kl_low).sum() + ce_high.sum()) / total
        by_hand.backward()
    assert loss == pytest.approx(by_hand.item(), rel=1e-5)
    assert kl_low.min() >= 0 and kl_low.sum() > 1e-3, "the student must differ from its teacher"
    assert trained == [2, 8] and teacher_tokens == int(batch["attention_mask"][low].sum())
    for name, p in s.model.named_parameters():
        if p.requires_grad:
            # float32 step against a float64 loss of the same logits: the roundings of gradients of size ~1
            torch.testing.assert_close(grads[name], p.grad.float(), rtol=1e-4, atol=1e-5, msg=name)


def test_a_rank_whose_rows_carry_no_loss_trains_nothing(tmp_path, monkeypatch):
    """Step 2's rank-8 rows have no loss tokens (all masked, as a chunk of a short batch without rows):
    slices 3..8 got no gradient and must not move with Adam's momentum from step 1."""
    monkeypatch.setattr(train.RankSampler, "sample", lambda self, k=1: [2, 8])
    real_next = train.BatchStream.__next__
    calls = [0]

    def masked(self):
        batch = real_next(self)
        calls[0] += 1
        if calls[0] == 2:
            batch["labels"][1:] = -100  # the second row: the rank-8 chunk
        return batch

    monkeypatch.setattr(train.BatchStream, "__next__", masked)
    run_dir = tmp_path / "run"
    train.run(_tiny(run_dir, "train.max_steps=2", "train.save_every=1", "train.batch_size=2",
                    "rank_schedule.ranks_per_step=2", "adapter.dropout=0"))
    after_1 = load_file(str(run_dir / "checkpoints" / "step-1" / "adapter.safetensors"))
    after_2 = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    moved = [k for k in after_1 if k.endswith("lora_B") and not after_1[k][:, 2:].equal(after_2[k][:, 2:])]
    assert not moved, moved[:3]
    assert any(not after_1[k][:, :2].equal(after_2[k][:, :2]) for k in after_1 if k.endswith("lora_B"))
    records = _metrics(run_dir)
    assert records[1]["ranks"] == [2, 8] and "skipped" not in records[1]


def test_micro_batches_but_the_last_run_backward_without_gradient_sync(tmp_path, monkeypatch):
    """FSDP2 reduces gradients during backward unless `no_sync` is still in force then (DDP decides at
    forward): every backward but the step's last must run inside it."""
    from contextlib import ExitStack, contextmanager

    with ExitStack() as cleanup:
        s = train.setup(_tiny(tmp_path / "run", "train.grad_accum=3", "train.batch_size=1",
                              "rank_schedule.ranks_per_step=1"), cleanup)
        syncing, seen = [True], []

        @contextmanager
        def no_sync(model):
            syncing[0] = False
            yield
            syncing[0] = True

        real_backward = s.accelerator.backward
        monkeypatch.setattr(s.accelerator, "no_sync", no_sync)
        monkeypatch.setattr(s.accelerator, "backward", lambda loss, **kw: (seen.append(syncing[0]), real_backward(loss, **kw)))
        train.forward_backward(s, [8])
    assert seen == [False, False, True]
