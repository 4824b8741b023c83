"""Config composition, recipes, validation messages, rank specs and run-directory helpers."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest

from qdylora_cli.cli import available_recipes, compose_config, config_root
from qdylora_cli.config import (
    AdapterConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    LauncherConfig,
    LoopConfig,
    OptimizerConfig,
    QuantConfig,
    RankScheduleConfig,
    TrainConfig,
    parse_rank_spec,
)
from qdylora_cli.errors import QdyloraError
from qdylora_cli.rundir import load_run_config, save_config


def test_train_defaults_match_schema_defaults():
    # The YAML is where users read defaults; the dataclasses must not drift from it.
    cfg = compose_config("train", [])
    assert isinstance(cfg, TrainConfig)
    assert cfg.name == "default" and cfg.run_dir == "runs/default"
    assert asdict(cfg.adapter) == asdict(AdapterConfig())
    assert asdict(cfg.quant) == asdict(QuantConfig())
    assert asdict(cfg.rank_schedule) == asdict(RankScheduleConfig())
    assert asdict(cfg.optimizer) == asdict(OptimizerConfig())
    assert asdict(cfg.train) == asdict(LoopConfig())
    assert asdict(cfg.launcher) == asdict(LauncherConfig())


def test_recipes_are_listed():
    assert {"tiny", "falcon40b_alpaca", "llama2_7b_alpaca", "llama3_8b_alpaca"} <= set(available_recipes())


def test_tiny_recipe():
    cfg = compose_config("train", ["+recipe=tiny"])
    assert cfg.name == "tiny" and cfg.run_dir == "runs/tiny"
    assert cfg.model.name_or_path is None and cfg.model.tokenizer == "byte"
    assert cfg.model.config["model_type"] == "llama" and cfg.model.config["hidden_size"] == 128
    assert cfg.model.dtype == "float32"
    assert cfg.data.path == "builtin:tiny-instructions" and cfg.data.format == "alpaca"
    assert cfg.quant.type == "nf4"
    assert cfg.adapter.r_max == 8
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == pytest.approx(5e-3)
    assert cfg.train.mixed_precision == "no" and not cfg.train.gradient_checkpointing


def test_falcon40b_alpaca_recipe_is_the_paper_setting():
    cfg = compose_config("train", ["+recipe=falcon40b_alpaca"])
    assert cfg.run_dir == "runs/falcon40b_alpaca"
    assert cfg.model.name_or_path == "tiiuae/falcon-40b" and cfg.model.config is None
    assert cfg.model.dtype == "float16" and cfg.train.mixed_precision == "fp16"
    assert (cfg.data.path, cfg.data.format) == ("yahma/alpaca-cleaned", "hf")
    assert (cfg.data.source_max_len, cfg.data.target_max_len) == (384, 128)
    assert not cfg.data.train_on_source and cfg.data.group_by_length
    assert (cfg.adapter.r_max, cfg.adapter.alpha, cfg.adapter.dropout) == (64, 16.0, 0.05)
    assert cfg.adapter.target_modules == ["all-linear"]
    assert (cfg.quant.type, cfg.quant.double_quant, cfg.quant.blocksize) == ("nf4", True, 64)
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.optimizer.scheduler == "constant" and cfg.optimizer.betas == [0.9, 0.999]
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (1, 16)
    assert cfg.train.max_grad_norm == pytest.approx(0.3) and cfg.train.gradient_checkpointing
    # The paper's model, data and hyperparameters, trained with the best dynamic-rank setting (docs/results.md).
    assert (cfg.adapter.mode, cfg.adapter.scale) == ("full", "rank_stabilized")
    assert (cfg.rank_schedule.kind, cfg.rank_schedule.ranks_per_step, cfg.rank_schedule.min_rank) == ("octave", 4, 1)


def test_paper_schedule_trains_as_the_dylora_papers_did():
    cfg = compose_config("train", ["+recipe=falcon40b_alpaca", "rank_schedule=paper"])
    assert (cfg.rank_schedule.kind, cfg.rank_schedule.ranks_per_step) == ("uniform", 1)
    assert (cfg.adapter.mode, cfg.adapter.scale) == ("frozen", "alpha_over_rank")
    cfg = compose_config("train", ["rank_schedule=paper", "adapter.mode=full"])  # the papers' other mode
    assert (cfg.adapter.mode, cfg.adapter.scale, cfg.rank_schedule.ranks_per_step) == ("full", "alpha_over_rank", 1)


@pytest.mark.parametrize(
    ("recipe", "model_id"),
    [("llama2_7b_alpaca", "meta-llama/Llama-2-7b-hf"), ("llama3_8b_alpaca", "meta-llama/Meta-Llama-3-8B")],
)
def test_llama_recipes(recipe, model_id):
    cfg = compose_config("train", [f"+recipe={recipe}"])
    assert cfg.model.name_or_path == model_id and cfg.model.dtype == "bfloat16"
    assert cfg.train.mixed_precision == "bf16" and cfg.optimizer.lr == pytest.approx(2e-4)
    assert cfg.data.path == "yahma/alpaca-cleaned" and cfg.adapter.r_max == 64
    assert cfg.optimizer.name == "adamw" and cfg.train.max_grad_norm == pytest.approx(0.3)


def test_overrides_beat_recipe_and_groups_can_be_swapped():
    cfg = compose_config("train", ["+recipe=tiny", "adapter.r_max=16", "rank_schedule=uniform", "name=r16"])
    assert cfg.adapter.r_max == 16 and cfg.rank_schedule.kind == "uniform" and cfg.run_dir == "runs/r16"
    assert cfg.optimizer.lr == pytest.approx(5e-3)  # the recipe's value survives


def test_hub_ids_and_local_paths(stories260k, alpaca_1k):
    cfg = compose_config("train", ["model=hf", "model.name_or_path=tiiuae/falcon-40b"])
    assert cfg.model.name_or_path == "tiiuae/falcon-40b"
    cfg = compose_config("train", ["model=hf", f"model.name_or_path={stories260k}", "data=json", f"data.path={alpaca_1k}"])
    assert cfg.data.format == "alpaca" and cfg.model.tokenizer is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapter.rmax=3"], "unknown config key adapter.rmax; adapter has: r_max"),
        (["+foo=1"], "unknown config key foo"),
        (["adapter.r_max=abc"], "adapter.r_max: expected an integer, got 'abc'"),
        (["adapter.target_modules=q_proj"], "adapter.target_modules: expected a list"),
        (["train.resume=maybe"], "train.resume: expected true or false"),
        (["adapter.r_max=0"], "adapter.r_max=0: expected a number >= 1"),
        (["rank_schedule.min_rank=65"], "rank_schedule.min_rank=65: expected 1..adapter.r_max (64)"),
        (["rank_schedule.min_rank=0"], "rank_schedule.min_rank=0"),
        (["rank_schedule=fixed", "rank_schedule.rank=65", "adapter.mode=full"],
         "rank_schedule.rank=65: expected 1..adapter.r_max (64)"),
        (["rank_schedule=fixed", "adapter.mode=frozen"],
         "adapter.mode='frozen': expected full when rank_schedule.kind=fixed"),
        (["rank_schedule.ranks_per_step=0"], "rank_schedule.ranks_per_step=0: expected a number >= 1"),
        (["adapter.scale=alpha/b"], "adapter.scale='alpha/b': expected one of alpha_over_rank, rank_stabilized, constant"),
        (["rank_schedule.kind=triangular"], "rank_schedule.kind='triangular': expected one of uniform, fixed"),
        (["model=hf"], "model.name_or_path is required"),
        (["model=hf", "model.name_or_path=./no/such/model"], "model.name_or_path='./no/such/model': expected an existing"),
        (["model.name_or_path=org/model"], "model.name_or_path='org/model': expected null when model.config"),
        (["~model.config.model_type"], "model.config=.*: expected a Hugging Face config with a model_type"),
        (["model.dtype=fp8"], "model.dtype='fp8': expected one of auto, float32, bfloat16, float16"),
        (["data=json"], "data.path is required"),
        (["data=json", "data.path=/no/such.json"], "data.path='/no/such.json': expected an existing path"),
        (["data=text", "data.path=missing.txt"], "data.path='missing.txt'"),
        (["data.val_path=./nope.json"], "data.val_path='./nope.json'"),
        (["data.path=builtin:nope"], "data.path='builtin:nope': expected one of builtin:tiny-instructions"),
        (["data.format=csv"], "data.format='csv': expected one of alpaca, text, hf"),
        (["data.template=chatml"], "data.template='chatml'"),
        (["data.source_max_len=0"], "data.source_max_len=0: expected a number >= 1"),
        (["data.target_max_len=-1"], "data.target_max_len=-1"),
        (["data.block_size=0"], "data.block_size=0"),
        (["data.max_length=1"], "data.max_length=1: expected a number >= 2"),
        (["data=alpaca", "data.text_field=text", "data.packing=true"], "data.packing=True: expected false for a text corpus"),
        (["data=alpaca", "data.text_field=text", "data.messages_field=messages"], "data.text_field='text': expected null when"),
        (["data.messages_field=messages"], "data.messages_field='messages': expected null unless data.format is chat or hf"),
        (["data=chat", "data.path=x.jsonl", "data.format=alpaca"], "data.messages_field='messages': expected null unless"),
        (["data=chat", "data.path=x.jsonl", "data.role_field="], "data.role_field='': expected a field name"),
        (["data.packing=true", "data.max_length=143"], "data.max_length=143: expected >= data.source_max_len + "
                                                        "data.target_max_len (144) with packing"),
        (["train.num_epochs=1"], "train.num_epochs=1: expected exactly one of train.max_steps and train.num_epochs "
                                 "(set train.max_steps=null to train by epochs)"),
        (["data.val_fraction=1.0"], "data.val_fraction=1.0: expected a number in [0, 1)"),
        (["quant.type=int8"], "quant.type='int8': expected one of nf4, none"),
        (["quant.blocksize=100"], "quant.blocksize=100: expected one of 32, 64, 128"),
        (["quant.blocksize=16"], "quant.blocksize=16: expected one of 32, 64, 128"),
        (["adapter.mode=partial"], "adapter.mode='partial': expected one of frozen, full"),
        (["adapter.variant=vera"], "adapter.variant='vera': expected one of lora, dora"),
        (["adapter.dropout=1.5"], "adapter.dropout=1.5"),
        (["optimizer.name=sgd"], "optimizer.name='sgd': expected one of adamw"),
        (["optimizer.name=paged_adamw_8bit"], "optimizer.name='paged_adamw_8bit': expected adamw: the bitsandbytes"),
        (["optimizer.scheduler=step"], "optimizer.scheduler='step'"),
        (["optimizer.lr=0"], "optimizer.lr=0.0: expected a number > 0"),
        (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9]"),
        (["train.mixed_precision=fp32"], "train.mixed_precision='fp32': expected one of auto, bf16, fp16, no"),
        (["train.report_to=[tensorboard,comet]"], "train.report_to='comet': expected one of tensorboard, wandb, mlflow, none"),
        (["train.cpu_threads=0"], "train.cpu_threads='0': expected auto or a number of threads >= 1"),
        (["data.path=my.jsonl"], "data.path=my.jsonl: say what the file holds with data=json"),
        (["train.max_steps=0"], "train.max_steps=0"),
        (["train.batch_size=0"], "train.batch_size=0"),
        (["train.eval_ranks=[1,100]"], "train.eval_ranks=[1, 100]: rank 100 is above the run's adapter.r_max (64)"),
        (["train.eval_ranks=1-8"], "train.eval_ranks='1-8': expected a rank spec like 8, 1..64"),
        (["launcher.num_processes=0"], "launcher.num_processes=0"),
        (["model=nope"], "model=nope: no such option; model has: falcon_40b, hf"),
        (["+recipe=nope"], "unknown recipe 'nope' (+recipe=nope); available: falcon40b_alpaca"),
        (["adapter.r_max=[1,2"], "malformed override 'adapter.r_max=[1,2'"),
        (["adapter.r_max"], "malformed override 'adapter.r_max'"),
    ],
)
def test_validation_errors_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(QdyloraError) as err:
        compose_config("train", overrides)
    text = str(err.value)
    assert re.search(message, text) if ".*" in message else message in text
    assert "\n" not in text


def test_bare_no_in_yaml_gets_a_hint(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "bad.yaml").write_text("# @package _global_\ntrain:\n  mixed_precision: no\n")
    with pytest.raises(QdyloraError, match='quote "no" in YAML'):
        compose_config("train", ["+recipe=bad"], config_dir=tmp_path)


def test_user_config_dir_adds_recipes_and_group_options(tmp_path, alpaca_1k):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text(f"path: {alpaca_1k}\nformat: alpaca\nsource_max_len: 100\n")
    (tmp_path / "recipes" / "my_run.yaml").write_text(
        "# @package _global_\n# my run\ndefaults:\n  - override /data: mine\nname: my_run\nadapter:\n  r_max: 4\n"
    )
    assert "my_run" in available_recipes(tmp_path)
    cfg = compose_config("train", ["+recipe=my_run"], config_dir=tmp_path)
    assert cfg.run_dir == "runs/my_run" and cfg.adapter.r_max == 4
    assert cfg.data.path == str(alpaca_1k) and cfg.data.source_max_len == 100
    assert cfg.model.tokenizer == "byte"  # the rest comes from the built-in defaults
    with pytest.raises(QdyloraError, match="no such directory"):
        compose_config("train", [], config_dir=tmp_path / "absent")
    (tmp_path / "data" / "alpaca.yaml").write_text("path: x\n")
    with pytest.raises(QdyloraError, match="alpaca.yaml has the name of a built-in data option"):
        compose_config("train", [], config_dir=tmp_path)


def test_config_root_finds_conf_and_recipes():
    root = config_root()
    assert (root / "conf" / "train.yaml").is_file() and (root / "recipes" / "tiny.yaml").is_file()


# --- rank specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "ranks"),
    [
        ("8", [8]),
        (8, [8]),
        (0, [0]),
        ("0", [0]),
        ("1..4", [1, 2, 3, 4]),
        ("1..64:16", [1, 17, 33, 49]),
        ("[1,2,4,8]", [1, 2, 4, 8]),
        ([8, 1, 2, 2], [1, 2, 8]),
        ("4, 2", [2, 4]),
        ("all", list(range(1, 65))),
    ],
)
def test_parse_rank_spec(spec, ranks):
    assert parse_rank_spec(spec, 64) == ranks


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("65", "rank 65 is above the run's adapter.r_max (64)"),
        ("1..128", "rank 128 is above"),
        ("8..4", "LOW <= HIGH"),
        ("1..8:0", "STEP >= 1"),
        ("1-8", "expected a rank spec like 8, 1..64"),
        ("", "expected a rank spec"),
        ("[1,x]", "expected a rank spec"),
        (-1, "ranks >= 0"),
        (True, "expected a rank spec"),
        (1.5, "expected a rank spec"),
    ],
)
def test_parse_rank_spec_errors(spec, message):
    with pytest.raises(QdyloraError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_rank_spec(spec, 64)


# --- run directories, eval and export ----------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path) -> Path:
    cfg = compose_config("train", ["+recipe=tiny", f"run_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")
    return tmp_path / "run"


def test_save_and_load_run_config(run_dir):
    cfg = load_run_config(run_dir)
    assert isinstance(cfg, TrainConfig)
    assert cfg == compose_config("train", ["+recipe=tiny", f"run_dir={run_dir}"])
    assert "${" not in (run_dir / "config.yaml").read_text()  # saved resolved


def test_a_run_saved_by_version_0_1_loads_with_the_settings_it_was_trained_with(run_dir):
    """0.1 had no adapter.scale (it used α/b) nor ranks_per_step (one per step), and bitsandbytes optimizers."""
    text = (run_dir / "config.yaml").read_text()
    text = re.sub(r"\n  scale: \w+", "", text)
    text = re.sub(r"\n  ranks_per_step: \d+", "", text).replace("name: adamw", "name: paged_adamw_32bit")
    assert "scale" not in text and "ranks_per_step" not in text
    (run_dir / "config.yaml").write_text(text)
    cfg = load_run_config(run_dir)
    assert (cfg.adapter.scale, cfg.rank_schedule.ranks_per_step, cfg.optimizer.name) == ("alpha_over_rank", 1, "adamw")


def test_load_run_config_rejects_other_directories(tmp_path):
    with pytest.raises(QdyloraError, match=f"{tmp_path} is not a qdylora run directory"):
        load_run_config(tmp_path)


def test_eval_config(run_dir):
    cfg = compose_config("eval", [f"run_dir={run_dir}", "rank=1..8:2"])
    assert isinstance(cfg, EvalConfig) and cfg.rank == "1..8:2" and cfg.data is None
    assert parse_rank_spec(cfg.rank, 8) == [1, 3, 5, 7]
    assert compose_config("eval", [f"run_dir={run_dir}", "rank=[1,2]"]).rank == [1, 2]
    cfg = compose_config("eval", [f"run_dir={run_dir}", "data=tiny_instructions", "data.max_samples=10"])
    assert cfg.data.path == "builtin:tiny-instructions" and cfg.data.max_samples == 10
    with pytest.raises(QdyloraError, match=r"rank 9 is above the run's adapter.r_max \(8\)"):
        compose_config("eval", [f"run_dir={run_dir}", "rank=9"])
    with pytest.raises(QdyloraError, match="task='bleu'"):
        compose_config("eval", [f"run_dir={run_dir}", "task=bleu"])
    with pytest.raises(QdyloraError, match="pick one, e.g. data=json data.path=x"):
        compose_config("eval", [f"run_dir={run_dir}", "data.path=x"])


@pytest.mark.parametrize(
    ("spec", "ranks"), [("1..8", list(range(1, 9))), ("[1,2,4]", [1, 2, 4]), ("1..64:16", [1, 17, 33, 49]),
                        ("8", [8]), ("all", list(range(1, 65))), ("[0,64]", [0, 64])],
)
def test_train_eval_ranks_take_the_rank_syntax_of_eval(spec, ranks):
    assert compose_config("train", [f"train.eval_ranks={spec}"]).train.eval_ranks == ranks


def test_generate_config(run_dir, tmp_path):
    cfg = compose_config("generate", [f"run_dir={run_dir}", "prompt=Hi, there", "rank=[1,4]", "temperature=0.7"])
    assert isinstance(cfg, GenerateConfig) and (cfg.prompt, cfg.rank, cfg.top_p) == ("Hi, there", [1, 4], 1.0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    assert compose_config("generate", [f"run_dir={run_dir}", f"prompts={prompts}"]).rank is None
    for overrides, message in [
        ([], 'give one of prompt="TEXT" or prompts=FILE'),
        (["prompt=a", f"prompts={prompts}"], 'give one of prompt="TEXT" or prompts=FILE'),
        ([f"prompts={prompts}", "input=x"], "input='x': expected null with prompts=FILE"),
        (["prompts=nowhere.txt"], "prompts='nowhere.txt': expected an existing file"),
        (["prompt=a", "rank=9"], "rank=9: rank 9 is above the run's adapter.r_max (8)"),
        (["prompt=a", "temperature=-1"], "temperature=-1.0: expected a number >= 0"),
        (["prompt=a", "temperature=1", "top_p=0"], "top_p=0.0: expected a number in (0, 1]"),
        (["prompt=a", "top_p=0.9"], "top_p=0.9: expected 1.0 with temperature=0 (greedy decoding)"),
        (["prompt=a", "max_new_tokens=0"], "max_new_tokens=0: expected a number >= 1"),
    ]:
        with pytest.raises(QdyloraError) as err:
            compose_config("generate", [f"run_dir={run_dir}", *overrides])
        assert message in str(err.value)


def test_export_config(run_dir):
    cfg = compose_config("export", [f"run_dir={run_dir}", "rank=4", "format=merged"])
    assert isinstance(cfg, ExportConfig) and (cfg.rank, cfg.format, cfg.out_dir) == (4, "merged", None)
    with pytest.raises(QdyloraError, match="rank is required"):
        compose_config("export", [f"run_dir={run_dir}"])
    with pytest.raises(QdyloraError, match=r"rank=9: expected a rank in 1..8"):
        compose_config("export", [f"run_dir={run_dir}", "rank=9"])
    with pytest.raises(QdyloraError, match="format='onnx': expected one of peft, merged, gguf, gguf-lora"):
        compose_config("export", [f"run_dir={run_dir}", "rank=4", "format=onnx"])


def test_eval_and_export_find_the_run_of_a_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QdyloraError, match="runs/tiny is not a qdylora run directory"):
        compose_config("eval", ["+recipe=tiny"])
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    save_config(compose_config("train", ["+recipe=tiny"]), tmp_path / "runs" / "tiny" / "config.yaml")
    assert compose_config("eval", ["+recipe=tiny"]).run_dir == "runs/tiny"
    assert compose_config("export", ["+recipe=tiny", "rank=2"]).run_dir == "runs/tiny"

