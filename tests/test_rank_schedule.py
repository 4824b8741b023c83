"""Rank schedules: the exact distribution each one draws from, and a resumable sequence."""

from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from qdylora_cli.adapters.rank import RANK_WEIGHTS, build_rank_sampler
from qdylora_cli.choices import RANK_SCHEDULES
from qdylora_cli.cli import compose_config
from qdylora_cli.errors import QdyloraError

CONF = Path(__file__).resolve().parents[1] / "conf" / "rank_schedule"


def probs(sampler) -> list[float]:
    return sampler.probs.tolist()


def test_octave_gives_each_octave_an_equal_share():
    s = build_rank_sampler("octave", r_max=16, seed=0)
    expected = [1 / 5] + [1 / 10] * 2 + [1 / 20] * 4 + [1 / 40] * 8 + [1 / 5]  # 1 | 2-3 | 4-7 | 8-15 | 16
    assert probs(s) == pytest.approx(expected, abs=1e-12)


def test_octave_cuts_octaves_to_min_rank_and_r_max():
    # r_max 12: octaves 1 | 2-3 | 4-7 | 8-12; min_rank 3 leaves 3 | 4-7 | 8-15 | 16.
    def octave(low, r_max):
        return build_rank_sampler("octave", r_max=r_max, min_rank=low)

    assert probs(octave(1, 12)) == pytest.approx([1 / 4] + [1 / 8] * 2 + [1 / 16] * 4 + [1 / 20] * 5)
    assert probs(octave(3, 16)) == pytest.approx([1 / 4] + [1 / 16] * 4 + [1 / 32] * 8 + [1 / 4])
    assert probs(octave(1, 1)) == [1.0]


def test_mixed_is_half_octave_half_uniform():
    octave = [1 / 5] + [1 / 10] * 2 + [1 / 20] * 4 + [1 / 40] * 8 + [1 / 5]
    expected = [o / 2 + 1 / 32 for o in octave]
    assert probs(build_rank_sampler("mixed", r_max=16)) == pytest.approx(expected, abs=1e-12)
    cut = build_rank_sampler("mixed", r_max=12, min_rank=3)  # octaves 3 | 4-7 | 8-12
    assert probs(cut) == pytest.approx([1 / 6 + 1 / 20] + [1 / 24 + 1 / 20] * 4 + [1 / 30 + 1 / 20] * 5)


def test_harmonic_is_proportional_to_one_over_b():
    total = sum(Fraction(1, b) for b in range(2, 9))
    assert probs(build_rank_sampler("harmonic", r_max=8, min_rank=2)) == pytest.approx([float(Fraction(1, b) / total) for b in range(2, 9)])


@pytest.mark.parametrize("kind", ["octave", "harmonic", "mixed"])
def test_draws_follow_the_distribution(kind):
    s = build_rank_sampler(kind, r_max=16, min_rank=1, seed=123)
    n = 40_000
    counts = Counter(s.sample()[0] for _ in range(n))
    assert set(counts) <= set(range(1, 17))
    for b, p in enumerate(probs(s), start=1):
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(counts[b] - n * p) < 5 * sd, (b, counts[b], n * p)


@pytest.mark.parametrize("kind", ["octave", "harmonic", "mixed"])
def test_same_seed_same_ranks_and_state_resumes_the_sequence(kind):
    a = build_rank_sampler(kind, r_max=16, seed=7)
    first = [a.sample(2) for _ in range(25)]
    again = build_rank_sampler(kind, r_max=16, seed=7)
    assert [again.sample(2) for _ in range(25)] == first
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.state_dict().items()}
    expected = [a.sample(4) for _ in range(50)]
    resumed = build_rank_sampler(kind, r_max=16, seed=999)  # another seed: the state decides
    resumed.load_state_dict(state)
    assert [resumed.sample(4) for _ in range(50)] == expected


@pytest.mark.parametrize("kind", ["octave", "harmonic", "mixed"])
def test_bad_min_rank_is_a_clear_error(kind):
    with pytest.raises(QdyloraError, match="min_rank"):
        build_rank_sampler(kind, r_max=8, min_rank=9)
    with pytest.raises(QdyloraError, match="min_rank"):
        compose_config("train", [f"rank_schedule={kind}", "adapter.r_max=8", "rank_schedule.min_rank=9"])


def test_every_kind_is_registered_configured_and_selectable():
    assert {*RANK_WEIGHTS, "fixed"} == set(RANK_SCHEDULES)
    for kind in RANK_SCHEDULES:
        assert (CONF / f"{kind}.yaml").exists(), kind
        if kind != "fixed":  # fixed needs mode full; checked in test_config
            assert compose_config("train", [f"rank_schedule={kind}"]).rank_schedule.kind == kind


def test_matryoshka_always_draws_r_max():
    s = build_rank_sampler("matryoshka", r_max=16, seed=3)
    assert probs(s) == [0.0] * 15 + [1.0]
    assert all(s.sample(k) == [16] * k for k in (1, 4) for _ in range(200))
    cfg = compose_config("train", ["rank_schedule=matryoshka", "adapter.r_max=16"]).rank_schedule
    assert (cfg.kind, cfg.nested_ranks, cfg.nested_weight, cfg.ranks_per_step) == ("matryoshka", [1, 2, 4, 8, 16], "one", 1)


def test_sandwich_draws_min_rank_r_max_and_the_rest_stratified():
    sandwich = build_rank_sampler("uniform", r_max=16, min_rank=2, seed=5, sandwich=True)
    plain = build_rank_sampler("uniform", r_max=16, min_rank=2, seed=5)
    for _ in range(300):
        ranks = sandwich.sample(4)
        assert ranks[0] == 2 and ranks[-1] == 16 and ranks == sorted(ranks)
        assert ranks[1:3] == plain.sample(2)  # the middle: the plain sampler's stratified draws of k - 2
    assert build_rank_sampler("octave", r_max=8, seed=0, sandwich=True).sample(2) == [1, 8]
    with pytest.raises(QdyloraError, match="ranks_per_step >= 2"):
        sandwich.sample(1)
    resumed = build_rank_sampler("uniform", r_max=16, min_rank=2, seed=0, sandwich=True)
    state = sandwich.state_dict()
    expected = [sandwich.sample(4) for _ in range(20)]
    resumed.load_state_dict(state)
    assert [resumed.sample(4) for _ in range(20)] == expected


@pytest.mark.parametrize(("overrides", "message"), [
    (["rank_schedule.nested_ranks=[1,4,99]"], r"rank_schedule.nested_ranks=.*1..adapter.r_max \(16\)"),
    (["rank_schedule.nested_ranks=halves"], "rank_schedule.nested_ranks='halves'"),
    (["rank_schedule.nested_ranks=powers", "rank_schedule.nested_weight=sqrt"], "rank_schedule.nested_weight"),
    (["rank_schedule.nested_ranks=powers", "adapter.mode=frozen"], "adapter.mode='frozen'"),
    (["rank_schedule=matryoshka", "rank_schedule.nested_ranks=null"], "kind=fixed"),
    (["rank_schedule.sandwich=true", "rank_schedule.ranks_per_step=1"], "rank_schedule.sandwich"),
    (["rank_schedule=fixed", "rank_schedule.sandwich=true", "adapter.mode=full"], "rank_schedule.sandwich"),
    (["rank_schedule.distill=1.5"], r"rank_schedule.distill=1.5: expected a number in \[0, 1\]"),
    (["optimizer.slice_lr=-1"], "optimizer.slice_lr"),
])
def test_round_2_keys_are_checked_in_one_line(overrides, message):
    with pytest.raises(QdyloraError, match=message):
        compose_config("train", ["adapter.r_max=16", *overrides])


def test_nested_ranks_spellings():
    def nested(spec, r_max=16, low=1):
        return compose_config("train", [f"adapter.r_max={r_max}", f"rank_schedule.min_rank={low}",
                                        f"rank_schedule.nested_ranks={spec}"]).rank_schedule.nested_ranks

    assert nested("powers") == [1, 2, 4, 8, 16] and nested("powers", 12) == [1, 2, 4, 8, 12]
    assert nested("powers", 16, 3) == [3, 4, 8, 16] and nested("[8,1,4,4]") == [1, 4, 8]
    assert nested("null") is None
