"""A rank per module: forward, merge and PEFT export against hand computations; the budgeted search
(knapsack, determinism, budget) and `qdylora allocate` / `qdylora export allocation=PATH` on a tiny run."""

import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F
from runners import qdylora
from transformers import AutoModelForCausalLM, LlamaConfig

from qdylora_cli import train
from qdylora_cli.adapters import (
    adapter_state_dict,
    inject_adapters,
    iter_adapters,
    merge_adapters,
    rank_scale,
    set_chunk_ranks,
    set_rank,
)
from qdylora_cli.allocate import compare_with_uniform, ranks_by_layer
from qdylora_cli.allocation import ModuleShape, allocation_params, run_module_shapes, uniform
from qdylora_cli.cli import compose_config
from qdylora_cli.config import candidate_ranks
from qdylora_cli.errors import QdyloraError
from qdylora_cli.export import peft_adapter, peft_module_pattern
from qdylora_cli.loading import quantize_model
from qdylora_cli.model import load_run_model
from qdylora_cli.rank_search import MeasuredLosses, knapsack, search

# --- a rank per module in forward, multi-allocation passes and merge -----------------------------------


def _small_llama(layers=2, seed=0):
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=40, max_position_embeddings=32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()


def _adapted(variant="lora", scale="rank_stabilized", layers=2, r_max=4, alpha=8.0, nf4=False):
    """A small Llama with adapters whose B is random (a fresh B is zero and would hide mistakes)."""
    model = _small_llama(layers)
    if nf4:
        model = quantize_model(model, dtype=torch.float32)
    inject_adapters(model, r_max=r_max, alpha=alpha, variant=variant, scale=scale)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, adapter in iter_adapters(model):
            adapter.lora_B.normal_(0, 0.5)
            if variant == "dora":
                adapter.magnitude.mul_(torch.rand_like(adapter.magnitude) + 0.5)
    return model


def _mixed(model, seed=0, low=0):
    rng = random.Random(seed)
    return {name: rng.randint(low, a.r_max) for name, a in iter_adapters(model)}


def test_a_rank_per_module_equals_the_hand_computation_in_every_layer():
    model = _adapted()
    allocation = _mixed(model)
    assert len(set(allocation.values())) > 2
    set_rank(model, allocation)
    for name, adapter in iter_adapters(model):
        b, w, x = allocation[name], adapter.base.weight, torch.randn(3, adapter.in_features)
        expected = F.linear(x, w)
        if b:
            expected = expected + rank_scale("rank_stabilized", 8.0, 4, b) * x @ adapter.lora_A[:b].T @ adapter.lora_B[:, :b].T
        torch.testing.assert_close(adapter(x), expected)
    with pytest.raises(QdyloraError, match="1 missing"):
        set_rank(model, dict(list(allocation.items())[1:]))
    with pytest.raises(QdyloraError, match="1 unknown"):
        set_rank(model, {**allocation, "nope": 1})
    assert {a.rank for _, a in iter_adapters(model)} == set(allocation.values()), "a refused mapping changes nothing"


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_allocations_sharing_a_forward_equal_each_alone(variant):
    model = _adapted(variant)
    choices = [_mixed(model, 0), 3, _mixed(model, 1, low=1), 0]
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        set_chunk_ranks(model, choices)
        together = model(input_ids=ids.repeat(len(choices), 1)).logits
        for i, choice in enumerate(choices):
            set_chunk_ranks(model, [choice])
            torch.testing.assert_close(together[2 * i : 2 * i + 2], model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_with_a_rank_per_module_equals_the_adapted_model(variant):
    model = _adapted(variant, nf4=True)
    allocation = _mixed(model)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    set_rank(model, allocation)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merge_adapters(model, allocation)
        assert not list(iter_adapters(model))
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(QdyloraError, match="must name every adapted module and no other"):
        merge_adapters(_adapted(variant), {"nope": 1})


# --- PEFT export with rank_pattern ---------------------------------------------------------------------


def test_rank_pattern_keys_match_their_module_alone():
    from peft.utils.other import get_pattern_key

    names = ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "model.layers.1.mlp.q_proj"]
    keys = [peft_module_pattern(n) for n in names]
    for name in names:  # PEFT picks the first key that matches: each name must find its own
        assert [k for k in keys if get_pattern_key([k], name) == k] == [peft_module_pattern(name)]
    assert get_pattern_key([peft_module_pattern("layers.1.q")], "layers.1xq") == "layers.1xq", "dots are literal"


@pytest.mark.parametrize("scale", ["alpha_over_rank", "rank_stabilized", "constant"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_peft_export_with_rank_pattern_equals_our_model(variant, scale, tmp_path):
    """12 layers, so a key of layer 1 that also matched layer 11 would load the wrong shape or scale."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file

    model = _adapted(variant, scale, layers=12)
    allocation = _mixed(model, seed=3)
    allocation["model.layers.1.self_attn.q_proj"], allocation["model.layers.11.self_attn.q_proj"] = 1, 4
    allocation["model.layers.2.mlp.up_proj"] = 0  # no adapter on this one
    names = [name for name, _ in iter_adapters(model)]
    meta = {"target_modules": names, "variant": variant, "scale": scale, "alpha": 8.0, "r_max": 4, "base_model": "x"}
    state, config = peft_adapter(adapter_state_dict(model), meta, allocation)
    assert config["rank_pattern"] and "model.layers.2.mlp.up_proj" not in config["target_modules"]
    # Plain LoRA fields: lora_alpha/r is s(r), and no alpha_pattern at any scale: a module at another
    # rank b carries s(b)·b/lora_alpha in its B, so one lora_alpha over each module's rank gives s(b).
    assert config["use_rslora"] is False and config["alpha_pattern"] == {}
    r = config["r"]
    assert config["lora_alpha"] / r == pytest.approx(rank_scale(scale, 8.0, 4, r), rel=1e-6)
    keys = {peft_module_pattern(name): b for name, b in allocation.items() if b}
    assert config["rank_pattern"] == {key: b for key, b in keys.items() if b != r}
    weights = adapter_state_dict(model)
    for name, b in allocation.items():  # modules at r keep B bit for bit; the others differ by their factor
        if b:
            stored = state[f"base_model.model.{name}.lora_B.weight"]
            factor = rank_scale(scale, 8.0, 4, b) * b / config["lora_alpha"]
            assert torch.equal(stored, weights[f"{name}.lora_B"][:, :b]) if b == r or scale == "alpha_over_rank" else (
                torch.allclose(stored, weights[f"{name}.lora_B"][:, :b] * factor, rtol=1e-6, atol=0))
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    theirs = peft.PeftModel.from_pretrained(_small_llama(12), str(tmp_path)).eval()
    set_rank(model, allocation)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, theirs(input_ids=ids).logits
        uniform_4 = (set_rank(model, 4), model(input_ids=ids).logits)[1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - uniform_4).abs().max() > 1e-3, "the allocation must differ from a uniform rank, or this proves nothing"
    for name, b in allocation.items():  # PEFT read rank_pattern: each layer's own rank, lora_alpha/b
        if b:
            layer = theirs.base_model.model.get_submodule(name)
            assert layer.r["default"] == b
            assert layer.scaling["default"] == pytest.approx(config["lora_alpha"] / b, rel=1e-6)

    if variant == "lora":
        # llama.cpp: each tensor's own rank, one lora_alpha for all (convert_lora_to_gguf.py reads nothing else)
        assert torch.allclose(_runtime(state, config, ids, per_tensor_rank=True), expected, rtol=1e-5, atol=1e-5)
        # vLLM: one lora_alpha/r for every module: wrong for mixed ranks, exact once padded to one rank
        assert not torch.allclose(_runtime(state, config, ids, per_tensor_rank=False), expected, rtol=1e-3, atol=1e-3)
        padded, padded_config = peft_adapter(weights, meta, allocation, pad=True)
        assert padded_config["rank_pattern"] == {} and padded_config["r"] == 4 == max(allocation.values())
        assert {t.shape[0] for k, t in padded.items() if k.endswith("lora_A.weight")} == {4}
        assert padded_config["target_modules"] == config["target_modules"]  # rank 0 still has no adapter
        # padded B carries s(b)·R/lora_alpha, rounded once more than B at its own rank: float32-sized differences
        torch.testing.assert_close(_runtime(padded, padded_config, ids, per_tensor_rank=False), expected, rtol=1e-4, atol=5e-5)
        save_file(padded, str(tmp_path / "adapter_model.safetensors"))
        (tmp_path / "adapter_config.json").write_text(json.dumps(padded_config))
        theirs = peft.PeftModel.from_pretrained(_small_llama(12), str(tmp_path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-4, atol=5e-5)


def _runtime(state, config, ids, per_tensor_rank):
    """A runtime that adds (lora_alpha / rank)·B·A to each weight, rank being each tensor's own (llama.cpp)
    or the config's r (vLLM, which reads no rank_pattern); rank_pattern and alpha_pattern are never read."""
    model = _small_llama(12)
    with torch.no_grad():
        for name in config["target_modules"]:
            a, b = state[f"base_model.model.{name}.lora_A.weight"], state[f"base_model.model.{name}.lora_B.weight"]
            rank = b.shape[1] if per_tensor_rank else config["r"]
            model.get_submodule(name).weight += (config["lora_alpha"] / rank) * (b @ a)
        return model(input_ids=ids).logits


# --- the search ----------------------------------------------------------------------------------------


def test_knapsack_is_exact_and_respects_the_capacity():
    rng = random.Random(0)
    for _ in range(40):
        groups = rng.randint(1, 4)
        costs = [sorted(rng.sample(range(0, 30), 3)) for _ in range(groups)]
        values = [[rng.uniform(-1, 1) for _ in range(3)] for _ in range(groups)]
        capacity = rng.randint(0, 60)
        feasible = [(sum(values[m][j] for m, j in enumerate(p)), p) for p in itertools.product(range(3), repeat=groups)
                    if sum(costs[m][j] for m, j in enumerate(p)) <= capacity]
        picks = knapsack(costs, values, capacity)
        if not feasible:
            assert picks is None
            continue
        assert sum(costs[m][j] for m, j in enumerate(picks)) <= capacity
        assert sum(values[m][j] for m, j in enumerate(picks)) == pytest.approx(min(feasible)[0])


def test_knapsack_with_coarse_units_still_respects_the_capacity(monkeypatch):
    monkeypatch.setattr("qdylora_cli.rank_search.MAX_UNITS", 7)
    costs, values = [[0, 13, 29], [0, 17, 31]], [[0, -1, -2], [0, -1.5, -2.5]]
    picks = knapsack(costs, values, 45)
    assert sum(costs[m][j] for m, j in enumerate(picks)) <= 45


SHAPES = [ModuleShape(f"layers.{i}.{kind}", n_in, n_out) for i in range(3)
          for kind, n_in, n_out in (("q", 8, 8), ("up", 8, 20))]


def _additive_loss(allocation):
    """A loss whose module terms add up: the search must then find the knapsack optimum exactly."""
    weight = {s.name: 1.0 + 0.7 * i for i, s in enumerate(SHAPES)}
    return sum(weight[n] / (1 + b) for n, b in allocation.items())


@pytest.mark.parametrize("budget", [0.125, 0.3, 0.5, 0.9])
def test_search_finds_the_optimum_of_an_additive_loss_within_the_budget(budget):
    calls = []

    def measure(allocations):
        calls.append(len(allocations))
        return [_additive_loss(a) for a in allocations]

    full = allocation_params(SHAPES, uniform(SHAPES, 8))
    capacity = int(budget * full)
    result = search(SHAPES, [1, 2, 4, 8], capacity, MeasuredLosses(SHAPES, measure), r_max=8, rounds=6)
    assert result.params == allocation_params(SHAPES, result.allocation) <= capacity
    best = min(_additive_loss(dict(zip([s.name for s in SHAPES], ranks)))
               for ranks in itertools.product([1, 2, 4, 8, result.start_rank], repeat=len(SHAPES))
               if allocation_params(SHAPES, dict(zip([s.name for s in SHAPES], ranks))) <= capacity)
    assert result.loss == pytest.approx(best)
    assert result.loss <= _additive_loss(uniform(SHAPES, result.start_rank))
    assert max(calls) > 1, "allocations are measured in batches"


def test_search_never_measures_an_allocation_twice():
    seen = []

    def measure(allocations):
        keys = [tuple(a.values()) for a in allocations]
        assert not set(keys) & set(seen)
        seen.extend(keys)
        return [_additive_loss(a) + 0.01 * sum(a.values()) ** 0.5 for a in allocations]

    search(SHAPES, [1, 2, 4, 8], int(0.25 * allocation_params(SHAPES, uniform(SHAPES, 8))),
           MeasuredLosses(SHAPES, measure), r_max=8, rounds=4)


def test_compare_with_uniform():
    rows = [{"rank": b, "params": 10 * b, "loss": 5.0 - b} for b in (1, 2, 3, 4)]
    compared = compare_with_uniform(25, rows)
    assert compared["same_or_more"]["rank"] == 3 and compared["interpolated_loss"] == pytest.approx(2.5)
    assert compared["best"]["rank"] == 4
    assert compare_with_uniform(30, rows)["interpolated_loss"] == 2.0
    assert compare_with_uniform(5, rows)["interpolated_loss"] is None


def test_candidate_ranks_and_the_layer_grid():
    assert candidate_ranks("pow2", 16) == [1, 2, 4, 8, 16] and candidate_ranks("pow2", 12) == [1, 2, 4, 8, 12]
    assert candidate_ranks("[0,2,4]", 8) == [0, 2, 4]
    layers, kinds, grid = ranks_by_layer({"model.layers.0.self_attn.q_proj": 2, "model.layers.0.mlp.up_proj": 4,
                                          "model.layers.1.self_attn.q_proj": 1, "model.layers.1.mlp.up_proj": 8})
    assert layers == ["model.layers.0", "model.layers.1"] and kinds == ["q_proj", "up_proj"]
    assert grid["model.layers.1", "up_proj"] == 8


# --- the commands on a tiny run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("allocate") / "run"
    train.run(compose_config("train", ["+recipe=tiny", f"run_dir={run_dir}", "train.save_every=0", "train.eval_every=0",
                                       "train.batch_size=8", "train.max_steps=30"]))
    return run_dir


FAST = ("search_examples=8", "rounds=2", "configs_per_pass=12")


def test_allocate_is_deterministic_respects_the_budget_and_writes_its_results(tiny_run, capsys):
    outs = [tiny_run / "alloc-a", tiny_run / "alloc-b"]
    for out in outs:
        assert qdylora("allocate", f"run_dir={tiny_run}", "budget=0.3", f"out_dir={out}", *FAST) == 0
    first, second = (json.loads((o / "allocation.json").read_text()) for o in outs)
    assert first == second, "the same run and settings must give the same allocation"
    summary = json.loads((outs[0] / "summary.json").read_text())
    shapes, meta = run_module_shapes(tiny_run)
    full = allocation_params(shapes, uniform(shapes, 8))
    assert summary["params"] == allocation_params(shapes, first) <= summary["capacity"] == int(0.3 * full)
    assert summary["search"]["loss"] <= summary["search"]["rounds"][0]["reference_loss"], "never worse than its start"
    assert [r["rank"] for r in summary["uniform"]["rows"]] == list(range(1, 9))
    assert (outs[0] / "allocation.png").read_bytes()[:4] == b"\x89PNG"
    assert (outs[0] / "sensitivity.csv").read_text().startswith("module,rank,loss_change")
    printed = capsys.readouterr().out
    assert "rank per layer" in printed and "uniform rank" in printed and "qdylora export" in printed

    # the check loss is the loss of that allocation on the second half of the validation examples
    model, tokenizer, _ = load_run_model(tiny_run)
    from qdylora_cli.allocate import split_data
    from qdylora_cli.data import eval_batches, pad_token_id
    from qdylora_cli.multirank import allocation_losses
    from qdylora_cli.rundir import load_run_config

    cfg = compose_config("allocate", [f"run_dir={tiny_run}", "budget=0.3", *FAST])
    _, check, _ = split_data(cfg, load_run_config(tiny_run), tokenizer)
    set_rank(model, first)
    total = count = 0
    with torch.no_grad():
        for e in check:
            labels = torch.tensor(e["labels"][1:])
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert summary["loss"] == pytest.approx(total / count, rel=1e-5)
    assert allocation_losses(model, eval_batches(check, 8, pad_token_id(tokenizer)), [first])[0] == pytest.approx(summary["loss"])


def test_allocate_with_a_tolerance_and_on_training_data(tiny_run):
    out = tiny_run / "alloc-tol"
    assert qdylora("allocate", f"run_dir={tiny_run}", "tolerance=0.05", "search_data=train", f"out_dir={out}",
                   "ranks=[2,4,8]", *FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    tried = summary["tolerance_search"]
    assert summary["search"]["loss"] <= tried["target_loss"]
    assert all(t["params"] >= summary["params"] for t in tried["budgets_tried"] if t["loss"] <= tried["target_loss"])
    assert "training examples" in summary["search"]["data"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "budget is required"),
        (["budget=0"], "budget=0.0: expected a share of the r_max adapter's parameters in (0, 1]"),
        (["budget=1.5"], "budget=1.5: expected a share"),
        (["budget=-0.2"], "budget=-0.2: expected a share"),
        (["budget=quarter"], "budget: expected a number, got 'quarter'"),
        (["budget=0.25", "tolerance=0.01"], "budget and tolerance: set only one"),
        (["budget_params=0"], "budget_params=0: expected a number >= 1"),
        (["budget_params=100"], "budget_params=100: 100 parameters are fewer than the smallest allocation"),
        (["budget=0.01"], "fewer than the smallest allocation, every layer at rank 1"),
        (["tolerance=-1"], "tolerance=-1.0: expected a number >= 0"),
        (["budget=0.25", "ranks=[0]"], "ranks=[0]: expected at least one rank >= 1"),
        (["budget=0.25", "ranks=1..99"], "ranks='1..99': rank 99 is above the run's adapter.r_max (8)"),
        (["budget=0.25", "search_data=test"], "search_data='test': expected one of validation, train"),
        (["budget=0.25", "rounds=0"], "rounds=0: expected a number >= 1"),
    ],
)
def test_bad_budgets_are_one_line_errors_and_write_nothing(tiny_run, capsys, args, message):
    out = tiny_run / "never"
    assert qdylora("allocate", f"run_dir={tiny_run}", f"out_dir={out}", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


# --- export allocation=PATH ----------------------------------------------------------------------------


def _write_allocation(run_dir, name, allocation):
    path = run_dir / f"{name}.json"
    path.write_text(json.dumps(allocation))
    return path


def test_export_an_allocation_as_peft_and_merged(tiny_run, capsys):
    peft = pytest.importorskip("peft")
    shapes, _ = run_module_shapes(tiny_run)
    allocation = {s.name: [1, 8, 3, 0][i % 4] for i, s in enumerate(shapes)}
    path = _write_allocation(tiny_run, "mixed", allocation)
    params = allocation_params(shapes, allocation)
    assert qdylora("export", f"run_dir={tiny_run}", f"allocation={path}") == 0
    assert "serve it with vLLM --max-lora-rank 8 or more (its largest rank is 8)" in capsys.readouterr().out
    assert qdylora("export", f"run_dir={tiny_run}", f"allocation={path}", "format=merged") == 0
    peft_dir, merged_dir = (tiny_run / "export" / f"allocation-{params}params-{f}" for f in ("peft", "merged"))

    model, _, _ = load_run_model(tiny_run)  # the NF4 run at this allocation
    set_rank(model, allocation)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert json.loads((merged_dir / "qdylora_export.json").read_text())["allocation"] == allocation
    assert qdylora("eval", f"run_dir={merged_dir}") == 2
    assert "is a merged export of an allocation" in capsys.readouterr().err

    # PEFT on the unquantized base equals our adapters on the same unquantized base
    base = tiny_run / "base_model"
    ours = AutoModelForCausalLM.from_pretrained(base).eval()
    _, meta = run_module_shapes(tiny_run)
    inject_adapters(ours, r_max=8, alpha=meta["alpha"], variant=meta["variant"], scale=meta["scale"])
    from qdylora_cli.adapters import load_adapter_state_dict
    from qdylora_cli.rundir import load_adapter

    load_adapter_state_dict(ours, load_adapter(tiny_run / "adapter")[0])
    set_rank(ours, allocation)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(peft_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a readable JSON file"),
        ("[1, 2]", "expected a JSON object of module name -> rank"),
        ("DROP", "1 adapted module(s) missing, e.g. model.layers"),
        ("EXTRA", "1 name(s) the run does not adapt, e.g. lm_head"),
        ("NINE", "rank 9 is not an integer in 0..8"),
        ("ZERO", "every rank is 0"),
    ],
)
def test_export_refuses_a_bad_allocation_in_one_line(tiny_run, capsys, content, message):
    shapes, _ = run_module_shapes(tiny_run)
    good = {s.name: 2 for s in shapes}
    variants = {"DROP": dict(list(good.items())[1:]), "EXTRA": {**good, "lm_head": 1},
                "NINE": {**good, shapes[0].name: 9}, "ZERO": dict.fromkeys(good, 0)}
    path = tiny_run / "bad.json"
    path.write_text(json.dumps(variants[content]) if content in variants else content)
    out = tiny_run / "never"
    assert qdylora("export", f"run_dir={tiny_run}", f"allocation={path}", f"out_dir={out}") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_export_takes_a_rank_or_an_allocation(tiny_run):
    path = _write_allocation(tiny_run, "some", {s.name: 2 for s in run_module_shapes(tiny_run)[0]})
    cfg = compose_config("export", [f"run_dir={tiny_run}", f"allocation={path}"])
    assert cfg.rank is None and cfg.allocation == str(path)
    with pytest.raises(QdyloraError, match="rank=4: expected no rank with allocation="):
        compose_config("export", [f"run_dir={tiny_run}", f"allocation={path}", "rank=4"])
    with pytest.raises(QdyloraError, match="allocation='nope.json': expected an allocation.json file"):
        compose_config("export", [f"run_dir={tiny_run}", "allocation=nope.json"])
    with pytest.raises(QdyloraError, match="rank is required"):
        compose_config("export", [f"run_dir={tiny_run}"])
