"""Training: each optimizer step draws its ranks and shares them among its micro-batches.

Read top to bottom: the parts of a step (optimizer, learning-rate schedule, the non-finite guard,
signals), `setup` (everything before the first step, nothing written until every input has
loaded), the loop (`run`, `train_loop`), checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from safetensors.torch import load_file, save_file

from qdylora_cli.adapters import (
    NestedRanks,
    RankAwareAdamW,
    RankSampler,
    adapter_parameters,
    assign_ranks,
    build_rank_sampler,
    count_parameters,
    iter_adapters,
    load_adapter_state_dict,
    plain_ranks,
    ranks_of_rows,
    resolve_paged,
    set_nested,
    set_rank,
    trained_slices,
)
from qdylora_cli.compile import compile_decoder_layers, resolve_compile
from qdylora_cli.config import OptimizerConfig, TrainConfig, is_chat
from qdylora_cli.data import (
    BatchStream,
    check_packing,
    collate,
    max_sequence_length,
    open_datasets,
    plan_steps,
    prepare_datasets,
)
from qdylora_cli.distributed import (
    check_replicas,
    gathered_adapter_state,
    load_optimizer_state,
    make_nf4_shardable,
    optimizer_state,
)
from qdylora_cli.errors import Interrupted, QdyloraError, ResourceError, first_line, is_out_of_memory
from qdylora_cli.loss import distill_losses, loss_tokens, token_losses
from qdylora_cli.model import (
    build_training_model,
    check_tokenizer_fits,
    context_length,
    enable_gradient_checkpointing,
    load_tokenizer,
    save_base_model,
)
from qdylora_cli.multirank import rank_losses
from qdylora_cli.progress import Reporter, trackers
from qdylora_cli.rundir import (
    ADAPTER,
    ADAPTER_WEIGHTS,
    BASE_MODEL,
    CONFIG,
    LOGS,
    TRAINER_STATE,
    RunLock,
    clear_old_run,
    latest_good_checkpoint,
    prepare_run_dir,
    record_last_run,
    save_adapter,
    save_checkpoint,
    save_config,
)
from qdylora_cli.threads import set_cpu_threads

log = logging.getLogger(__name__)


# --- optimizer and schedule ----------------------------------------------------------------------


def build_optimizer(opt_cfg: OptimizerConfig, model: torch.nn.Module, paged: bool = False) -> RankAwareAdamW:
    """AdamW over every adapter's factors that steps only the rank slices each step trained; its moments
    in `optimizer.state_bits`, in unified memory if `paged` (`resolve_paged` decides it from `optimizer.paged`)."""
    adapters = [a for _, a in iter_adapters(model)]
    return RankAwareAdamW(adapter_parameters(adapters), lr=opt_cfg.lr, betas=tuple(opt_cfg.betas),
                          eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, state_bits=opt_cfg.state_bits,
                          paged=paged, slice_lr=opt_cfg.slice_lr)


def lr_lambda(kind: str, max_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier for step s: linear warmup, then constant, cosine or linear decay to zero.

    transformers' schedulers start the warmup at 0, so their first step changes nothing; here the
    first step already has 1/(warmup+1) of the rate.
    """

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (s - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)

    return factor


# --- faults and signals ----------------------------------------------------------------------------


@dataclass
class NonFiniteGuard:
    """Skips an update whose loss or gradient is not finite, and stops the run after `limit` in a row."""

    limit: int
    in_a_row: int = 0
    total: int = 0

    def skip(self, step: int, loss: float, grad_norm: float, scaler: bool, run_dir: Path) -> bool:
        # With fp16 loss scaling an infinite gradient is the scaler's business: it skips and lowers its scale.
        if math.isfinite(loss) and (math.isfinite(grad_norm) or scaler):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        log.warning("step %d: non-finite loss or gradient (loss=%s); update skipped (%d in a row)",
                    step, loss, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise QdyloraError(
                f"{self.in_a_row} non-finite steps in a row (train.max_bad_steps={self.limit}) at step {step}; "
                f"lower optimizer.lr or check the data. Last good checkpoint: {latest_good_checkpoint(run_dir) or 'none'}")
        return True


class StopOnSignal:
    """First SIGINT/SIGTERM: finish the optimizer step, save a checkpoint, stop. Second: exit at once."""

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

    def agreed(self, accelerator: Accelerator) -> int | None:
        """The signal any process received, on every process: they must all stop after the same step,
        or the one saving a checkpoint and the others starting the next step wait for each other."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


# --- RNG state -------------------------------------------------------------------------------------


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


def rng_states(accelerator: Accelerator) -> list[dict[str, Any]]:
    """Every process's RNG state (each process draws its own dropout masks), in process order."""
    if accelerator.num_processes == 1:
        return [rng_state()]
    states: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- setup -----------------------------------------------------------------------------------------


@dataclass
class Session:
    """Everything the loop needs: built by `setup`, advanced by `train_loop`, saved by `save_training_checkpoint`."""

    cfg: TrainConfig
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP/FSDP wrapped)
    optimizer: Any  # accelerate's wrapper around `adamw`
    adamw: RankAwareAdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: RankSampler
    batches: BatchStream
    val_batches: list[dict[str, torch.Tensor]]
    eval_ranks: list[int]
    meta: dict[str, Any]
    reporter: Reporter
    guard: NonFiniteGuard
    max_steps: int  # train.max_steps, or the steps of train.num_epochs
    step: int = 0
    tokens: int = 0
    teacher_tokens: int = 0  # rank_schedule.distill: tokens of the teacher's extra forwards (all processes)
    drawn: list[int] = field(default_factory=list)  # ranks drawn by this process: part of the replica check

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def with_device_defaults(cfg: TrainConfig, on_cuda: bool, bf16: bool | None = None) -> TrainConfig:
    """`auto` compute settings made concrete: bf16 (fp16 without bf16) and checkpointing on a GPU; on a
    CPU float32 without checkpointing, which measured 10x faster there (docs/performance.md). `bf16`:
    whether the GPU has it (default: ask this machine's)."""
    m, t = cfg.model, cfg.train
    if bf16 is None:
        bf16 = not on_cuda or torch.cuda.is_bf16_supported()
    half = "bfloat16" if bf16 else "float16"
    dtype = m.dtype if m.dtype != "auto" else half if on_cuda else "float32"
    mixed = t.mixed_precision if t.mixed_precision != "auto" else {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no")
    checkpointing = t.gradient_checkpointing if t.gradient_checkpointing is not None else on_cuda
    if (m.dtype, t.mixed_precision, t.gradient_checkpointing) != (dtype, mixed, checkpointing):
        log.info("%s: model.dtype=%s, train.mixed_precision=%s, train.gradient_checkpointing=%s (the auto settings)",
                 "GPU" if on_cuda else "no GPU", dtype, mixed, str(checkpointing).lower())
    if dtype == "float16" and mixed != "fp16":
        raise QdyloraError(f"train.mixed_precision={mixed!r} with model.dtype=float16: float16 gradients underflow "
                           "without loss scaling; use train.mixed_precision=fp16 (or auto), or model.dtype=bfloat16")
    return replace(cfg, model=replace(m, dtype=dtype),
                   train=replace(t, mixed_precision=mixed, gradient_checkpointing=checkpointing))


def within_context(cfg: TrainConfig) -> TrainConfig:
    """Refuse sequences longer than the model's positions. A chat cap (data.max_length without packing) only
    cuts long conversations, so one above the context is lowered to it instead: chat's default of 2048
    tokens then works unchanged with a model of shorter context."""
    length, keys = max_sequence_length(cfg.data)
    if not (limit := context_length(cfg.model)) or length <= limit:
        return cfg
    if is_chat(cfg.data) and not cfg.data.packing:
        log.warning("data.max_length = %d is longer than the model's context: conversations are cut at %d tokens",
                    length, limit)
        return replace(cfg, data=replace(cfg.data, max_length=limit))
    raise QdyloraError(f"{keys} = {length} is longer than the model's context ({limit} positions, its "
                       f"max_position_embeddings); use at most {limit}")


def _make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    on_cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not on_cuda:
        raise QdyloraError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    # accelerate keeps its settings process-wide: a second run in one process (tests, notebooks) with
    # another mixed_precision would be refused. The process/device state (PartialState) is kept.
    AcceleratorState._reset_state()
    # DDP would broadcast every buffer from process 0 before each forward: all the NF4 codes, which never change.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=not on_cuda, mixed_precision=cfg.train.mixed_precision, kwargs_handlers=[ddp],
                       log_with=trackers(cfg.train.report_to) or None,
                       project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOGS)))


def _fsdp2(accelerator: Accelerator) -> bool:
    """Whether accelerate was launched with FSDP; only FSDP2 can shard NF4 codes (see distributed.py)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise QdyloraError("FSDP version 1 cannot shard NF4 weights; set fsdp_config.fsdp_version: 2 "
                           "(see conf/accelerate/fsdp.yaml)")
    return True


def _from_main(accelerator: Accelerator, value: Any) -> Any:
    """The main process's `value`, on every process."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box)
    return box[0]


def _on_main(accelerator: Accelerator, work: Callable[[], Any]) -> Any:
    """`work()` on the main process, its result on every process; if it fails, every process stops
    with its error (the others would otherwise wait for the main process forever)."""
    result = error = failure = None
    if accelerator.is_main_process:
        try:
            result = work()
        except QdyloraError as e:
            error = e  # the exception itself (it pickles): a full disk keeps its type and exit code
        except Exception as e:  # a bug, not the user's input: the others stop with its first line
            if accelerator.num_processes == 1:
                raise
            failure, error = e, QdyloraError(f"the main process failed: {type(e).__name__}: {first_line(e)}")
    result, error = _from_main(accelerator, (result, error))
    if failure is not None:
        raise failure  # the main process keeps its traceback
    if error is not None:
        raise error
    return result


def _lock(accelerator: Accelerator, run_dir: Path, cleanup: ExitStack) -> None:
    """The main process takes the run's lock; if it cannot, every process stops with its error."""
    def take() -> None:
        cleanup.callback(RunLock.acquire(run_dir).release)

    _on_main(accelerator, take)


def setup(cfg: TrainConfig, cleanup: ExitStack) -> Session:
    """Everything before the first step. Bad input costs nothing: the run directory is created (or an
    old run cleared) only once the data, the tokenizer and the model have loaded."""
    cfg = with_device_defaults(cfg, torch.cuda.is_available())
    t, run_dir = cfg.train, Path(cfg.run_dir)
    accelerator = _make_accelerator(cfg, run_dir)
    main = accelerator.is_main_process
    assign_ranks([1] * cfg.rank_schedule.ranks_per_step, accelerator.num_processes, t.grad_accum, t.batch_size)
    cfg = within_context(cfg)
    existed = _from_main(accelerator, run_dir.is_dir())  # one answer for every process: they must agree
    if existed:  # an existing run is locked before it is read
        _lock(accelerator, run_dir, cleanup)
    resume_from = _on_main(accelerator, lambda: prepare_run_dir(cfg, run_dir))
    replacing = main and not t.resume and (run_dir / CONFIG).exists()  # overwrite=true (else refused)

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    # Tokenized once per run: the main process tokenizes (or finds the cache), the others wait, then map the same files.
    prepared = _on_main(accelerator, lambda: prepare_datasets(cfg.data, tokenizer))
    train_set, val_set = open_datasets(cfg.data, tokenizer, prepared, seed=t.seed)
    batches = BatchStream(train_set, t.batch_size, t.seed, cfg.data.group_by_length, tokenizer.pad_token_id,
                          accelerator.process_index, accelerator.num_processes,
                          pack_length=cfg.data.max_length if cfg.data.packing else None)
    max_steps = plan_steps(t, batches, held_out=len(val_set))  # train.num_epochs becomes a number of steps
    set_seed(t.seed)
    fsdp = _fsdp2(accelerator)
    if fsdp and cfg.optimizer.state_bits == 8:
        raise QdyloraError("optimizer.state_bits=8 does not work with FSDP (its 256-value blocks run along B's "
                           "columns, which FSDP splits across GPUs); use optimizer.state_bits=32 or DDP")
    keep_base = main and cfg.model.config is not None and not (resume_from and (run_dir / BASE_MODEL).is_dir())
    # Under FSDP the model is loaded to the CPU and each GPU receives only its shards at `prepare`.
    model, meta, base = build_training_model(cfg, keep_base=keep_base, quantize_device=accelerator.device,
                                             device=torch.device("cpu") if fsdp else accelerator.device)
    check_tokenizer_fits(tokenizer, model)
    if cfg.data.packing:  # refuse a model that would let packed examples see each other
        check_packing(model, train_set, torch.device("cpu") if fsdp else accelerator.device)

    if not existed:
        if main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise QdyloraError(f"run_dir={str(run_dir)!r}: cannot create it ({e.strerror})") from None
        accelerator.wait_for_everyone()
        _lock(accelerator, run_dir, cleanup)
    if replacing:
        clear_old_run(run_dir)
    if base is not None:
        save_base_model(run_dir, base, tokenizer)
        del base
    if resume_from is not None:  # before FSDP splits the adapters into shards
        load_adapter_state_dict(model, load_file(str(resume_from / ADAPTER_WEIGHTS)))
    rs = cfg.rank_schedule
    if rs.nested_ranks is not None:  # the training forward only: eval() and exports compute plain ranks
        set_nested(model, NestedRanks(tuple(rs.nested_ranks), rs.nested_weight))
    if fsdp:
        make_nf4_shardable(model)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if resolve_compile(t.compile, accelerator.device, fsdp):
        compile_decoder_layers(model)
    if accelerator.device.type == "cpu":
        row = cfg.data.max_length if cfg.data.packing else int(batches.lengths.sum()) / len(batches.lengths)
        first = json.loads((resume_from / TRAINER_STATE).read_text()).get("cpu_threads") if resume_from else None
        set_cpu_threads("train.cpu_threads", t.cpu_threads, hidden_size=model.config.hidden_size,
                        tokens=round(row * t.batch_size), resumed=first)
    _describe(cfg, accelerator, model, meta)

    adamw = build_optimizer(cfg.optimizer, model, paged=resolve_paged(cfg.optimizer.paged, accelerator.device, fsdp))
    warmup = math.ceil(cfg.optimizer.warmup_ratio * max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lr_lambda(cfg.optimizer.scheduler, max_steps, warmup))
    prepared, optimizer = accelerator.prepare(model, adamw)
    pad = tokenizer.pad_token_id
    session = Session(
        cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=prepared, optimizer=optimizer, adamw=adamw,
        scheduler=scheduler, meta=meta, guard=NonFiniteGuard(t.max_bad_steps), max_steps=max_steps, batches=batches,
        sampler=build_rank_sampler(rs.kind, r_max=cfg.adapter.r_max, min_rank=rs.min_rank, rank=rs.rank, seed=t.seed,
                                   sandwich=rs.sandwich),
        val_batches=[collate(val_set[i:i + t.batch_size], pad)  # only the batches validation uses are read
                     for i in range(0, min(len(val_set), t.eval_batches * t.batch_size), t.batch_size)],
        eval_ranks=sorted(set(t.eval_ranks or [1, max(1, cfg.adapter.r_max // 4), cfg.adapter.r_max])),
        reporter=None,  # needs the resumed step: below
    )
    if resume_from is not None:
        load_training_checkpoint(session, resume_from)
        log.info("resuming from %s (step %d)", resume_from, session.step)
    if main:
        save_config(cfg, run_dir / CONFIG)
        record_last_run(run_dir)  # after config.yaml: eval and export without a run name open this run
    session.reporter = Reporter(cfg, run_dir, accelerator, session.step, max_steps)
    return session


def _describe(cfg: TrainConfig, accelerator: Accelerator, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """The model and device in one line (`plan_steps` describes the data)."""
    trainable, total = count_parameters(model)
    log.info("model: %s, %d adapted layers, ranks 1..%d; %s of %s parameters trainable (%.2f%%); %s, %s",
             meta["base_model"], len(meta["target_modules"]), cfg.adapter.r_max, f"{trainable:,}", f"{total:,}",
             100 * trainable / total, accelerator.device, cfg.model.dtype)


# --- the loop --------------------------------------------------------------------------------------


def run(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; return the directory of the final adapter."""
    with ExitStack() as cleanup:
        s = setup(cfg, cleanup)
        s.reporter.start()
        cleanup.callback(s.reporter.stop)
        started = time.perf_counter()
        if s.step == 0 and s.cfg.train.eval_every > 0 and s.val_batches:
            # The starting point of the curve: the base model alone and the untrained adapters (B = 0) agree.
            base = round(validate(s, [0])[0], 6)
            s.reporter.step({"step": 0, "elapsed": 0.0, "val_loss": {str(r): base for r in s.eval_ranks}})
        try:
            with StopOnSignal() as stop:
                train_loop(s, stop)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            t = s.cfg.train
            raise ResourceError(
                f"out of memory at step {s.step + 1} (train.batch_size={t.batch_size}, sequence length up to "
                f"{max_sequence_length(s.cfg.data)[0]}, adapter.r_max={s.cfg.adapter.r_max}, "
                f"train.gradient_checkpointing={str(t.gradient_checkpointing).lower()}): lower the batch size or the "
                f"sequence length, or turn gradient checkpointing on. Last good checkpoint: "
                f"{latest_good_checkpoint(s.run_dir) or 'none'}") from None
        with StopOnSignal():  # a first signal now only waits for the final save: the run is complete
            final = finish(s)
        if s.accelerator.is_main_process:
            print(f"done: {s.step} steps in {time.perf_counter() - started:.1f}s; adapter for ranks "
                  f"1..{s.cfg.adapter.r_max} in {final}")
        return final


def train_loop(s: Session, stop: StopOnSignal) -> None:
    """Optimizer steps until the last: draw ranks, forward/backward, clip, step (or skip), report."""
    t, acc = s.cfg.train, s.accelerator
    while s.step < s.max_steps:
        started = time.perf_counter()
        ranks = s.sampler.sample(s.cfg.rank_schedule.ranks_per_step)
        s.drawn += ranks
        loss, tokens, trained, teacher_tokens = forward_backward(s, ranks)
        s.adamw.mark_trained(trained_slices(tuple(trained), s.cfg.adapter.mode))
        grad_norm = acc.clip_grad_norm_(s.params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        skipped = s.guard.skip(s.step + 1, loss, float(grad_norm), acc.scaler is not None, s.run_dir)
        if not skipped:
            s.optimizer.step()  # with fp16 loss scaling this also updates the scale
        elif acc.scaler is not None:  # the gradients are unscaled already: the scaler must see this step end
            acc.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule: the rate is a function of the step
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before `optimizer.step()`")
            s.scheduler.step()
        s.step, s.tokens, s.teacher_tokens = s.step + 1, s.tokens + tokens, s.teacher_tokens + teacher_tokens
        record = {"step": s.step, "loss": loss, "ranks": ranks, "lr": s.scheduler.get_last_lr()[0], "tokens": s.tokens,
                  "tokens_per_s": round(tokens / (time.perf_counter() - started), 1),
                  "elapsed": round(time.perf_counter() - s.reporter.started, 3)}
        if s.cfg.rank_schedule.distill > 0:  # the extra compute, counted: tokens through the teacher's forwards
            record["teacher_tokens"] = s.teacher_tokens
        if skipped:
            record.update(skipped=True, bad_steps=s.guard.in_a_row, skipped_total=s.guard.total)
        if t.eval_every > 0 and (s.step % t.eval_every == 0 or s.step == s.max_steps) and s.val_batches:
            record["val_loss"] = {str(r): round(v, 6) for r, v in validate(s, s.eval_ranks).items()}
        s.reporter.step(record)
        if (signum := stop.agreed(acc)) is not None:
            raise Interrupted(signum, s.step, save_training_checkpoint(s))
        if t.save_every > 0 and s.step % t.save_every == 0 and s.step < s.max_steps:
            save_training_checkpoint(s)


def forward_backward(s: Session, ranks: list[int]) -> tuple[float, int, list[int], int]:
    """The step's micro-batches, each at its share of `ranks`: the step's mean token loss, its tokens (all
    processes), the ranks whose rows carried loss tokens on any process (the others trained nothing),
    and the tokens the distillation teacher forwarded (all processes, padding excluded; 0 without distillation).

    The loss is the mean over every loss token of the step, as one batch of all its micro-batches and
    processes would give (loss.py): a mean of micro-batch means would weigh the tokens of short
    micro-batches more.

    With `rank_schedule.distill` = λ > 0 (in-place distillation, as slimmable networks train their
    narrower widths): a row at a rank below the step's top rank learns (1 - λ)·cross-entropy +
    λ·KL(top rank ‖ its rank) per loss token, the top rank's predictions for that row coming from one
    extra forward, without gradient, of the rows below the top at the top rank (the teacher); rows at
    the top rank learn from the labels alone. The teacher is the model as it stands before this
    step's update (detached), in training mode like the rows it teaches, at the plain top rank (with
    nested ranks too: the rank that is evaluated and exported, not its training mixture).
    """
    t, acc = s.cfg.train, s.accelerator
    plan = assign_ranks(ranks, acc.num_processes, t.grad_accum, t.batch_size)[acc.process_index]
    micro, tokens = [], 0
    counts = torch.zeros(s.cfg.adapter.r_max + 1)  # loss tokens of the rows at each rank 0..r_max
    for rank in plan:
        batch = next(s.batches)
        tokens += s.batches.last_tokens
        counts.index_add_(0, ranks_of_rows(rank, len(batch["labels"])), loss_tokens(batch["labels"]).float())
        micro.append((rank, batch))
    if acc.num_processes > 1:
        counts = counts.to(acc.device)
        torch.distributed.all_reduce(counts)
    total = max(counts.sum().item(), 1.0)  # a step without loss tokens: zero loss, nothing trained
    distill, top = s.cfg.rank_schedule.distill, max(ranks)
    loss_sum = torch.zeros((), device=acc.device)
    teacher_tokens = torch.zeros((), device=acc.device)
    for micro_index, (rank, batch) in enumerate(micro):
        batch = {name: v.to(acc.device) for name, v in batch.items()}
        labels = batch.pop("labels")
        students = taught = teacher = None
        if distill > 0:
            students = (ranks_of_rows(rank, len(labels)) < top).to(acc.device)
            # Every process forwards every micro-batch through the teacher when there are several: an FSDP
            # forward is collective, so none may skip one. Alone, only the rows it teaches.
            taught = torch.ones_like(students) if acc.num_processes > 1 else students
            if taught.any():
                set_rank(s.model, top)
                with torch.no_grad(), acc.autocast(), plain_ranks(s.model):  # the top rank, not its mixture
                    teacher = s.model(**{k: v[taught] for k, v in batch.items()}, use_cache=False).logits
                # The same count as the step's tokens: padding excluded (packed rows have no mask: whole rows)
                mask = batch.get("attention_mask")
                teacher_tokens += mask[taught].sum() if mask is not None else batch["input_ids"][taught].numel()
        set_rank(s.model, rank)
        # no_sync around backward too: FSDP2 reduces gradients in backward unless told not to.
        with nullcontext() if micro_index == len(plan) - 1 else acc.no_sync(s.model):
            with acc.autocast():
                # No KV cache: with one, transformers would not read packed rows' position restarts.
                logits = s.model(**batch, use_cache=False).logits
                per_token = token_losses(logits, labels)
                if teacher is not None:
                    mix = students[taught]  # of the taught rows, those below the top rank
                    rows = taught.nonzero().squeeze(1)[mix]  # ...as rows of the batch: one gather of the logits
                    kl = distill_losses(logits[rows], teacher[mix], labels[rows])
                    per_token = per_token.index_put((rows,), (1 - distill) * per_token[rows] + distill * kl)
                # Gradients are averaged over processes, hence the factor: the sum is over the step's tokens.
                loss = per_token.sum() * (acc.num_processes / total)
            acc.backward(loss)
        loss_sum += loss.detach()
    trained = [b for b in range(1, len(counts)) if counts[b] > 0]
    if acc.num_processes > 1 and distill > 0:
        torch.distributed.all_reduce(teacher_tokens)
    return acc.reduce(loss_sum, reduction="mean").item(), tokens * acc.num_processes, trained, int(teacher_tokens.item())


def validate(s: Session, ranks: list[int]) -> dict[int, float]:
    """Validation loss at each rank (every process: FSDP's forward is collective). One rank per forward:
    k ranks sharing one would hold k batches of logits, more than the training step itself needs with
    a large vocabulary (`qdylora plan` measured 15 GiB at 3 ranks for Llama 3 8B, 2×2048 tokens)."""
    return rank_losses(s.accelerator.unwrap_model(s.model), s.val_batches, ranks, ranks_per_pass=1,
                       device=s.accelerator.device)


# --- checkpoints -----------------------------------------------------------------------------------


def save_training_checkpoint(s: Session) -> Path:
    """checkpoints/step-N: adapters, optimizer, and the loop's position (data, ranks, RNG, scheduler)."""
    acc = s.accelerator
    unwrapped = acc.unwrap_model(s.model)
    adapters = gathered_adapter_state(unwrapped)  # every process: collective under FSDP
    optimizer_state_dict = optimizer_state(unwrapped, s.optimizer)
    check_replicas(acc, adapters, s.drawn, s.step)
    state = {"step": s.step, "bad_steps": s.guard.in_a_row, "skipped_total": s.guard.total, "tokens": s.tokens,
             "teacher_tokens": s.teacher_tokens,
             "data": s.batches.state_dict(), "sampler": s.sampler.state_dict(), "rng": rng_states(acc),
             "scheduler": s.scheduler.state_dict(),
             "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}

    def write(tmp: Path) -> None:
        save_file(adapters, str(tmp / ADAPTER_WEIGHTS))
        torch.save(optimizer_state_dict, tmp / "optimizer.pt")
        torch.save(state, tmp / "state.pt")
        threads = {"cpu_threads": torch.get_num_threads()} if acc.device.type == "cpu" else {}
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": s.step, **s.batches.state_dict(), **threads}))

    acc.wait_for_everyone()
    path = save_checkpoint(s.run_dir, s.step, write, s.cfg.train.keep_last) if acc.is_main_process else s.run_dir
    acc.wait_for_everyone()
    return path


def load_training_checkpoint(s: Session, path: Path) -> None:
    """Everything but the adapter weights, which `setup` loads before the model is prepared."""
    acc = s.accelerator
    optimizer_state_dict = torch.load(path / "optimizer.pt", map_location=acc.device, weights_only=True)
    load_optimizer_state(acc.unwrap_model(s.model), s.optimizer, optimizer_state_dict)
    state = torch.load(path / "state.pt", weights_only=True)
    s.scheduler.load_state_dict(state["scheduler"])
    s.sampler.load_state_dict(state["sampler"])
    s.batches.load_state_dict(state["data"])
    if state["scaler"] is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]  # one per process; a single state in checkpoints before 0.2
    set_rng_state(rng[acc.process_index] if isinstance(rng, list) else rng)
    s.step, s.tokens, s.teacher_tokens = state["step"], state.get("tokens", 0), state.get("teacher_tokens", 0)
    s.guard.in_a_row, s.guard.total = state["bad_steps"], state.get("skipped_total", 0)


def finish(s: Session) -> Path:
    """The last checkpoint and the final adapter (every rank 1..r_max)."""
    save_training_checkpoint(s)
    adapters = gathered_adapter_state(s.accelerator.unwrap_model(s.model))
    final = s.run_dir / ADAPTER
    if s.accelerator.is_main_process:
        save_adapter(final, adapters, s.meta)
    s.accelerator.wait_for_everyone()
    return final
