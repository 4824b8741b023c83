"""RankAwareAdamW's state: the 8-bit blockwise format and its rank slices, paged memory off a GPU, checkpoints
of both formats, the optimizer keys of the config, and the tiny recipe trained and resumed with 8-bit state."""

import copy
import dataclasses
import io
import logging
import shutil

import pytest
import torch
from test_adapters import R_MAX, make_adapter
from test_train import _tiny, assert_resumed_like_straight

from qdylora_cli import train
from qdylora_cli.adapters import RankAwareAdamW, adapter_parameters, optim, resolve_paged, trained_slices
from qdylora_cli.adapters.optim import (
    BLOCKSIZE,
    MOMENTS,
    dequantize_rows,
    quantize_rows,
    state_map,
    unsigned_dynamic_map,
)
from qdylora_cli.cli import compose_config
from qdylora_cli.errors import QdyloraError
from qdylora_cli.quant.nf4 import dynamic_map
from qdylora_cli.rundir import check_same_run

# Half the widest gap between neighbouring values of each map (in its top decade, 0.9/64 and 0.9/128
# apart): no value of a block is farther than this times the block's absmax from its stored value.
HALF_GAP = {"exp_avg": 0.9 / 128, "exp_avg_sq": 0.9 / 256}


def _moments_like(key, rows, length, seed=0):
    """Rows of values spread over eight decades, as Adam's moments are; the second moment non-negative."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, length, generator=g) * torch.logspace(-8, 0, length)[torch.randperm(length, generator=g)]
    return x.abs() if key == "exp_avg_sq" else x


# --- the format ------------------------------------------------------------------------------------


def test_the_maps_are_bitsandbytes_dynamic_maps():
    bnb = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(state_map("exp_avg"), bnb.create_dynamic_map(signed=True))
    assert torch.equal(state_map("exp_avg"), dynamic_map())
    assert torch.equal(state_map("exp_avg_sq"), bnb.create_dynamic_map(signed=False))
    assert torch.equal(unsigned_dynamic_map(), state_map("exp_avg_sq"))


@pytest.mark.parametrize("key", MOMENTS)
def test_quantize_dequantize_round_trip_bounds_per_block(key):
    code = state_map(key)
    x = _moments_like(key, 5, 600)  # 600 = 2 blocks of 256 and a short one of 88 per row
    x[3] = 0.0  # an all-zero row: absmax 0, zeros back
    x[4, 256:512] = 0.0  # an all-zero block among others
    codes, absmax = quantize_rows(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == (5, 600)
    assert absmax.dtype == torch.float32 and absmax.shape == (5, 3)
    back = dequantize_rows(codes, absmax, code)
    for row in range(5):
        for block in range(3):
            cut = slice(block * BLOCKSIZE, min((block + 1) * BLOCKSIZE, 600))
            values, stored, scale = x[row, cut], back[row, cut], absmax[row, block]
            assert scale == values.abs().max()
            error = (stored - values).abs()
            assert (error <= HALF_GAP[key] * scale * (1 + 1e-4)).all(), (row, block, error.max() / scale)
            # the nearest of the 256 representable values, up to float32 rounding of x / absmax
            nearest = (code[None, :] * scale - values[:, None]).abs().min(dim=1).values
            assert (error <= nearest + 1e-6 * scale).all()
            if scale == 0:
                assert stored.eq(0).all()
            elif values.max() == scale:  # the largest positive value is the map's 1.0: exact
                assert stored[values.argmax()] == values.max()


@pytest.mark.parametrize("key", MOMENTS)
def test_bitsandbytes_reads_the_8bit_state(key):
    """The same format: bitsandbytes dequantizes our codes bit for bit and finds the same absmax; its CPU
    kernel's codes are never nearer (it rounds to 65536 cells first, see optim.py)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    code = state_map(key)
    x = _moments_like(key, 1, 1000, seed=1)
    codes, absmax = quantize_rows(x, code)
    theirs = bnb.dequantize_blockwise(codes.reshape(-1).contiguous(), absmax=absmax.reshape(-1), code=code,
                                      blocksize=BLOCKSIZE)
    assert torch.equal(theirs, dequantize_rows(codes, absmax, code).reshape(-1))
    their_codes, their_state = bnb.quantize_blockwise(x.reshape(-1), code=code, blocksize=BLOCKSIZE)
    assert torch.equal(their_state.absmax, absmax.reshape(-1))
    ours_error = (dequantize_rows(codes, absmax, code) - x).abs().reshape(-1)
    their_error = (bnb.dequantize_blockwise(their_codes, their_state) - x.reshape(-1)).abs()
    assert (ours_error <= their_error + 1e-12).all()


# --- 8-bit steps -----------------------------------------------------------------------------------


def _state_bytes(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items()}


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_8bit_steps_leave_untrained_slices_and_their_state_bit_identical(mode, variant):
    adapter = make_adapter(mode=mode, variant=variant)
    opt = RankAwareAdamW(adapter_parameters([adapter]), lr=1e-2, weight_decay=0.1, state_bits=8)
    A, B = adapter.lora_A, adapter.lora_B
    for ranks in [(4,), (2,), (6,), (2, 5), (1,), (5,), (3, 3)]:  # earlier steps leave state in later-untouched slices
        adapter.rank = ranks if len(ranks) > 1 else ranks[0]
        before_a, before_b = A.detach().clone(), B.detach().clone()
        state_a, state_b = (_state_bytes(opt, p) if opt.state.get(p) else None for p in (A, B))
        adapter(torch.randn(8, 24)).pow(2).mean().backward()
        opt.mark_trained(trained_slices(ranks, mode))
        opt.step()
        opt.zero_grad(set_to_none=True)
        touched = {i for start, stop in trained_slices(ranks, mode) for i in range(start, stop)}
        for i in range(R_MAX):
            moved = (not torch.equal(before_a[i], A[i]), not torch.equal(before_b[:, i], B[:, i]))
            assert moved == ((True, True) if i in touched else (False, False)), (ranks, i)
            for before, p in ((state_a, A), (state_b, B)):
                if before is None:
                    continue
                if i not in touched:  # one row per slice in every 8-bit tensor (B's moments stored transposed)
                    for key in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
                        assert torch.equal(before[key][i], opt.state[p][key][i]), (ranks, i, key)
                counted = opt.state[p]["slice_steps"].flatten()[i] - before["slice_steps"].flatten()[i]
                assert counted == (i in touched)
    assert opt.state[A]["exp_avg_codes"].dtype == torch.uint8 and opt.state[B]["exp_avg_codes"].shape == (R_MAX, 32)
    if variant == "dora":
        assert opt.state[adapter.magnitude]["exp_avg_sq_codes"].shape == (1, 32)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_8bit_update_is_the_32bit_update_of_the_dequantized_state(mode, variant):
    """The two formats share one AdamW formula: a 32-bit optimizer given the 8-bit one's dequantized
    moments before each step moves the weights to the same bits. Only storage rounding differs."""
    adapter = make_adapter(mode=mode, variant=variant)
    twin = copy.deepcopy(adapter)
    eight = RankAwareAdamW(adapter_parameters([adapter]), lr=1e-2, weight_decay=0.1, state_bits=8)
    full = RankAwareAdamW(adapter_parameters([twin]), lr=1e-2, weight_decay=0.1)
    pairs = list(zip(eight.param_groups[0]["params"], full.param_groups[0]["params"], strict=True))
    dims = eight.param_groups[0]["slice_dims"]
    for ranks in [(4,), (2, 5), (6,), (1,), (3, 3)]:
        x = torch.randn(8, 24)
        for model in (adapter, twin):
            model.rank = ranks if len(ranks) > 1 else ranks[0]
            model(x).pow(2).mean().backward()
        for (p, q), dim in zip(pairs, dims, strict=True):
            if eight.state[p]:
                for key in MOMENTS:
                    rows = dequantize_rows(eight.state[p][f"{key}_codes"], eight.state[p][f"{key}_absmax"], state_map(key))
                    full.state[q][key] = rows.reshape(q.shape) if dim is None else rows if dim == 0 else rows.T.contiguous()
        for opt in (eight, full):
            opt.mark_trained(trained_slices(ranks, mode))
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p, q in pairs:
            assert torch.equal(p, q), ranks
            assert torch.equal(eight.state[p]["slice_steps"], full.state[q]["slice_steps"])


def _toy_fit(state_bits, steps=300, seed=0):
    """A rank-4 linear map fitted by A (8 x 48) and B (40 x 8), a random rank 1..8 per step (full mode)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 48, generator=g)
    y = x @ (torch.randn(40, 4, generator=g) @ torch.randn(4, 48, generator=g) / 4).T
    A = torch.nn.Parameter(torch.randn(8, 48, generator=g) / 48**0.5)
    B = torch.nn.Parameter(torch.zeros(40, 8))
    opt = RankAwareAdamW([(A, 0), (B, 1)], lr=1e-2, state_bits=state_bits)
    for _ in range(steps):
        b = int(torch.randint(1, 9, (1,), generator=g))
        (x @ A[:b].T @ B[:, :b].T - y).pow(2).mean().backward()
        opt.mark_trained(trained_slices(b, "full"))
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        start = y.pow(2).mean().item()
        return start, {b: (x @ A[:b].T @ B[:, :b].T - y).pow(2).mean().item() for b in (1, 4, 8)}


def test_8bit_state_converges_like_32bit_on_a_toy_regression():
    """Within 15% (+0.01) of the 32-bit losses at ranks 1, 4 and 8 after 300 steps (measured: within 10%),
    and both fit: the rank-8 loss falls below 1% of where it started."""
    start, full = _toy_fit(32)
    _, eight = _toy_fit(8)
    for b in full:
        assert abs(eight[b] - full[b]) <= 0.15 * full[b] + 0.01, (b, eight[b], full[b])
    assert full[8] < 0.01 * start and eight[8] < 0.01 * start


@pytest.mark.parametrize("state_bits", [32, 8])
def test_state_dict_round_trip_continues_bit_identically(state_bits):
    adapter = make_adapter(mode="frozen", variant="dora")
    opt = RankAwareAdamW(adapter_parameters([adapter]), lr=1e-2, weight_decay=0.1, state_bits=state_bits)

    def steps(model, optimizer, seeds):
        for seed in seeds:
            torch.manual_seed(seed)
            model.rank = seed % R_MAX + 1
            model(torch.randn(8, 24)).pow(2).mean().backward()
            optimizer.mark_trained(trained_slices(model.rank, "frozen"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    steps(adapter, opt, [0, 1, 2])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as a checkpoint's optimizer.pt
    resumed = copy.deepcopy(adapter)
    again = RankAwareAdamW(adapter_parameters([resumed]), lr=1e-2, weight_decay=0.1, state_bits=state_bits)
    buffer.seek(0)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    steps(adapter, opt, [3, 4, 5])
    steps(resumed, again, [3, 4, 5])
    for p, q in zip(opt.param_groups[0]["params"], again.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == again.state[q].keys()
        for key, value in opt.state[p].items():
            assert value.dtype == again.state[q][key].dtype and torch.equal(value, again.state[q][key]), key
    assert again.param_groups[0]["state_bits"] == state_bits


def test_a_state_saved_with_other_bits_is_refused():
    adapter = make_adapter()
    opt = RankAwareAdamW(adapter_parameters([adapter]), state_bits=32)
    adapter.rank = 3
    adapter(torch.randn(4, 24)).sum().backward()
    opt.step()
    eight = RankAwareAdamW(adapter_parameters([copy.deepcopy(adapter)]), state_bits=8)
    with pytest.raises(QdyloraError, match="32-bit but optimizer.state_bits=8"):
        eight.load_state_dict(opt.state_dict())
    with pytest.raises(QdyloraError, match="optimizer.state_bits=4"):
        RankAwareAdamW(adapter_parameters([adapter]), state_bits=4)


# --- paged state off a GPU -------------------------------------------------------------------------


def test_paged_resolves_off_without_cuda_and_says_so_only_when_asked(caplog):
    with caplog.at_level(logging.INFO, logger="qdylora_cli.adapters.optim"):
        assert resolve_paged("auto", "cpu") is False
        assert resolve_paged("false", "cpu") is False
        assert not caplog.records
        assert resolve_paged("true", "cpu") is False
    assert [r.getMessage() for r in caplog.records] == [
        "optimizer.paged=true: no CUDA device (cpu), nothing to page; the optimizer state is ordinary CPU memory"]


def test_paged_on_a_gpu_falls_back_with_one_line_where_it_cannot_work(caplog, monkeypatch):
    """auto is on with CUDA; without bitsandbytes, where it cannot allocate, or under FSDP it is off and says why
    (checked on a CPU: a CUDA device is only named here, never used)."""

    def no_managed_memory(*args):
        raise RuntimeError("cudaMallocManaged failed\nmore detail")

    monkeypatch.setattr(optim, "_paged_full", no_managed_memory)
    with caplog.at_level(logging.INFO, logger="qdylora_cli.adapters.optim"):
        assert resolve_paged("auto", "cuda:0") is False
        assert resolve_paged("true", "cuda:0", fsdp=True) is False
        monkeypatch.setattr(optim, "import_bitsandbytes", lambda: None)
        assert resolve_paged("auto", "cuda:0") is False
        assert resolve_paged("false", "cuda:0") is False
    assert [r.getMessage() for r in caplog.records] == [
        "optimizer.paged=auto: bitsandbytes cannot allocate paged memory here (cudaMallocManaged failed); the "
        "optimizer state is ordinary GPU memory",
        "optimizer.paged=true: FSDP shards the optimizer state over the GPUs instead; the optimizer state is "
        "ordinary GPU memory",
        "optimizer.paged=auto: bitsandbytes, which allocates paged memory, is not installed; the optimizer state "
        "is ordinary GPU memory"]


@pytest.mark.parametrize("state_bits", [32, 8])
def test_paged_bookkeeping_with_a_stand_in_for_unified_memory(state_bits, monkeypatch):
    """What the GPU path does around bitsandbytes, run on CPU with ordinary memory standing in for unified
    memory: the large moments (not absmax, not step counts) are allocated through it, every step prefetches
    each of them (the first allocated last), training is unchanged, and loading a state copies into the
    buffers there are (bitsandbytes never frees them) or allocates once per moment."""
    allocated, prefetched = [], []

    def stand_in(shape, fill, dtype, device):
        tensor = torch.full(shape, fill, dtype=dtype, device=device)
        allocated.append(tensor)
        return tensor, ("handle", len(allocated) - 1)

    monkeypatch.setattr(optim, "_UNIFIED", ("cuda", "cpu"))
    monkeypatch.setattr(optim, "_MIN_PAGED", 100)  # A (6 x 24) and B (32 x 6) paged, the magnitude (32) not
    monkeypatch.setattr(optim, "_paged_full", stand_in)
    monkeypatch.setattr(optim, "_bnb_functional",
                        lambda: type("F", (), {"prefetch_tensor": staticmethod(prefetched.append)}))
    adapter, plain = make_adapter(variant="dora"), make_adapter(variant="dora")
    opts = [RankAwareAdamW(adapter_parameters([m]), lr=1e-2, state_bits=state_bits, paged=paged)
            for m, paged in ((adapter, True), (plain, False))]

    def step(model, opt, b):
        torch.manual_seed(b)
        model.rank = b
        model(torch.randn(8, 24)).pow(2).mean().backward()
        opt.mark_trained(trained_slices(b, "frozen"))
        opt.step()
        opt.zero_grad(set_to_none=True)

    def moments(opt):
        keys = ("exp_avg", "exp_avg_sq") if state_bits == 32 else ("exp_avg_codes", "exp_avg_sq_codes")
        return [opt.state[p][k] for p in opt.param_groups[0]["params"][:2] for k in keys]

    for b in (3, 5):
        step(adapter, opts[0], b)
        step(plain, opts[1], b)
    assert len(allocated) == 4 and all(a is b for a, b in zip(moments(opts[0]), allocated, strict=True))
    assert prefetched == [("handle", 3), ("handle", 2), ("handle", 1), ("handle", 0)]  # at step 2
    assert not any(any(v is a for a in allocated) for v in opts[0].state[adapter.magnitude].values())
    for p, q in zip(opts[0].param_groups[0]["params"], opts[1].param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(v, opts[1].state[q][k]) for k, v in opts[0].state[p].items())
    saved = copy.deepcopy(opts[0].state_dict())
    step(adapter, opts[0], 2)
    opts[0].load_state_dict(saved)  # into the buffers it has: no new allocation
    assert len(allocated) == 4 and all(a is b for a, b in zip(moments(opts[0]), allocated, strict=True))
    assert [h for _, h in opts[0]._paged] == [("handle", i) for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(moments(opts[0]), moments(opts[1]), strict=True))
    fresh = RankAwareAdamW(adapter_parameters([copy.deepcopy(adapter)]), lr=1e-2, state_bits=state_bits, paged=True)
    fresh.load_state_dict(saved)  # a resume: one allocation per moment
    assert len(allocated) == 8 and all(a is b for a, b in zip(moments(fresh), allocated[4:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(moments(fresh), moments(opts[1]), strict=True))


def test_paged_true_on_cpu_trains_logs_once_and_keeps_plain_tensors(tmp_path, caplog, monkeypatch):
    built = []

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", build)
    with caplog.at_level(logging.INFO):
        train.run(_tiny(tmp_path / "run", "optimizer.paged=true", "optimizer.state_bits=8", "train.max_steps=2"))
    lines = [r.getMessage() for r in caplog.records if "optimizer.paged" in r.getMessage()]
    assert lines == ["optimizer.paged=true: no CUDA device (cpu), nothing to page; the optimizer state is "
                     "ordinary CPU memory"]
    opt = built[0]
    assert opt.paged is False and opt._paged == []
    values = [v for state in opt.state.values() for v in state.values()]
    assert values and all(type(v) is torch.Tensor and v.device.type == "cpu" for v in values)
    assert {v.dtype for v in values} == {torch.uint8, torch.float32}


# --- config and the training loop --------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("optimizer.state_bits=4", "optimizer.state_bits=4: expected 32 or 8 (bits per Adam moment value)"),
    ("optimizer.state_bits=eight", "optimizer.state_bits: expected an integer, got 'eight'"),
    ("optimizer.paged=maybe", "optimizer.paged='maybe': expected one of auto, true, false"),
])
def test_bad_optimizer_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(QdyloraError) as error:
        compose_config("train", ["+recipe=tiny", override])
    assert str(error.value) == message


def test_optimizer_keys_read_yaml_booleans_and_default_to_32_bit_auto():
    cfg = compose_config("train", ["+recipe=tiny"])
    assert (cfg.optimizer.state_bits, cfg.optimizer.paged) == (32, "auto")
    assert compose_config("train", ["+recipe=tiny", "optimizer.paged=true"]).optimizer.paged == "true"
    assert compose_config("train", ["+recipe=tiny", "optimizer.paged=False"]).optimizer.paged == "false"


def test_tiny_recipe_with_8bit_state_resumes_bit_identical(tmp_path):
    eight = ("optimizer.state_bits=8", "adapter.mode=frozen", "adapter.variant=dora")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train.run(_tiny(straight, *eight))
    train.run(_tiny(crashed, *eight))
    saved = torch.load(crashed / "checkpoints" / "step-3" / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["state_bits"] == 8
    assert {v.dtype for s in saved["state"].values() for k, v in s.items() if k.endswith("_codes")} == {torch.uint8}
    shutil.rmtree(crashed / "adapter")
    shutil.rmtree(crashed / "checkpoints" / "step-6")
    # 32 is the default, so a resume command line cannot even say it; a config that does is refused
    other = _tiny(crashed, *eight, "train.resume=true")
    other = dataclasses.replace(other, optimizer=dataclasses.replace(other.optimizer, state_bits=32))
    with pytest.raises(QdyloraError, match="optimizer.state_bits would change from 8 to 32"):
        check_same_run(other, crashed)
    # where the moments live may change on resume (on a CPU paging is off either way)
    train.run(_tiny(crashed, "train.resume=true", "optimizer.paged=false"))
    assert_resumed_like_straight(straight, crashed)
    last = torch.load(crashed / "checkpoints" / "step-6" / "optimizer.pt", weights_only=True)
    first = torch.load(straight / "checkpoints" / "step-6" / "optimizer.pt", weights_only=True)
    for index, state in first["state"].items():
        for key, value in state.items():
            assert torch.equal(value, last["state"][index][key]), (index, key)


def test_8bit_state_with_fsdp_is_refused_in_one_line_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_fsdp2", lambda accelerator: True)
    monkeypatch.setattr(train, "build_training_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(QdyloraError) as error:
        train.run(_tiny(tmp_path / "run", "optimizer.state_bits=8"))
    assert str(error.value).startswith("optimizer.state_bits=8 does not work with FSDP") and "\n" not in str(error.value)


@pytest.mark.parametrize("state_bits", [32, 8])
def test_slice_lr_scales_each_slice_step_by_its_rarity(state_bits):
    """γ = slice_lr: a slice trained n_i times moves (n_max/n_i)^γ times as far as plain rank-aware AdamW
    moves it; untrained slices stay bit-identical; γ = 0 is plain rank-aware AdamW."""
    gamma = 0.7
    torch.manual_seed(0)
    A0, B0 = torch.randn(4, 3), torch.randn(5, 4)
    grads = [(torch.randn(4, 3), torch.randn(5, 4)) for _ in range(3)]
    marks = [[(0, 4)], [(0, 2)], [(0, 4)]]  # counts after them: 3, 3, 2, 2

    def run(slice_lr, steps):
        A, B = torch.nn.Parameter(A0.clone()), torch.nn.Parameter(B0.clone())
        opt = RankAwareAdamW([(A, 0), (B, 1)], lr=1e-2, state_bits=state_bits, slice_lr=slice_lr)
        for (ga, gb), mark in list(zip(grads, marks))[:steps]:
            A.grad, B.grad = ga.clone(), gb.clone()
            opt.mark_trained(mark)
            opt.step()
        return A.detach(), B.detach()

    for steps in (1, 2):  # every trained slice as often as the most-trained one: factor 1, the plain update
        for got, want in zip(run(gamma, steps), run(0.0, steps)):
            assert torch.equal(got, want)
    before = run(0.0, 2)
    plain, scaled = run(0.0, 3), run(gamma, 3)
    factor = torch.tensor([1.0, 1.0, 1.5 ** gamma, 1.5 ** gamma])
    # The moves (~1e-2) are differences of float32 parameters of magnitude ~1: each carries a rounding of
    # ~1e-7, far below the factor's effect (1.5^0.7 = 1.33).
    torch.testing.assert_close(scaled[0] - before[0], (plain[0] - before[0]) * factor[:, None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled[1] - before[1], (plain[1] - before[1]) * factor[None, :], rtol=1e-5, atol=1e-6)
    after_two = run(gamma, 2)  # step 2 trained slices 0, 1: slices 2, 3 did not move in it
    after_one = run(gamma, 1)
    assert torch.equal(after_two[0][2:], after_one[0][2:]) and torch.equal(after_two[1][:, 2:], after_one[1][:, 2:])
    with pytest.raises(QdyloraError, match="slice_lr"):
        RankAwareAdamW([(torch.nn.Parameter(A0.clone()), 0)], slice_lr=-0.5)
