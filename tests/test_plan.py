"""`qdylora plan`: one real training step on fake tensors, its device memory counted."""

import json
import re
from dataclasses import replace

import pytest
import torch.nn.functional as F
from conftest import SHARED
from runners import qdylora

from qdylora_cli import plan
from qdylora_cli.cli import compose_config
from qdylora_cli.data import max_sequence_length
from qdylora_cli.datacache import IGNORE_INDEX

MIB = 1 << 20
CONFIGS = SHARED / "models" / "configs"


def _planned(*overrides: str, gpu: str = "24") -> tuple:
    cfg = compose_config("plan", [*overrides, f"gpu={gpu}"])
    train_cfg = plan.plan_config(cfg.train, plan.parse_gpu(cfg.gpu))
    return train_cfg, plan.model_config(train_cfg), max_sequence_length(train_cfg.data)[0]


def _peaks(measured: plan.Measured) -> dict[str, int]:
    return {phase: total for phase, (total, _) in measured.peaks.items()}


def _agree(fake: plan.Measured, real: plan.Measured) -> None:
    """The peaks, each phase's and the step's, within 2% of the step's peak."""
    assert abs(fake.peak[0] - real.peak[0]) <= 0.02 * real.peak[0]
    for phase, total in _peaks(real).items():
        assert abs(_peaks(fake)[phase] - total) <= 0.02 * real.peak[0], phase


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_fake_tensors_count_what_real_tensors_count(precision):
    """The plan's accounting on fake tensors equals the same accounting of the same step on real CPU
    tensors (within 2%): fake tensors change the cost of a step, not its allocations."""
    cfg, config, length = _planned("+recipe=tiny", f"train.mixed_precision={precision}", "train.grad_accum=2",
                                   "adapter.dropout=0.1", "train.gradient_checkpointing=true")
    fake, real = plan.measure(cfg, config, length), plan.measure(cfg, config, length, on="cpu")
    assert fake.peaks.keys() == real.peaks.keys() == {"forward", "backward", "optimizer", "validation"}
    _agree(fake, real)
    trainable = sum(p.numel() for p in plan.build_model(cfg, config).parameters() if p.requires_grad)
    assert fake.state_bytes == real.state_bytes
    assert 8 * trainable < fake.state_bytes < 8.1 * trainable  # two float32 moments, and each slice's step count


def test_fake_and_real_agree_on_stories260k(stories260k):
    cfg, config, length = _planned("model=hf", f"model.name_or_path={stories260k}", "data=text", "data.path=x.txt",
                                   "data.block_size=256", "train.batch_size=4", "adapter.r_max=16")
    _agree(plan.measure(cfg, config, length), plan.measure(cfg, config, length, on="cpu"))


def test_two_shallow_models_give_the_full_depth_exactly():
    """A 12-layer Falcon-40B-like decoder: the estimate from 4 and 8 layers equals the step at 12."""
    cfg, config, length = _planned("+recipe=tiny", "train.mixed_precision=bf16", "model.dtype=bfloat16",
                                   "train.gradient_checkpointing=true", "train.grad_accum=2")
    config.num_hidden_layers = 12
    full, estimated = plan.measure(cfg, config, length), plan.estimate(cfg, config, length)
    for phase, total in _peaks(full).items():
        assert abs(_peaks(estimated)[phase] - total) <= 0.002 * total + MIB, phase
    assert estimated.state_bytes == full.state_bytes


def test_what_fits_is_what_a_measurement_finds():
    """The largest r_max the plan names fits, and 10% more does not."""
    cfg, config, length = _planned("+recipe=tiny", "train.gradient_checkpointing=true")
    base = plan.estimate(cfg, config, length).peak[0]
    budget = base + 12 * MIB
    fits = plan.limits(cfg, config, length, base, budget)
    assert fits.r_max > cfg.adapter.r_max and fits.batch_size > cfg.train.batch_size and fits.length > length

    def peak(r: int) -> int:
        return plan.estimate(replace(cfg, adapter=replace(cfg.adapter, r_max=r)), config, length).peak[0]

    assert peak(fits.r_max) <= budget < peak(int(fits.r_max * 1.1) + 1)


def test_plan_through_the_cli_fits_or_names_what_fits(capsys):
    assert qdylora("plan", "+recipe=tiny", "gpu=t4-16gb") == 0
    out = capsys.readouterr().out
    assert "NF4 weights" in out and "fits on the T4 16 GB" in out
    assert out.rstrip().splitlines()[-1].startswith("peak ") and " fits " in out.rstrip().splitlines()[-1]
    # 512 ranks make the adapters, their gradients and moments 60 MiB: 30 MiB (with the 0.5 GiB allowance) fit half
    assert qdylora("plan", "+recipe=tiny", "adapter.r_max=512", "train.batch_size=1", "gpu=0.53") == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: does not fit: one training step needs")
    assert re.search(r"it fits with adapter.r_max <= \d+, train.batch_size: not even 1", error[0]), error


def test_the_auto_settings_are_those_of_the_named_gpu():
    cfg = compose_config("plan", ["+recipe=tiny", "model.dtype=auto", "train.mixed_precision=auto",
                                  "train.gradient_checkpointing=null", "gpu=v100-32gb"])
    v100 = plan.plan_config(cfg.train, plan.parse_gpu(cfg.gpu))
    assert (v100.model.dtype, v100.train.mixed_precision, v100.train.gradient_checkpointing) == ("float16", "fp16", True)
    h100 = plan.plan_config(cfg.train, plan.parse_gpu("h100-80gb"))
    assert (h100.model.dtype, h100.train.mixed_precision) == ("bfloat16", "bf16")


@pytest.mark.parametrize(("args", "message"), [
    (["+recipe=tiny", "gpu=x100"], "gpu='x100': expected one of v100-32gb, t4-16gb"),
    (["+recipe=tiny", "gpu=-3"], "gpu='-3': expected one of"),
    (["+recipe=tiny"], "gpu: name the GPU to plan for"),
    (["model=hf", "model.name_or_path={empty}", "gpu=24"], "no readable config.json"),
])
def test_bad_plan_inputs_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    code = qdylora("plan", *[a.format(empty=tmp_path / "empty") for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err


def test_falcon_40b_on_a_v100_from_its_config_json_alone(stories260k, capsys):
    """The paper's headline: Falcon-40B, ranks 1..64, one 32 GB V100. No weights: config.json only."""
    falcon = stories260k.parent / "configs" / "falcon-40b"
    assert json.loads((falcon / "config.json").read_text())["num_hidden_layers"] == 60
    assert qdylora("plan", "+recipe=falcon40b_alpaca", f"model.name_or_path={falcon}", "gpu=v100-32gb") == 0
    out = capsys.readouterr().out
    peak = float(out.strip().splitlines()[-1].split()[1])
    assert peak <= 28.0, out  # what does not fit is named: test_plan_through_the_cli_fits_or_names_what_fits


def test_distillation_counts_the_teacher_s_logits_through_backward():
    """rank_schedule.distill keeps the top rank's logits of the taught rows (3 of 4 here: all but the top
    rank's chunk) until the students' backward."""
    cfg, config, length = _planned("+recipe=tiny", "train.batch_size=4", "rank_schedule.ranks_per_step=4")
    plain = plan.measure(cfg, config, length)
    taught = replace(cfg, rank_schedule=replace(cfg.rank_schedule, distill=0.5))
    extra = plan.measure(taught, config, length).peaks["backward"][0] - plain.peaks["backward"][0]
    assert extra >= 3 * length * config.vocab_size * 4  # at least the teacher's float32 logits


def test_the_chunked_loss_saves_the_float32_logits_at_llama_3_8b_shape(monkeypatch):
    """At Llama 3's 128k vocabulary and 2048 tokens, F.cross_entropy over whole logits keeps their float32
    copy and its softmax (1 GiB each); train's chunked loss never holds either. Two layers: the loss does
    not depend on depth (docs/performance.md has the full-depth peaks)."""
    if not (CONFIGS / "llama-3.1-8b").is_dir():
        pytest.skip(f"{CONFIGS} is absent (the ../shared folder beside the checkout holds it)")
    cfg, config, _ = _planned("+recipe=llama3_8b_alpaca", f"model.name_or_path={CONFIGS / 'llama-3.1-8b'}",
                              "data.packing=true", "data.max_length=2048", "train.batch_size=1", gpu="h100-80gb")
    config = plan.with_depth(config, 2)
    chunked = plan.measure(cfg, config, 2048).peak[0]

    def whole(logits, labels):
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none").view(labels.shape)

    monkeypatch.setattr(plan, "token_losses", whole)
    full = plan.measure(cfg, config, 2048).peak[0]
    float32_logits = 2048 * config.vocab_size * 4
    assert full - chunked >= 1.5 * float32_logits, (full - chunked) / 2**30
