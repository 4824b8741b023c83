"""The training loop: one sampled rank per optimizer step, shared by all of its micro-batches.

Read top to bottom: run directory, model and data, optimizer and schedule, the loop, checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from accelerate.state import AcceleratorState
from omegaconf import OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from qdylora_cli.adapters import build_rank_sampler, count_parameters, load_adapter_state_dict, set_rank
from qdylora_cli.checkpoint import (
    atomic_write_text,
    check_writable,
    checkpoint_dirs,
    latest_good_checkpoint,
    save_adapter,
    save_checkpoint,
)
from qdylora_cli.config import load_run_config, save_config
from qdylora_cli.data import (
    IGNORE_INDEX,
    batch_order,
    check_packing,
    collate,
    collate_packed,
    load_datasets,
    packed_batch_order,
    padding_fraction,
)
from qdylora_cli.distributed import (
    check_replicas,
    gathered_adapter_state,
    load_optimizer_state,
    make_nf4_shardable,
    optimizer_state,
)
from qdylora_cli.errors import QdyloraError
from qdylora_cli.evaluate import rank_losses
from qdylora_cli.model import (
    BASE_MODEL_DIR,
    build_training_model,
    enable_gradient_checkpointing,
    load_tokenizer,
)
from qdylora_cli.quant import import_bitsandbytes

log = logging.getLogger(__name__)

# Sections of the config that define the model being trained: resuming with any of them changed
# would silently mix two different runs.
_RUN_IDENTITY = ("model", "data", "quant", "adapter", "rank_schedule")


# --- run directory ---------------------------------------------------------------------------------


def prepare_run_dir(cfg: Any, run_dir: Path) -> Path | None:
    """Refuse to clobber an existing run; return the checkpoint to resume from, if any. Writes nothing."""
    check_writable(run_dir, "run_dir")
    is_run = (run_dir / "config.yaml").exists()
    if cfg.train.resume:
        if not is_run:
            log.info("train.resume=true but %s holds no run yet: starting fresh", run_dir)
            return None
        if not checkpoint_dirs(run_dir):  # stopped before its first checkpoint: nothing to lose
            _check_same_run(cfg, run_dir)
            log.info("train.resume=true but %s has no checkpoint yet: starting from step 0", run_dir)
            return None
        _check_same_run(cfg, run_dir)
        ckpt = latest_good_checkpoint(run_dir)
        if ckpt is None:
            raise QdyloraError(f"train.resume=true but {run_dir / 'checkpoints'} holds no usable checkpoint")
        return ckpt
    if is_run and not cfg.overwrite:
        raise QdyloraError(
            f"{run_dir} already holds a run; pass train.resume=true to continue it or overwrite=true to replace it"
        )
    return None


def _check_same_run(cfg: Any, run_dir: Path) -> None:
    old = OmegaConf.structured(load_run_config(run_dir))  # one error line if it is unreadable
    new = OmegaConf.structured(cfg)
    for section in _RUN_IDENTITY:
        if OmegaConf.to_container(old[section]) != OmegaConf.to_container(new[section]):
            raise QdyloraError(
                f"train.resume=true but `{section}` differs from the run in {run_dir}; "
                "resume with the same settings or train into a new run_dir"
            )


def clear_old_run(run_dir: Path, *, keep_base: bool) -> None:
    """overwrite=true: drop the previous run's files, once the new run's inputs have all loaded.

    `keep_base`: the new run has just written its own base_model/ (a model built from a config).
    """
    for name in ("checkpoints", "adapter", "eval", "export", *(() if keep_base else ("base_model",))):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "config.yaml"):
        (run_dir / name).unlink(missing_ok=True)


# --- optimizer and schedule ----------------------------------------------------------------------


def build_optimizer(opt_cfg: Any, params: list[torch.nn.Parameter], on_cuda: bool) -> torch.optim.Optimizer:
    """QLoRA's paged AdamW on CUDA; paging needs CUDA, so on CPU the same AdamW runs unpaged."""
    kwargs = dict(lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
    name = opt_cfg.name
    if name == "adamw" or (name == "paged_adamw_32bit" and not on_cuda):
        if name != "adamw":
            log.info("optimizer.name=%s: paged optimizers need CUDA; using torch AdamW (same update, unpaged)", name)
        return torch.optim.AdamW(params, **kwargs)
    bnb = import_bitsandbytes()
    if bnb is None:
        raise QdyloraError(f"optimizer.name={name} needs bitsandbytes: pip install bitsandbytes, or use optimizer.name=adamw")
    if name == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, **kwargs)
    if name == "paged_adamw_8bit" and on_cuda:
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    if name == "paged_adamw_8bit":
        log.info("optimizer.name=paged_adamw_8bit: paged optimizers need CUDA; using unpaged 8-bit AdamW")
    return bnb.optim.AdamW8bit(params, **kwargs)


def lr_lambda(kind: str, max_steps: int, warmup_steps: int):
    """LR multiplier for step s: linear warmup, then constant, cosine or linear decay to zero."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (s - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)

    return factor


# --- data position -----------------------------------------------------------------------------


class BatchStream:
    """An endless, resumable stream of batches: epoch `e` uses the order drawn from seed + e.

    With several processes, process p takes batches p, p + W, p + 2W, ... of each epoch. With
    `pack_length` (data.packing), a batch is `batch_size` rows of up to that many tokens, each row
    holding several examples (`collate_packed`); the rows are packed afresh each epoch, from the
    same (seed, epoch), so the resume point "epoch e, batch i" stays exact.
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int, group_by_length: bool,
                 pad_id: int, process: int = 0, world: int = 1, pack_length: int | None = None):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.group_by_length, self.pad_id, self.process, self.world = group_by_length, pad_id, process, world
        self.pack_length = pack_length
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.epoch, self.index = 0, 0
        self.last_tokens = 0  # tokens of the last batch, padding excluded (for tokens/s)
        self._order = self.epoch_batches(0)
        if len(self._order) < world:
            raise QdyloraError(f"the training set has {len(examples)} examples: too few for {world} processes")

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        """The batches of `epoch`, each a list of rows of example indices (one example per row unpacked)."""
        if self.pack_length is not None:
            return packed_batch_order(self.lengths, self.batch_size, self.seed, epoch, self.pack_length)
        order = batch_order(len(self.examples), self.batch_size, self.seed, epoch, self.group_by_length, self.lengths)
        return [[[i] for i in batch] for batch in order]

    def batches_per_process(self, epoch: int) -> int:
        """Micro-batches each process takes from `epoch` (packed epochs may differ by a row or so)."""
        return len(self.epoch_batches(epoch)) // self.world

    def __next__(self) -> dict[str, torch.Tensor]:
        usable = len(self._order) - len(self._order) % self.world
        if self.index >= usable:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self.epoch_batches(self.epoch)
        rows = [[self.examples[i] for i in row] for row in self._order[self.index + self.process]]
        self.index += self.world
        self.last_tokens = sum(len(e["input_ids"]) for row in rows for e in row)
        if self.pack_length is not None:
            return collate_packed(rows, self.pad_id)
        return collate([row[0] for row in rows], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self.epoch_batches(self.epoch)


def plan_steps(t: Any, batches: BatchStream) -> int:
    """Optimizer steps of the run: train.max_steps, or enough for train.num_epochs passes over the data.

    Logs the size of one epoch first. With num_epochs, the last step may take its last micro-batches
    from the following epoch: every example of the requested epochs is seen.
    """
    examples, grad_accum = batches.examples, t.grad_accum
    first = batches.epoch_batches(0)
    per_process = len(first) // batches.world
    loss_tokens = sum(len(e["labels"]) - 1 - e["labels"][1:].count(IGNORE_INDEX) for e in examples)
    unit = f"rows of up to {batches.pack_length} tokens (packed)" if batches.pack_length else "examples"
    log.info("one epoch: %s examples, %s tokens (%s with loss); %d batches of %d %s, %.1f%% padding; "
             "%.1f optimizer steps (train.grad_accum=%d%s)", f"{len(examples):,}", f"{sum(batches.lengths):,}",
             f"{loss_tokens:,}", len(first), batches.batch_size, unit, 100 * padding_fraction(first, batches.lengths),
             per_process / grad_accum, grad_accum, f", {batches.world} processes" if batches.world > 1 else "")
    if t.num_epochs is None:
        log.info("train.max_steps=%d: %.2f epochs", t.max_steps, t.max_steps * grad_accum / per_process)
        return t.max_steps
    micro = per_process + sum(batches.batches_per_process(e) for e in range(1, t.num_epochs))
    steps = math.ceil(micro / grad_accum)
    log.info("train.num_epochs=%d: %d optimizer steps", t.num_epochs, steps)
    return steps


# --- RNG state -------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- stopping on a signal --------------------------------------------------------------------------


class StopOnSignal:
    """First SIGINT/SIGTERM: finish the optimizer step, save a checkpoint, exit. Second: exit at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum
        log.warning("%s received: saving a checkpoint after this step (send again to quit now)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- the loop --------------------------------------------------------------------------------------


def _fsdp2(accelerator: Accelerator) -> bool:
    """Whether accelerate was launched with FSDP; only FSDP2 can shard NF4 codes (see distributed.py)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise QdyloraError("FSDP version 1 cannot shard NF4 weights; set fsdp_config.fsdp_version: 2 "
                           "(see conf/accelerate/fsdp.yaml)")
    return True


def _make_accelerator(cfg: Any) -> Accelerator:
    on_cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not on_cuda:
        raise QdyloraError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    # Adapter slices the sampled rank does not reach get no gradient: DDP must expect unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # accelerate keeps its settings process-wide: a second run in one process (tests, notebooks) with
    # another mixed_precision would be refused. The process/device state (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(cpu=not on_cuda, mixed_precision=cfg.train.mixed_precision, kwargs_handlers=[ddp])


def run(cfg: Any) -> Path:
    """Train as `cfg` says; return the directory of the final adapter."""
    t = cfg.train
    run_dir = Path(cfg.run_dir)
    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    resume_from = prepare_run_dir(cfg, run_dir) if main else None
    resume_from = _broadcast_path(accelerator, resume_from)
    replacing = main and not t.resume and (run_dir / "config.yaml").exists()  # overwrite=true (else refused)

    # Bad input must cost nothing: the tokenizer and the data are read before anything is written or deleted.
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               trust_remote_code=cfg.model.trust_remote_code)
    train_set, val_set = load_datasets(cfg.data, tokenizer, seed=t.seed)
    batches = BatchStream(train_set, t.batch_size, t.seed, cfg.data.group_by_length, tokenizer.pad_token_id,
                          accelerator.process_index, accelerator.num_processes,
                          pack_length=cfg.data.max_length if cfg.data.packing else None)
    t = dataclasses.replace(t, max_steps=plan_steps(t, batches))  # num_epochs -> a number of steps

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QdyloraError(f"run_dir={str(run_dir)!r}: cannot create it ({e.strerror})") from None

    seed_everything(t.seed)
    fsdp = _fsdp2(accelerator)
    # Under FSDP the model is loaded to the CPU and each GPU receives only its shards at `prepare`.
    load_device = torch.device("cpu") if fsdp else accelerator.device
    with accelerator.main_process_first():  # the main process writes run_dir/base_model, the others reuse it
        model, tokenizer, meta = build_training_model(
            cfg, run_dir, device=load_device, quantize_device=accelerator.device, tokenizer=tokenizer,
            save_base=main and not (resume_from is not None and (run_dir / BASE_MODEL_DIR).is_dir()))
    if replacing:
        clear_old_run(run_dir, keep_base=cfg.model.config is not None)
    if resume_from is not None:  # before FSDP splits the adapters into shards
        load_adapter_state_dict(model, load_file(str(resume_from / "adapter.safetensors")))
    if fsdp:
        make_nf4_shardable(model)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    log.info("%s: %d adapted layers; trainable %s of %s parameters (%.3f%%)", meta["base_model"],
             len(meta["target_modules"]), f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optimizer, params, accelerator.device.type == "cuda")
    warmup = math.ceil(cfg.optimizer.warmup_ratio * t.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optimizer.scheduler, t.max_steps, warmup))
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaced them by sharded ones
    sampler = build_rank_sampler(cfg.rank_schedule.kind, r_max=cfg.adapter.r_max,
                                 min_rank=cfg.rank_schedule.min_rank, rank=cfg.rank_schedule.rank, seed=t.seed)
    if cfg.data.packing:
        check_packing(accelerator.unwrap_model(model), train_set, accelerator.device)
    val_batches = [collate(val_set[i:i + t.batch_size], tokenizer.pad_token_id)
                   for i in range(0, len(val_set), t.batch_size)][: t.eval_batches]
    eval_ranks = sorted(set(t.eval_ranks or [1, max(1, cfg.adapter.r_max // 4), cfg.adapter.r_max]))

    step, bad_steps, skipped_total = 0, 0, 0
    if resume_from is not None:
        step, bad_steps, skipped_total = _load_checkpoint(resume_from, accelerator, model, optimizer, scheduler,
                                                          sampler, batches)
        log.info("resuming from %s (step %d)", resume_from, step)
    if main:
        save_config(cfg, run_dir / "config.yaml")
        _truncate_metrics(run_dir / "metrics.jsonl", step)

    ranks: list[int] = []  # drawn since this process started: part of the replica check

    def checkpoint(at: int) -> Path:
        adapters = gathered_adapter_state(accelerator.unwrap_model(model))  # every process: collective under FSDP
        optimizer_state_dict = optimizer_state(accelerator.unwrap_model(model), optimizer)
        check_replicas(accelerator, adapters, ranks, at)
        state = {"step": at, "bad_steps": bad_steps, "skipped_total": skipped_total, "data": batches.state_dict(),
                 "sampler": sampler.state_dict(), "rng": rng_state(), "scheduler": scheduler.state_dict(),
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}

        def write(tmp: Path) -> None:
            save_file(adapters, str(tmp / "adapter.safetensors"))
            torch.save(optimizer_state_dict, tmp / "optimizer.pt")
            torch.save(state, tmp / "state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": at, **batches.state_dict()}))

        accelerator.wait_for_everyone()
        path = save_checkpoint(run_dir, at, write, t.keep_last) if main else run_dir
        accelerator.wait_for_everyone()
        return path

    start = time.perf_counter()
    if step == 0 and t.eval_every > 0 and val_batches:  # every process: FSDP's forward is collective
        # The starting point of the curve: the base model alone and the untrained adapters (B = 0) agree.
        losses = rank_losses(accelerator.unwrap_model(model), val_batches, [0], device=accelerator.device)
        if main:
            _append_metrics(run_dir, {"step": 0, "elapsed": 0.0, "val_loss": {str(r): round(losses[0], 6) for r in eval_ranks}})
    model.train()
    progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), disable=not main, transient=False)
    with StopOnSignal() as stop, progress:
        task = progress.add_task("train", total=t.max_steps, completed=step, info="")
        while step < t.max_steps:
            step_start = time.perf_counter()
            rank = sampler.sample()
            ranks.append(rank)
            set_rank(model, rank)
            loss_sum, tokens = torch.zeros((), device=accelerator.device), 0
            for micro in range(t.grad_accum):
                batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
                sync = micro == t.grad_accum - 1
                with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                    # No KV cache: with one, transformers would not read packed rows' position restarts.
                    loss = model(**batch, use_cache=False).loss / t.grad_accum
                accelerator.backward(loss)
                loss_sum += loss.detach()
                tokens += batches.last_tokens
            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
            loss_value = accelerator.reduce(loss_sum, reduction="mean").item()
            scaler_handles_it = accelerator.scaler is not None and math.isfinite(loss_value)
            skipped = not (math.isfinite(loss_value) and (math.isfinite(float(grad_norm)) or scaler_handles_it))
            if not skipped:
                optimizer.step()
                bad_steps = 0
            else:
                skipped_total += 1
                bad_steps += 1
                log.warning("step %d: non-finite loss or gradient (loss=%s); update skipped (%d in a row)",
                            step + 1, loss_value, bad_steps)
                if bad_steps >= t.max_bad_steps:
                    raise QdyloraError(
                        f"{bad_steps} non-finite steps in a row (train.max_bad_steps={t.max_bad_steps}) at step "
                        f"{step + 1}; lower optimizer.lr or check the data. Last good checkpoint: "
                        f"{latest_good_checkpoint(run_dir) or 'none'}")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1

            record = {"step": step, "loss": loss_value, "rank": rank, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": round(tokens * accelerator.num_processes / (time.perf_counter() - step_start), 1),
                      "elapsed": round(time.perf_counter() - start, 3)}
            if skipped:  # non-finite loss or gradient: no update (counted; see train.max_bad_steps)
                record.update(skipped=True, bad_steps=bad_steps, skipped_total=skipped_total)
            if t.eval_every > 0 and (step % t.eval_every == 0 or step == t.max_steps) and val_batches:
                losses = rank_losses(accelerator.unwrap_model(model), val_batches, eval_ranks, device=accelerator.device)
                record["val_loss"] = {str(r): round(v, 6) for r, v in losses.items()}
                set_rank(model, rank)
            if main and (step % t.log_every == 0 or "val_loss" in record or skipped or step == t.max_steps):
                _append_metrics(run_dir, record)
            progress.update(task, completed=step, info=f"loss {loss_value:.4f}  rank {rank:>3}  "
                                                       f"{record['tokens_per_s']:,.0f} tok/s")
            if stop.signum is not None or (t.save_every > 0 and step % t.save_every == 0 and step < t.max_steps):
                path = checkpoint(step)
                if stop.signum is not None:
                    if main:
                        progress.stop()
                        print(f"interrupted at step {step}; checkpoint saved to {path}; "
                              f"continue with train.resume=true")
                    raise SystemExit(128 + stop.signum)

    final = run_dir / "adapter"
    with StopOnSignal():  # a first signal now only waits for the final save: the run is complete
        checkpoint(step)
        adapters = gathered_adapter_state(accelerator.unwrap_model(model))
        if main:
            save_adapter(final, adapters, meta)
            print(f"done: {step} steps in {time.perf_counter() - start:.1f}s; adapter for ranks "
                  f"1..{cfg.adapter.r_max} in {final}")
    accelerator.wait_for_everyone()
    return final


def _broadcast_path(accelerator: Accelerator, path: Path | None) -> Path | None:
    """Every process must resume from the checkpoint the main process chose."""
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    box = [str(path) if path is not None else None]
    broadcast_object_list(box)
    return Path(box[0]) if box[0] is not None else None


def _load_checkpoint(path: Path, accelerator: Accelerator, model, optimizer, scheduler, sampler,
                     batches) -> tuple[int, int, int]:
    """Everything but the adapter weights, which `run` loads before the model is prepared."""
    optimizer_state_dict = torch.load(path / "optimizer.pt", map_location=accelerator.device, weights_only=True)
    load_optimizer_state(accelerator.unwrap_model(model), optimizer, optimizer_state_dict)
    state = torch.load(path / "state.pt", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    batches.load_state_dict(state["data"])
    if state["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state["step"], state["bad_steps"], state.get("skipped_total", 0)


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the half line of a process killed mid-write
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
