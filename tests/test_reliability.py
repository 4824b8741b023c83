"""Issue #7: interrupted runs resume exactly, damaged checkpoints are skipped, bad input never costs work.

Real `qdylora train +recipe=tiny` processes are stopped with SIGTERM and SIGKILL and resumed; the
final adapter must equal, bit for bit, that of a run that was never interrupted. Every comparison
is between subprocesses started with the same environment (one thread each), so the only thing
that differs between the runs is the interruption.

The short runs are shared by module-scoped fixtures; two of them run side by side where possible.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qdylora_cli import cli, train
from qdylora_cli.cli import compose_config
from qdylora_cli.rundir import checkpoint_dirs, save_config, verify_dir

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
# Short tiny-recipe runs: a checkpoint every 10 steps, a metrics line every step, validation at 0, 20 and 40.
# Dropout > 0 makes the result depend on the torch RNG, so resuming must restore it exactly.
RUN = ["+recipe=tiny", f"train.max_steps={STEPS}", "train.save_every=10", "train.keep_last=3", "train.batch_size=8",
       "train.eval_every=20", "train.eval_batches=1", "train.log_every=1", "adapter.dropout=0.1"]


# --- helpers -----------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # PYTHONPATH: the checkout itself, whatever `pip install -e` points at; one thread: identical arithmetic
    # in every run and less contention; wide lines: log messages are not wrapped.
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               COLUMNS="400")
    return env


_LOGS = itertools.count()


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    """`qdylora train` in a new process (stdout and stderr together, in a file beside the run)."""
    log = open(run_dir.parent / f"{run_dir.name}.{next(_LOGS)}.log", "w")
    cmd = [sys.executable, "-m", "qdylora_cli", "train", *RUN, f"run_dir={run_dir}", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=run_dir.parent)
    proc.log_path = Path(log.name)
    log.close()
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, proc.log_path.read_text(errors="replace")


def _train(run_dir: Path, *extra: str) -> str:
    code, out = _finish(_start(run_dir, *extra))
    assert code == 0, out[-3000:]
    return out


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps, default=-1)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{proc.log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in _metrics(run_dir) if "loss" in m]


def _assert_same_adapter(a: Path, b: Path) -> None:
    wa = load_file(str(a / "adapter" / "adapter.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} adapter tensors differ, e.g. {different[0]}"


def _snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file under `roots`: modification time and content hash."""
    files = {}
    for root in roots:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                files[str(f)] = (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return files


# --- shared runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """All the subprocess runs of this module, in two rounds of four processes side by side.

    Round 1: `straight` and `twin` (uninterrupted, same seed), `sigterm` (SIGTERM once past step 12)
    and `killed` (SIGKILL a few steps after its step-20 checkpoint). Round 2 resumes: `sigterm`,
    a copy of `killed`, and two copies whose newest checkpoint was damaged: `corrupt` (a flipped
    byte) and `partial` (no manifest, and a metrics line cut short).
    Each entry: run_dir, then per round `rc`/`out`, and what the interrupted runs left on disk.
    """
    root = tmp_path_factory.mktemp("runs")
    names = ("straight", "twin", "sigterm", "killed")
    r = {name: {"dir": root / name} for name in names}
    procs = {name: _start(r[name]["dir"]) for name in names}
    signalled = set()
    deadline = time.monotonic() + 400
    while any(p.poll() is None for p in procs.values()):
        sig_dir, kill_dir = r["sigterm"]["dir"], r["killed"]["dir"]
        if "sigterm" not in signalled and _last_step(sig_dir) >= 12:
            procs["sigterm"].send_signal(signal.SIGTERM)
            signalled.add("sigterm")
        if "killed" not in signalled and checkpoint_dirs(kill_dir) and _last_step(kill_dir) >= 23:
            procs["killed"].send_signal(signal.SIGKILL)
            signalled.add("killed")
        if time.monotonic() > deadline:
            for p in procs.values():
                p.kill()
            pytest.fail("the first round of runs timed out")
        time.sleep(0.02)
    for name, proc in procs.items():
        r[name]["rc"], r[name]["out"] = _finish(proc)
    assert signalled == {"sigterm", "killed"}, {n: r[n]["out"][-2000:] for n in ("sigterm", "killed")}
    for name in ("sigterm", "killed"):
        run_dir = r[name]["dir"]
        r[name].update(last_step=_last_step(run_dir), checkpoints=[p.name for p in checkpoint_dirs(run_dir)],
                       adapter_left=(run_dir / "adapter").exists())
    r["sigterm"]["checkpoint_ok"] = verify_dir(r["sigterm"]["dir"] / "checkpoints" / f"step-{r['sigterm']['last_step']}")

    killed = r["killed"]["dir"]
    for name in ("killed-resumed", "corrupt", "partial"):
        r[name] = {"dir": root / name}
        shutil.copytree(killed, root / name)
    newest = r["killed"]["checkpoints"][-1]
    weights = root / "corrupt" / "checkpoints" / newest / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    (root / "partial" / "checkpoints" / newest / "manifest.json").unlink()  # as if the writer died before it
    with open(root / "partial" / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 1.2')  # and a metrics line cut short by the kill
    resumed = ("sigterm", "killed-resumed", "corrupt", "partial")
    procs = {name: _start(r[name]["dir"], "train.resume=true") for name in resumed}
    for name, proc in procs.items():
        r[name]["rc2"], r[name]["out2"] = _finish(proc)
    return r


@pytest.fixture(scope="module")
def straight(runs) -> Path:
    """A finished run (40 steps, never interrupted)."""
    _ok(runs["straight"])
    return runs["straight"]["dir"]



def _error_line(stderr: str) -> str:
    """The one `error:` line of a failed command: the last line on stderr (logs may come before it), no traceback."""
    lines = stderr.strip().splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1 and lines[-1].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def _ok(run: dict, key: str = "rc") -> None:
    out = run["out" if key == "rc" else "out2"]
    assert run[key] == 0, out[-3000:]


# --- exact resume --------------------------------------------------------------------------------


def test_same_seed_and_config_give_identical_losses(runs):
    a, b = runs["straight"], runs["twin"]
    _ok(a), _ok(b)
    assert len(_losses(a["dir"])) == STEPS
    assert _losses(a["dir"]) == _losses(b["dir"])
    assert [m.get("val_loss") for m in _metrics(a["dir"])] == [m.get("val_loss") for m in _metrics(b["dir"])]
    _assert_same_adapter(a["dir"], b["dir"])


def test_sigterm_saves_a_checkpoint_and_resume_is_bit_identical(runs):
    run, straight = runs["sigterm"], runs["straight"]["dir"]
    assert run["rc"] == 128 + signal.SIGTERM, run["out"][-3000:]
    stopped = run["last_step"]
    assert 12 <= stopped < STEPS
    assert f"interrupted at step {stopped}; checkpoint saved" in run["out"] and "train.resume=true" in run["out"]
    assert run["checkpoints"][-1] == f"step-{stopped}" and run["checkpoint_ok"] is None, \
        "SIGTERM must leave a complete checkpoint of the step it stopped at"
    assert not run["adapter_left"]

    _ok(run, "rc2")
    assert f"resuming from {run['dir'] / 'checkpoints' / f'step-{stopped}'} (step {stopped})" in run["out2"]
    _assert_same_adapter(run["dir"], straight)
    assert _losses(run["dir"]) == _losses(straight)


def test_sigkill_then_resume_from_the_periodic_checkpoint_is_bit_identical(runs):
    killed, run, straight = runs["killed"], runs["killed-resumed"], runs["straight"]["dir"]
    assert killed["rc"] == -signal.SIGKILL
    assert not killed["adapter_left"] and killed["checkpoints"], killed["out"][-2000:]
    newest = killed["checkpoints"][-1]
    assert int(newest[5:]) < killed["last_step"], "killed between checkpoints: some steps are lost"
    _ok(run, "rc2")
    assert f"resuming from {run['dir'] / 'checkpoints' / newest} (step {newest[5:]})" in run["out2"]
    _assert_same_adapter(run["dir"], straight)
    assert _losses(run["dir"]) == _losses(straight), "metrics past the checkpoint must be replaced, not duplicated"


@pytest.mark.parametrize(("name", "why"), [("corrupt", "does not match its checksum"), ("partial", "no manifest")])
def test_damaged_or_partial_newest_checkpoint_is_skipped_with_a_warning(runs, name, why):
    run, straight = runs[name], runs["straight"]["dir"]
    checkpoints = runs["killed"]["checkpoints"]
    assert len(checkpoints) >= 2, checkpoints
    newest, previous = checkpoints[-2:][::-1]
    _ok(run, "rc2")
    assert f"skipping damaged checkpoint {run['dir'] / 'checkpoints' / newest} (" in run["out2"]
    assert why in run["out2"]
    assert f"resuming from {run['dir'] / 'checkpoints' / previous} (step {previous[5:]})" in run["out2"]
    _assert_same_adapter(run["dir"], straight)
    assert _losses(run["dir"]) == _losses(straight)
    assert verify_dir(run["dir"] / "checkpoints" / newest) is None, "the damaged checkpoint is written anew"


def test_resume_before_the_first_checkpoint_starts_over(tmp_path):
    """Killed before its first checkpoint: resume=true starts again from step 0 (nothing was saved to lose)."""
    args = ["train", "+recipe=tiny", "train.max_steps=4", "train.save_every=10", "train.eval_every=0",
            "train.log_every=1", "adapter.dropout=0.1"]
    for name in ("a", "b"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*args, f"run_dir={tmp_path / name}"])
        assert exit_.value.code == 0
    b = tmp_path / "b"
    shutil.rmtree(b / "checkpoints")
    shutil.rmtree(b / "adapter")
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, f"run_dir={b}", "train.resume=true"])
    assert exit_.value.code == 0
    _assert_same_adapter(tmp_path / "a", b)
    assert _losses(b) == _losses(tmp_path / "a")


def test_second_signal_exits_at_once():
    # Under nohup or in a background job SIGINT starts ignored: what must come back is what was in force.
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with train.StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert stop.signum == signal.SIGTERM  # first signal: only noted, the step goes on
        with pytest.raises(SystemExit) as exit_:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert exit_.value.code == 128 + signal.SIGINT
    assert {sig: signal.getsignal(sig) for sig in before} == before, "handlers are restored"


# --- numerical faults ----------------------------------------------------------------------------


def _poison(monkeypatch, loss_steps: set[int] | range, grad_steps: set[int]) -> None:
    """Make the training forward of the given steps (1-based) return a NaN loss, or a NaN gradient only."""
    real = train.build_training_model

    def build(*args, **kwargs):
        model, meta, base = real(*args, **kwargs)
        calls = [0]

        def hook(module, inputs, output):
            if not module.training:
                return output
            calls[0] += 1  # grad_accum=1: one training forward per step
            if calls[0] in loss_steps:  # training computes its loss from the logits (loss.py)
                output.logits = output.logits * float("nan")
            elif calls[0] in grad_steps:
                output.logits.register_hook(lambda g: g * float("inf"))
            return output

        model.register_forward_hook(hook)
        return model, meta, base

    monkeypatch.setattr(train, "build_training_model", build)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "nan"
    # Step 3: a NaN gradient (finite loss); steps 8 on: NaN loss. max_bad_steps=3 stops it at step 10.
    _poison(monkeypatch, loss_steps=range(8, 100), grad_steps={3})
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "+recipe=tiny", f"run_dir={run_dir}", "train.max_steps=30", "train.save_every=5",
                  "train.eval_every=0", "train.log_every=1", "train.max_bad_steps=3"])
    assert exit_.value.code == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: 3 non-finite steps in a row (train.max_bad_steps=3) at step 10")
    assert f"Last good checkpoint: {run_dir / 'checkpoints' / 'step-5'}" in err

    by_step = {m["step"]: m for m in _metrics(run_dir)}
    assert by_step[3]["skipped"] and by_step[3]["bad_steps"] == 1 and math.isfinite(by_step[3]["loss"])
    assert "skipped" not in by_step[4], "one bad step is skipped and the run goes on"
    assert [by_step[s]["bad_steps"] for s in (8, 9)] == [1, 2] and math.isnan(by_step[9]["loss"])
    assert by_step[9]["skipped_total"] == 3
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-5"], "no checkpoint of the failing steps"
    assert verify_dir(run_dir / "checkpoints" / "step-5") is None
    weights = load_file(str(run_dir / "checkpoints" / "step-5" / "adapter.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (run_dir / "adapter").exists()


# --- no silent overwrite -------------------------------------------------------------------------


def test_overwrite_true_replaces_the_old_run(tmp_path, straight):
    run_dir = tmp_path / "replaced"
    shutil.copytree(straight, run_dir)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "old.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "+recipe=tiny", f"run_dir={run_dir}", "overwrite=true", "train.max_steps=3",
                  "train.eval_every=0", "train.save_every=0"])
    assert exit_.value.code == 0
    assert [m["step"] for m in _metrics(run_dir)] == [3]
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-3"]
    assert not (run_dir / "eval").exists()
    assert "max_steps: 3" in (run_dir / "config.yaml").read_text()


def test_a_tokenizer_without_pad_token_pads_with_eos(workspace, tmp_path):
    run_dir = tmp_path / "eos-pad"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "+recipe=tiny", f"run_dir={run_dir}", f"model.tokenizer={workspace / 'eos-only-tokenizer'}",
                  "train.max_steps=2", "train.eval_every=0", "train.save_every=0"])
    assert exit_.value.code == 0
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()


# --- bad input ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Broken inputs of every kind, and a run_dir that already holds a user's file."""
    from qdylora_cli.tiny import byte_tokenizer

    ws = tmp_path_factory.mktemp("bad")
    (ws / "run").mkdir()
    (ws / "run" / "keep.txt").write_text("the user's notes")
    no_weights = ws / "no-weights"  # config and tokenizer, but no safetensors
    byte_tokenizer().save_pretrained(no_weights)
    (no_weights / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 264}))
    pad_eos = byte_tokenizer()
    pad_eos.pad_token = None
    pad_eos.save_pretrained(ws / "eos-only-tokenizer")
    pad_eos.eos_token = None
    pad_eos.save_pretrained(ws / "no-pad-tokenizer")
    good = '{"instruction": "Reverse the word.", "input": "cat", "output": "tac"}\n'
    (ws / "empty.jsonl").write_text("")
    (ws / "one-object.json").write_text('{"instruction": "Reverse the word.", "input": "cat", "output": "tac"}\n')
    (ws / "truncated.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "outp')
    (ws / "not-json.jsonl").write_text(good * 2 + "instruction: a\n")
    (ws / "missing-field.jsonl").write_text(good + '{"instruction": "a"}\n')
    (ws / "not-object.jsonl").write_text('["instruction", "output"]\n')
    (ws / "wrong-type.jsonl").write_text('{"instruction": "a", "output": 42}\n')
    (ws / "latin1.jsonl").write_bytes((good + '{"instruction": "café", "output": "b"}\n').encode("latin-1"))
    (ws / "blank.txt").write_text("\n  \n")
    chat = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
    (ws / "chat-no-messages.jsonl").write_text(chat + '{"conversations": []}\n')
    (ws / "chat-empty.jsonl").write_text('{"messages": []}\n')
    (ws / "chat-bad-role.jsonl").write_text(chat + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    (ws / "chat-content-list.jsonl").write_text('{"messages": [{"role": "user", "content": ["x"]}]}\n')
    (ws / "chat-no-assistant.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    (ws / "chat-ends-with-user.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "#### 1"}, '
        '{"role": "user", "content": "Bye"}]}\n')
    (ws / "chat.jsonl").write_text(chat * 4)
    (ws / "bad.jinja").write_text("{% for m in messages %}{{ m.content }")
    import datasets

    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}]}]).save_to_disk(str(ws / "hf-chat"))
    (ws / "a-file").write_text("not a directory")
    (ws / "unfinished").mkdir()  # a run stopped before it wrote its adapter
    save_config(compose_config("train", ["+recipe=tiny", f"run_dir={ws / 'unfinished'}"]), ws / "unfinished" / "config.yaml")
    (ws / "broken-run" / "checkpoints").mkdir(parents=True)
    (ws / "broken-run" / "config.yaml").write_text("model: [unclosed\n")
    truncated = ws / "truncated-model"  # a download cut short
    shutil.copytree(no_weights, truncated)
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(no_weights)).save_pretrained(truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(no_weights, ws / "bad-tokenizer")
    (ws / "bad-tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    (ws / "bad-tokenizer" / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    return ws


@pytest.fixture(scope="module")
def damaged_adapter(straight, tmp_path_factory) -> Path:
    """A copy of a finished run whose adapter file is half written and has no manifest to give it away."""
    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(straight, run_dir)
    weights = run_dir / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (run_dir / "adapter" / "manifest.json").unlink()
    return run_dir


# (case id, arguments: {ws}/{run} are filled in, what the one error line must name)
BAD_INPUTS = [
    ("malformed-override", ["train", "adapter={r_max: 4"], "adapter={r_max: 4"),
    ("unknown-command", ["fly"], "'fly'"),
    ("unknown-option", ["train", "--bogus"], "--bogus"),
    ("unknown-recipe", ["train", "+recipe=nope"], "+recipe=nope"),
    ("unknown-group-option", ["train", "model=nope"], "model=nope"),
    ("config-dir-missing", ["train", "--config-dir", "{ws}/no-such-dir"], "no-such-dir"),
    ("unknown-key", ["train", "adapter.rmax=4"], "adapter.rmax"),
    ("int-not-a-number", ["train", "train.max_steps=abc"], "train.max_steps"),
    ("bool-not-a-bool", ["train", "train.resume=maybe"], "train.resume"),
    ("list-not-a-list", ["train", "adapter.target_modules=5"], "adapter.target_modules"),
    ("choice-not-allowed", ["train", "optimizer.scheduler=sometimes"], "optimizer.scheduler"),
    ("source-len-zero", ["train", "data.source_max_len=0"], "data.source_max_len"),
    ("target-len-negative", ["train", "data.target_max_len=-5"], "data.target_max_len"),
    ("block-size-zero", ["train", "data=text", "data.path={ws}/blank.txt", "data.block_size=0"], "data.block_size"),
    ("r-max-zero", ["train", "adapter.r_max=0"], "adapter.r_max"),
    ("min-rank-above-r-max", ["train", "rank_schedule.min_rank=9"], "rank_schedule.min_rank"),
    ("eval-rank-above-r-max", ["train", "train.eval_ranks=[1,99]"], "train.eval_ranks"),
    ("max-steps-zero", ["train", "train.max_steps=0"], "train.max_steps"),
    ("fp16-on-cpu", ["train", "train.mixed_precision=fp16"], "train.mixed_precision"),
    ("model-dir-missing", ["train", "model=hf", "model.name_or_path={ws}/no-model"], "model.name_or_path"),
    ("model-dir-without-weights", ["train", "model=hf", "model.name_or_path={ws}/no-weights"], "no-weights"),
    ("tokenizer-without-pad-or-eos", ["train", "model.tokenizer={ws}/no-pad-tokenizer"], "no-pad-tokenizer"),
    ("target-modules-match-nothing", ["train", "adapter.target_modules=[nope]"], "'nope'"),
    ("data-file-missing", ["train", "data=json", "data.path={ws}/nope.jsonl"], "data.path"),
    ("data-path-required", ["train", "data=json"], "data.path"),
    ("empty-dataset", ["train", "data=json", "data.path={ws}/empty.jsonl"], "empty.jsonl"),
    ("one-object-not-records", ["train", "data=json", "data.path={ws}/one-object.json"],
     "{ws}/one-object.json: one JSON object, not a list of records"),
    ("truncated-json", ["train", "data=json", "data.path={ws}/truncated.json"], "truncated.json:1"),
    ("jsonl-line-not-json", ["train", "data=json", "data.path={ws}/not-json.jsonl"], "not-json.jsonl:3"),
    ("missing-field", ["train", "data=json", "data.path={ws}/missing-field.jsonl"], "missing-field.jsonl:2"),
    ("record-not-an-object", ["train", "data=json", "data.path={ws}/not-object.jsonl"], "not-object.jsonl:1"),
    ("field-not-a-string", ["train", "data=json", "data.path={ws}/wrong-type.jsonl"], "wrong-type.jsonl:1"),
    ("not-utf8", ["train", "data=json", "data.path={ws}/latin1.jsonl"], "latin1.jsonl:2"),
    ("empty-text", ["train", "data=text", "data.path={ws}/blank.txt"], "blank.txt"),
    ("chat-no-messages", ["train", "data=chat", "data.path={ws}/chat-no-messages.jsonl"], "chat-no-messages.jsonl:2"),
    ("chat-no-messages-in-list", ["train", "data=chat", "data.path={ws}/chat-empty.jsonl"], "chat-empty.jsonl:1: no messages"),
    ("chat-unknown-role", ["train", "data=chat", "data.path={ws}/chat-bad-role.jsonl"], "chat-bad-role.jsonl:2"),
    ("chat-content-not-a-string", ["train", "data=chat", "data.path={ws}/chat-content-list.jsonl"],
     "chat-content-list.jsonl:1"),
    ("chat-no-assistant-turn", ["train", "data=chat", "data.path={ws}/chat-no-assistant.jsonl"],
     "chat-no-assistant.jsonl:1: no assistant message"),
    ("chat-hf-no-assistant-turn", ["train", "data=chat", "data.format=hf", "data.path={ws}/hf-chat"],
     "hf-chat row 1: no assistant message"),
    ("chat-template-not-jinja", ["train", "data=chat", "data.path={ws}/chat.jsonl", "data.chat_template={ws}/bad.jinja"],
     "bad.jinja"),
    ("chat-template-file-missing", ["train", "data=chat", "data.path={ws}/chat.jsonl", "data.chat_template=nope.jinja"],
     "data.chat_template='nope.jinja'"),
    ("instructions-read-as-chat", ["train", "data=json", "data.format=chat", "data.path={ws}/missing-field.jsonl"],
     "missing-field.jsonl:1: missing field 'messages'"),
    ("chat-key-on-instructions", ["train", "data.chat_template=chatml"], "data.chat_template"),
    ("chat-all-cut-before-an-answer", ["train", "data=chat", "data.path={ws}/chat.jsonl", "data.max_length=8"],
     "data.max_length"),
    ("packing-a-text-corpus", ["train", "data=text", "data.path={ws}/blank.txt", "data.packing=true"], "data.packing"),
    ("packing-rows-too-short", ["train", "data.packing=true", "data.max_length=100"], "data.max_length=100"),
    ("epochs-and-steps", ["train", "train.num_epochs=2"], "train.max_steps=null"),
    ("neither-epochs-nor-steps", ["train", "train.max_steps=null"], "train.num_epochs"),
    ("epochs-zero", ["train", "train.max_steps=null", "train.num_epochs=0"], "train.num_epochs=0"),
    ("run-dir-not-writable", ["train", "run_dir={ws}/a-file/run"], "a-file"),
    ("run-dir-is-a-file", ["train", "run_dir={ws}/a-file"], "a-file' is a file"),
    ("existing-run", ["train", "run_dir={run}"], "{run} already holds a run"),
    ("resume-with-other-adapter", ["train", "run_dir={run}", "train.resume=true", "adapter.r_max=4"], "adapter"),
    ("overwrite-with-bad-data",
     ["train", "run_dir={run}", "overwrite=true", "data=json", "data.path={ws}/not-json.jsonl"], "not-json.jsonl:3"),
    ("overwrite-with-bad-targets",
     ["train", "run_dir={run}", "overwrite=true", "adapter.target_modules=[nope]"], "'nope'"),
    ("resume-unreadable-config", ["train", "run_dir={ws}/broken-run", "train.resume=true"], "broken-run/config.yaml"),
    ("eval-unreadable-config", ["eval", "run_dir={ws}/broken-run"], "broken-run/config.yaml"),
    ("eval-not-a-run", ["eval", "run_dir={ws}/run"], "{ws}/run is not a qdylora run directory"),
    ("eval-rank-above-r-max", ["eval", "run_dir={run}", "rank=99"], "rank=99"),
    ("eval-rank-not-a-spec", ["eval", "run_dir={run}", "rank=abc"], "rank='abc'"),
    ("export-rank-missing", ["export", "run_dir={run}"], "rank is required"),
    ("export-rank-the-run-lacks", ["export", "run_dir={run}", "rank=99"], "rank=99"),
    ("export-format-unknown", ["export", "run_dir={run}", "rank=2", "format=onnx"], "format='onnx'"),
    ("export-not-a-run", ["export", "run_dir={ws}/run", "rank=2"], "{ws}/run is not a qdylora run directory"),
    ("eval-chat-unknown-role", ["eval", "run_dir={run}", "data=chat", "data.path={ws}/chat-bad-role.jsonl"],
     "chat-bad-role.jsonl:2"),
    ("eval-chat-task-without-answer", ["eval", "run_dir={run}", "task=gsm8k", "data=chat",
                                       "data.path={ws}/chat-ends-with-user.jsonl"], "chat-ends-with-user.jsonl:1"),
    ("eval-packing", ["eval", "run_dir={run}", "data=chat", "data.path={ws}/chat.jsonl", "data.packing=true"],
     "data.packing"),
    ("eval-unfinished-run", ["eval", "run_dir={ws}/unfinished"], "{ws}/unfinished has no finished adapter"),
    ("export-unfinished-run", ["export", "run_dir={ws}/unfinished", "rank=2"], "{ws}/unfinished"),
    ("eval-out-dir-not-writable", ["eval", "run_dir={run}", "max_batches=1", "out_dir={ws}/a-file/eval"], "a-file"),
    ("export-out-dir-not-writable", ["export", "run_dir={run}", "rank=2", "out_dir={ws}/a-file/x"], "a-file"),
    ("sequence-longer-than-the-context", ["train", "data.source_max_len=500"],
     "data.source_max_len + data.target_max_len = 548 is longer than the model's context (512 positions"),
    ("text-blocks-longer-than-the-context",
     ["train", "model=hf", "model.name_or_path={ws}/truncated-model", "data=text", "data.path={ws}/blank.txt",
      "data.block_size=100000"], "data.block_size = 100000 is longer than the model's context (2048 positions"),
    ("truncated-weights", ["train", "model=hf", "model.name_or_path={ws}/truncated-model"],
     "{ws}/truncated-model/model.safetensors: unreadable weights"),
    ("damaged-tokenizer", ["train", "model.tokenizer={ws}/bad-tokenizer"], "cannot load a tokenizer from '{ws}/bad-tokenizer'"),
    ("eval-damaged-adapter", ["eval", "run_dir={damaged}", "out_dir={ws}/e"], "adapter in {damaged}/adapter is unreadable"),
    ("export-damaged-adapter", ["export", "run_dir={damaged}", "rank=2", "out_dir={ws}/x"],
     "adapter in {damaged}/adapter is unreadable"),
    ("merged-export-damaged-adapter", ["export", "run_dir={damaged}", "rank=2", "format=merged", "out_dir={ws}/x"],
     "adapter in {damaged}/adapter is unreadable"),
    ("tracker-not-installed", ["train", "train.report_to=[mlflow]"], "mlflow is not installed"),
    ("generate-damaged-adapter", ["generate", "run_dir={damaged}", "prompt=hi"], "adapter in {damaged}/adapter is unreadable"),
    ("allocate-damaged-adapter", ["allocate", "run_dir={damaged}", "budget=0.5", "out_dir={ws}/a"],
     "adapter in {damaged}/adapter is unreadable"),
    ("train-eval-ranks-not-a-spec", ["train", "train.eval_ranks=1-8"], "train.eval_ranks='1-8'"),
    ("generate-no-prompt", ["generate", "run_dir={run}"], 'prompt="TEXT" or prompts=FILE'),
    ("generate-prompt-and-prompts", ["generate", "run_dir={run}", "prompt=hi", "prompts={ws}/blank.txt"],
     'prompt="TEXT" or prompts=FILE'),
    ("generate-input-without-prompt", ["generate", "run_dir={run}", "prompts={ws}/blank.txt", "input=x"], "input='x'"),
    ("generate-prompts-missing", ["generate", "run_dir={run}", "prompts={ws}/nope.txt"], "prompts='{ws}/nope.txt'"),
    ("generate-prompts-empty", ["generate", "run_dir={run}", "prompts={ws}/blank.txt"], "blank.txt"),
    ("generate-prompts-not-json", ["generate", "run_dir={run}", "prompts={ws}/not-json.jsonl"], "not-json.jsonl:3"),
    ("generate-prompt-record-not-text", ["generate", "run_dir={run}", "prompts={ws}/not-object.jsonl"],
     "not-object.jsonl:1"),
    ("generate-prompts-not-utf8", ["generate", "run_dir={run}", "prompts={ws}/latin1.jsonl"], "latin1.jsonl:2"),
    ("generate-rank-above-r-max", ["generate", "run_dir={run}", "prompt=hi", "rank=[1,99]"], "rank=[1, 99]"),
    ("generate-temperature-negative", ["generate", "run_dir={run}", "prompt=hi", "temperature=-0.5"], "temperature"),
    ("generate-top-p-when-greedy", ["generate", "run_dir={run}", "prompt=hi", "top_p=0.9"], "top_p=0.9"),
    ("generate-out-file-exists", ["generate", "run_dir={run}", "prompt=hi", "out_file={ws}/run/keep.txt"],
     "{ws}/run/keep.txt already exists"),
    ("generate-out-file-not-writable", ["generate", "run_dir={run}", "prompt=hi", "out_file={ws}/a-file/a.jsonl"],
     "a-file"),
    ("generate-not-a-run", ["generate", "run_dir={ws}/run", "prompt=hi"], "{ws}/run is not a qdylora run directory"),
    ("generate-unfinished-run", ["generate", "run_dir={ws}/unfinished", "prompt=hi"],
     "{ws}/unfinished has no finished adapter"),
]


@pytest.mark.parametrize(("args", "culprit"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_culprit_and_changes_nothing(args, culprit, workspace, straight,
                                                                        damaged_adapter, capsys):
    """Each mistake: exit 2, one `error:` line on stderr that names the key, file or line, no file touched.

    Train commands that get past the config into the loader train into `{ws}/run` (holding a user's
    file) with the tiny recipe; `{run}` is a finished run, which must survive refusals unchanged.
    """
    def fill(text: str) -> str:
        return text.replace("{ws}", str(workspace)).replace("{run}", str(straight)).replace("{damaged}", str(damaged_adapter))

    argv, culprit = [fill(a) for a in args], fill(culprit)
    if argv[0] == "train" and not any(a.startswith("run_dir=") for a in argv):
        argv += [f"run_dir={workspace / 'run'}"]
    if argv[0] == "train" and not any(a.startswith(("+recipe", "model=")) for a in args):
        argv.insert(1, "+recipe=tiny")
    before = _snapshot(workspace, straight)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, f"exit {exit_.value.code}; stdout: {out[-2000:]}"
    assert culprit in _error_line(err), err[-3000:]
    assert _snapshot(workspace, straight) == before, "existing files must be left untouched"
    assert not (workspace / "run" / "base_model").exists() and not (workspace / "run" / "config.yaml").exists()


# --- one writer per run ------------------------------------------------------------------------------


def test_a_run_has_one_writer_and_the_others_stop_at_once_naming_it(tmp_path):
    """While a run trains, a second train (resume or overwrite) stops before touching anything; eval and
    export say the run is in training; once the writer is killed, the lock is gone with it."""
    run_dir = tmp_path / "busy"
    writer = _start(run_dir, "train.max_steps=100000", "train.save_every=5")
    _wait_for(writer, lambda: bool(checkpoint_dirs(run_dir)), "the first checkpoint")
    try:
        config = (run_dir / "config.yaml").read_bytes()
        for extra in (["train.resume=true"], ["overwrite=true"]):
            code, out = _finish(_start(run_dir, *extra), timeout=120)
            assert code == 2, out[-2000:]
            assert _error_line(out).startswith(f"error: {run_dir} is being trained by PID {writer.pid} on ")
            # The writer's files are its own: the config was not rewritten, overwrite deleted nothing.
            assert (run_dir / "config.yaml").read_bytes() == config and checkpoint_dirs(run_dir)
        env = _env()
        for args in (["eval", f"run_dir={run_dir}"], ["export", f"run_dir={run_dir}", "rank=2"]):
            done = subprocess.run([sys.executable, "-m", "qdylora_cli", *args], capture_output=True, text=True,
                                  env=env, timeout=120)
            assert done.returncode == 2
            assert f"{run_dir} is being trained by PID {writer.pid}" in done.stderr
            assert "has no finished adapter yet" in done.stderr
        assert writer.poll() is None, "the run in training went on undisturbed"
    finally:
        writer.kill()
        writer.wait()
    code, out = _finish(_start(run_dir, "train.resume=true", "train.max_steps=12"), timeout=300)
    assert code == 0, out[-2000:]  # SIGKILL left no stale lock


# --- out of memory -----------------------------------------------------------------------------------


def test_out_of_memory_is_one_line_with_the_step_the_settings_and_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "oom"
    real = train.build_training_model

    def build(*args, **kwargs):  # at step 7 the forward asks the allocator for an impossible amount of memory
        model, meta, base = real(*args, **kwargs)
        calls = [0]

        def hook(module, inputs):
            calls[0] += module.training
            if calls[0] == 7:
                torch.empty(1 << 60, dtype=torch.uint8)

        model.register_forward_pre_hook(hook)
        return model, meta, base

    monkeypatch.setattr(train, "build_training_model", build)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "+recipe=tiny", f"run_dir={run_dir}", "train.max_steps=30", "train.save_every=5",
                  "train.eval_every=0", "train.log_every=1"])
    assert exit_.value.code == 1
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: out of memory at step 7 (train.batch_size=16, sequence length up to 144, "
                          "adapter.r_max=8, train.gradient_checkpointing=false)")
    assert err.endswith(f"Last good checkpoint: {run_dir / 'checkpoints' / 'step-5'}")
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-5"] and verify_dir(run_dir / "checkpoints" / "step-5") is None
    assert [m["step"] for m in _metrics(run_dir)][-1] == 6 and not (run_dir / "adapter").exists()
