"""train.cpu_threads=auto: free cores, one per THREAD_MACS of work; the user's count and a resumed run's kept."""

import logging

import pytest
import torch

from qdylora_cli import threads
from qdylora_cli.threads import auto_threads, busy_cores, set_cpu_threads


@pytest.fixture
def four_cores(monkeypatch):
    """A machine whose torch default is 4 threads, no thread count set by the user; restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 4)
    monkeypatch.setattr(threads, "_chosen", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("tokens", "hidden", "busy", "expected"), [
    (1024, 64, 0, 2),      # stories260K, 8 x 128 tokens: 4.2M multiply-accumulates, 2 threads' work
    (1024, 64, 3, 1),      # the same with 3 of 4 cores busy
    (1024, 4096, 0, 4),    # a 7B layer: all cores
    (1024, 4096, 2, 2),    # ... of those free
    (1024, 4096, 9, 1),    # an overloaded machine: still one
    (16, 64, 0, 1),        # tiny work: one
])
def test_auto_takes_free_cores_one_per_share_of_work(four_cores, tokens, hidden, busy, expected):
    assert auto_threads(hidden, tokens, busy) == expected


def test_busy_cores_reads_the_fewest_runnable_threads_less_this_one(monkeypatch):
    samples = iter(["0.5 0.4 0.3 3/90 123", "0.5 0.4 0.3 2/90 123", "0.5 0.4 0.3 4/90 123"])

    class FakeLoadavg:
        def __init__(self, path):
            assert str(path) == "/proc/loadavg"

        def exists(self):
            return True

        def read_text(self):
            return next(samples)

    monkeypatch.setattr(threads, "Path", FakeLoadavg)
    assert busy_cores(samples=3, interval_s=0) == 1  # 2 runnable at the quietest sample, one of them us


def test_auto_on_a_quiet_machine_uses_the_cores_and_says_why(four_cores, monkeypatch, caplog):
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)
    with caplog.at_level(logging.INFO, logger="qdylora_cli.threads"):
        assert set_cpu_threads("train.cpu_threads", "auto", hidden_size=4096, tokens=1024) == 3
    assert torch.get_num_threads() == 3
    assert "CPU threads: 3 of 4 (1 core(s) busy with other work" in caplog.text


def test_a_resumed_run_keeps_its_first_count(four_cores, monkeypatch, caplog):
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    with caplog.at_level(logging.INFO, logger="qdylora_cli.threads"):
        assert set_cpu_threads("train.cpu_threads", "auto", hidden_size=4096, tokens=1024, resumed=1) == 1
    assert torch.get_num_threads() == 1 and "so that resuming is bit-identical" in caplog.text


def test_a_count_the_user_set_wins(four_cores, monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="qdylora_cli.threads"):
        assert set_cpu_threads("train.cpu_threads", "auto", hidden_size=4096, tokens=1024) == 2
    assert "OMP_NUM_THREADS=2; train.cpu_threads=auto leaves it" in caplog.text
    assert set_cpu_threads("train.cpu_threads", 3, hidden_size=64, tokens=16) == 3  # an explicit count applies
    assert torch.get_num_threads() == 3
