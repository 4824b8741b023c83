"""`qdylora train|eval|export|generate|allocate [KEY=VALUE ...] [+recipe=NAME]`: compose the config, validate it, dispatch.

Hydra has no subcommands, so each command is a primary config (`conf/train.yaml`, `eval.yaml`,
`export.yaml`, `generate.yaml`, `allocate.yaml`) composed with Hydra's compose API. Recipes are the `recipes/` folder: its parent is
on Hydra's search path, and `+recipe=NAME` is passed on as `+recipes=NAME`. Everything is checked
against the typed schema in config.py before the command's (torch-heavy) module is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from qdylora_cli import __version__
from qdylora_cli.choices import GPUS
from qdylora_cli.config import (
    SCHEMAS,
    AllocateConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PlanConfig,
    TrainConfig,
    absolute_paths,
    allocation_stands_for_rank,
    flat_config,
    to_typed,
    unflatten,
    unknown_key_message,
    validate_allocate,
    validate_eval,
    validate_export,
    validate_generate,
    validate_train,
)
from qdylora_cli.errors import Interrupted, QdyloraError, first_line, is_out_of_memory
from qdylora_cli.helptext import conf_comments, key_rows, key_table
from qdylora_cli.logs import quiet_libraries, setup_logging
from qdylora_cli.rundir import CONFIG, NAME_A_RUN, last_run, load_eval_source, load_run_config

log = logging.getLogger(__name__)

COMMANDS = {
    "train": "fine-tune a model: one run trains every adapter rank 1..r_max",
    "eval": "loss/perplexity (or task scores) of a trained run at many ranks",
    "export": "one rank of a run as a PEFT adapter, a merged model or GGUF for llama.cpp",
    "generate": "a run's answers to your prompts, at one rank or several side by side",
    "allocate": "a rank per layer for a parameter budget, chosen from a trained run without training again",
    "plan": "whether a training run fits on a GPU: train's config plus gpu=, one step on fake tensors, no weights",
}
MODULES = {"train": "qdylora_cli.train", "eval": "qdylora_cli.evaluate", "export": "qdylora_cli.export",
           "generate": "qdylora_cli.generate", "allocate": "qdylora_cli.allocate", "plan": "qdylora_cli.plan"}
GROUPS = ("model", "data", "quant", "rank_schedule", "optimizer")
# The option of each group whose comments document every key of the group (read first for --help).
REFERENCE_OPTIONS = {"model": "hf", "data": "alpaca", "quant": "nf4", "rank_schedule": "uniform", "optimizer": "adamw"}
# Free text, never Hydra syntax: `prompt=What's 3, plus 4?` is kept as typed (see _text_overrides).
TEXT_KEYS = {"generate": ("prompt", "input"), "plan": ("gpu",)}
_RECIPE = re.compile(r"^\+{0,2}recipe=(.*)$")
_NAMES_RUN = re.compile(r"^[+~]{0,2}(run_dir|name)(=|$)")  # a reading command's own choice of run (no +recipe)


# --- where configs live ------------------------------------------------------------------------------


def config_root() -> Path:
    """The folder holding `conf/` and `recipes/`: the installed package's copies first, else the checkout's."""
    package = Path(__file__).resolve().parent
    for root in (package, package.parent):
        if (root / "conf" / "train.yaml").is_file():
            return root
    raise QdyloraError(f"qdylora's conf/ folder is missing from {package} and {package.parent}; reinstall qdylora")


def _user_dir(config_dir: str | Path | None) -> Path | None:
    if config_dir is None:
        return None
    path = Path(config_dir).expanduser().resolve()
    if not path.is_dir():
        raise QdyloraError(f"--config-dir {config_dir}: no such directory")
    return path


def _yaml_names(*folders: Path) -> list[str]:
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})


def available_recipes(config_dir: str | Path | None = None) -> list[str]:
    """Recipe names: the built-in ones and those in CONFIG_DIR/recipes."""
    user = _user_dir(config_dir)
    return _yaml_names(config_root() / "recipes", *([user / "recipes"] if user else []))


def group_options(group: str, config_dir: str | Path | None = None) -> list[str]:
    user = _user_dir(config_dir)
    return _yaml_names(config_root() / "conf" / group, *([user / group] if user else []))


# --- composition -------------------------------------------------------------------------------------


def _quote(value: str) -> str:
    """A Hydra override value that keeps any path intact (spaces, commas, brackets)."""
    return "'" + value.replace("'", "\\'") + "'"


def _check_overrides(overrides: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as e:
            reason = first_line(e)
            raise QdyloraError(f"malformed override {override!r}: {reason}; expected KEY=VALUE (lists as [a,b])") from None


def _compose_raw(command: str, overrides: list[str], config_dir: str | Path | None) -> tuple[Any, dict[str, str]]:
    """The composed (untyped) DictConfig and the option chosen in each config group; Hydra's errors
    become one line each."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    root, user = config_root(), _user_dir(config_dir)
    if user is not None:
        _check_no_shadowing(user, root)
    search = ([user] if user else []) + [root]
    searchpath = "hydra.searchpath=[" + ",".join(_quote(f"file://{p}") for p in search) + "]"
    try:
        with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3", job_name="qdylora"):
            node = compose(config_name=command, overrides=[searchpath, *overrides], return_hydra_config=True)
            choices = dict(node.hydra.runtime.choices)
            with open_dict(node):
                del node["hydra"]
            return node, choices
    except MissingConfigException as e:
        raise QdyloraError(_missing_option_message(e)) from None
    except ConfigCompositionException as e:
        raise QdyloraError(_composition_message(command, e, overrides)) from None


def _check_no_shadowing(user: Path, root: Path) -> None:
    # Hydra searches the built-in conf/ first, so a same-named file of the user's would be silently ignored.
    for path in sorted(user.glob("*/*.yaml")):
        group = path.parent.name
        builtin = root / group / path.name if group == "recipes" else root / "conf" / group / path.name
        if builtin.is_file():
            raise QdyloraError(f"--config-dir: {path} has the name of a built-in {group} option; rename it")


def _missing_option_message(e: Any) -> str:
    m = re.search(r"Could not find '(.+?)/([^/']+)'", str(e))
    if m and e.options:
        group, option = m.group(1), m.group(2)
        return f"{group}={option}: no such option; {group} has: {', '.join(sorted(e.options))}"
    return first_line(e)


def _composition_message(command: str, e: Exception, overrides: list[str]) -> str:
    full_key = getattr(e.__cause__, "full_key", None)
    if full_key:
        data = [o for o in overrides if o.startswith("data.")]
        if command == "eval" and full_key.split(".")[0] == "data" and data:
            return f"{data[0]}: eval has no data section until you pick one, e.g. data=json {data[0]}"
        return unknown_key_message(SCHEMAS[command], full_key)
    return first_line(e)


def _recipe(overrides: list[str], config_dir: str | Path | None) -> tuple[str | None, list[str]]:
    """Split off `+recipe=NAME` (checked against the recipes on disk) from the other overrides."""
    names = [m.group(1) for o in overrides if (m := _RECIPE.match(o))]
    rest = [o for o in overrides if not _RECIPE.match(o)]
    if len(names) > 1:
        raise QdyloraError(f"one recipe at a time; got +recipe={' +recipe='.join(names)}")
    if not names:
        return None, rest
    known = available_recipes(config_dir)
    if names[0] not in known:
        raise QdyloraError(f"unknown recipe {names[0]!r} (+recipe={names[0]}); available: {', '.join(known)}")
    return names[0], rest


def _text_overrides(command: str, overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split off `KEY=TEXT` for the command's free-text keys: Hydra would read commas as a sweep,
    brackets as a list and an apostrophe as an unclosed quote."""
    keys = TEXT_KEYS.get(command, ())
    is_text = [o.partition("=")[0] in keys and "=" in o for o in overrides]
    texts = dict(o.split("=", 1) for o, text in zip(overrides, is_text) if text)
    return texts, [o for o, text in zip(overrides, is_text) if not text]


def compose_config(
    command: str, overrides: list[str], config_dir: str | Path | None = None
) -> TrainConfig | EvalConfig | ExportConfig | GenerateConfig | AllocateConfig | PlanConfig:
    """The validated, typed config of `qdylora COMMAND OVERRIDES...` (nothing heavy is imported).

    For eval, export, generate and allocate, `+recipe=NAME` only names the run: its run_dir becomes the
    default. Where neither it, run_dir= nor name= is given, they open the run trained last (see `last_run`).
    """
    if command not in COMMANDS:
        raise QdyloraError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    texts, overrides = _text_overrides(command, overrides)
    _check_overrides(overrides)
    recipe, overrides = _recipe(overrides, config_dir)
    if command in ("train", "plan"):
        extra = [f"+recipes={recipe}"] if recipe else []
        node, choices = _compose_raw("train", extra + overrides, config_dir)
        cfg = to_typed("train", node)
        if choices.get("data") == "tiny_instructions" and not cfg.data.path.startswith("builtin:"):
            raise QdyloraError(f"data.path={cfg.data.path}: say what the file holds with data=json (instruction "
                               "records), data=text (plain text) or data=alpaca (a Hugging Face dataset); without it "
                               "the built-in toy data's settings would apply")
        if command == "plan":  # it reads neither data nor weights
            if "gpu" not in texts:
                raise QdyloraError("gpu: name the GPU to plan for, e.g. gpu=v100-32gb or gpu=24 (GiB); "
                                   "`qdylora plan --help` lists the names")
            return PlanConfig(validate_train(cfg, check_paths=False), texts["gpu"])
        cfg = validate_train(cfg)
        if cfg.train.resume and (Path(cfg.run_dir) / CONFIG).is_file():
            cfg = _resumed(cfg, extra, config_dir)
        return cfg
    if recipe:
        run_dir = to_typed("train", _compose_raw("train", [f"+recipes={recipe}"], config_dir)[0]).run_dir
        overrides = [f"run_dir={_quote(run_dir)}", *overrides]
    node = _compose_raw(command, overrides, config_dir)[0]
    if not recipe and not any(_NAMES_RUN.match(o) for o in overrides):
        # `runs/default` is only a placeholder: the run to read is the one just trained, in the same folder
        run_dir, why = last_run(Path(node.run_dir).parent)
        node.run_dir = str(run_dir)
        log.info("%s: opening %s (%s); to open another, %s", command, run_dir, why, NAME_A_RUN)
    if command == "export":
        allocation_stands_for_rank(node)
    cfg = to_typed(command, node)
    if command == "export":
        return validate_export(cfg, load_run_config(cfg.run_dir).adapter.r_max)
    if command == "allocate":
        return validate_allocate(cfg, load_run_config(cfg.run_dir).adapter.r_max)
    run_cfg, merged_rank = load_eval_source(cfg.run_dir)
    if command == "generate":
        return validate_generate(dataclasses.replace(cfg, **texts), run_cfg.adapter.r_max, merged_rank)
    return validate_eval(cfg, run_cfg.adapter.r_max, merged_rank)


def _resumed(cfg: TrainConfig, recipe: list[str], config_dir: str | Path | None) -> TrainConfig:
    """train.resume=true: the run's saved config, with what this command line sets on top of it.

    A key counts as set on the command line when it differs from the same composition without the
    overrides; which of those may change is checked, key by key, before training (rundir.check_same_run).
    """
    saved = flat_config(load_run_config(cfg.run_dir))
    plain = flat_config(absolute_paths(to_typed("train", _compose_raw("train", recipe, config_dir)[0])))
    given = {k: v for k, v in flat_config(absolute_paths(cfg)).items() if plain.get(k) != v}
    return validate_train(to_typed("train", unflatten({**saved, **given, "run_dir": cfg.run_dir})))


# --- help --------------------------------------------------------------------------------------------


def _description(path: Path) -> str:
    """The first comment line of a YAML file that is not a Hydra directive."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("# ").strip()
    return ""


def _defaults(command: str) -> dict[str, str]:
    entries = OmegaConf.to_container(OmegaConf.load(config_root() / "conf" / f"{command}.yaml")).get("defaults", [])
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()}


def key_reference(command: str) -> list[str]:
    """`key  default  meaning` for every key of the command (see helptext.py)."""
    if command == "plan":
        return [f"gpu=NAME or gpu=GiB (required): {', '.join(GPUS)}, or a size such as gpu=24",
                "and every key of qdylora train:", *key_reference("train")[1:]]
    conf = config_root() / "conf"
    # eval's data is null until chosen: show the keys (and defaults) that data=json brings
    groups = {"train": REFERENCE_OPTIONS, "eval": {"data": REFERENCE_OPTIONS["data"]}}.get(command, {})
    extra = ["data=json"] if command == "eval" else []
    defaults = OmegaConf.to_container(_compose_raw(command, extra, None)[0], resolve=False)
    rows = key_rows(SCHEMAS[command], defaults, conf_comments(conf, command, groups))
    return [f"keys of qdylora {command} (KEY=VALUE; defaults of conf/{command}.yaml{_default_note(command)}):",
            *key_table(rows)]


def _default_note(command: str) -> str:
    if command == "train":
        chosen = ", ".join(f"{g}={o}" for g, o in _defaults("train").items())
        return f" with {chosen}; a recipe or option changes some"
    return " with data=json" if command == "eval" else ""


def help_epilog(command: str | None, config_dir: str | Path | None = None) -> str:
    root = config_root()
    lines = []
    if command is None:
        lines += ["commands:"] + [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
        lines += ["  help      this help; `qdylora help COMMAND` is `qdylora COMMAND --help`", ""]
    if command in (None, "train", "plan"):
        user = _user_dir(config_dir)
        lines.append("recipes (+recipe=NAME):")
        for name in available_recipes(config_dir):
            path = user / "recipes" / f"{name}.yaml" if user and (user / "recipes" / f"{name}.yaml").is_file() else None
            lines.append(f"  {name:<20} {_description(path or root / 'recipes' / f'{name}.yaml')}")
        lines += ["", "config groups (GROUP=OPTION; * = default):"]
        chosen = _defaults("train")
        for group in GROUPS:
            options = [o + "*" * (o == chosen.get(group)) for o in group_options(group, config_dir)]
            lines.append(f"  {group:<14} {', '.join(options)}")
        lines += [
            "",
            "examples:",
            "  qdylora train +recipe=tiny",
            "  qdylora train +recipe=tiny adapter.r_max=16 train.max_steps=100 run_dir=runs/r16",
            "  qdylora train model=hf model.name_or_path=./my-model data=json data.path=train.jsonl",
            "  qdylora train model=hf model.name_or_path=./my-model data=chat data.path=chat.jsonl data.packing=true",
            "  qdylora eval rank=1..8                 # the run trained last; +recipe=NAME or run_dir=PATH: another",
            "  qdylora generate +recipe=tiny rank=[1,4,8] prompt='Reverse the word.' input=star",
            "  qdylora export +recipe=tiny rank=4 format=merged",
            "  qdylora plan +recipe=falcon40b_alpaca gpu=v100-32gb   # does it fit? no GPU, no weights needed",
            "",
        ]
    lines += key_reference(command or "train")
    if command is None:
        lines += ["", "keys of eval, export, generate, allocate and plan: qdylora COMMAND --help"]
    lines += [
        "",
        "Every key can be set as KEY=VALUE; `qdylora COMMAND ... --cfg` prints the result.",
        "Your own recipes and options: --config-dir DIR with DIR/recipes/NAME.yaml, DIR/model/NAME.yaml, ...",
    ]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """One-line errors, and an epilog built only when the help is shown (it composes configs)."""

    def __init__(self, *args: Any, epilog_for: tuple[str | None, str | None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epilog_for = epilog_for

    def format_help(self) -> str:
        self.epilog = help_epilog(*self.epilog_for)
        return super().format_help()

    def error(self, message: str) -> Any:  # argparse's usage + message would be two lines
        raise QdyloraError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser(command: str | None, config_dir: str | None) -> _Parser:
    prog = "qdylora" if command is None else f"qdylora {command}"
    parser = _Parser(
        prog=prog,
        description=COMMANDS.get(command, "QDyLoRA fine-tuning: a 4-bit NF4 base and LoRA adapters good at every rank."),
        epilog_for=(command, config_dir),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{prog} [--config-dir DIR] [--cfg] [KEY=VALUE ...] [+recipe=NAME]" if command else "qdylora COMMAND ... | qdylora help [COMMAND]",
    )
    parser.add_argument("--version", action="version", version=f"qdylora {__version__}")
    if command is not None:
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (Hydra syntax)")
        parser.add_argument("--config-dir", metavar="DIR", help="extra folder of recipes/ and config group options")
        parser.add_argument("--cfg", action="store_true", help="print the validated config and exit")
    return parser


# --- running -----------------------------------------------------------------------------------------


def _launch_processes(cfg: TrainConfig, argv: list[str]) -> int | None:
    """With launcher.num_processes > 1, start that many copies of this command under accelerate."""
    n = cfg.launcher.num_processes
    if n == 1 or "LOCAL_RANK" in os.environ:  # already one of the launched processes
        return None
    ddp = config_root() / "conf" / "accelerate" / "ddp.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ddp),
           "--num_processes", str(n), "-m", "qdylora_cli", *argv]
    return subprocess.call(cmd)


def run(argv: list[str]) -> int:
    """Parse, compose, validate, then import and run the command; returns the exit code."""
    if argv[:1] == ["help"]:  # `qdylora help [COMMAND]`
        argv = [*argv[1:2], "--help"]
    if not argv or argv[0] not in COMMANDS:
        parser = _parser(None, None)
        if not argv:
            parser.print_help()
            return 0
        if argv[0] in ("-h", "--help", "--version"):
            parser.parse_args(argv)  # prints and exits
        parser.error(f"unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}")
    command = argv[0]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config-dir")
    config_dir = pre.parse_known_args(argv[1:])[0].config_dir
    args = _parser(command, config_dir).parse_intermixed_args(argv[1:])
    cfg = compose_config(command, args.overrides, args.config_dir)
    if args.cfg:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return 0
    if command == "train" and (code := _launch_processes(cfg, argv)) is not None:
        return code
    quiet_libraries()
    importlib.import_module(MODULES[command]).run(cfg)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 2 (1 when the machine ran out of memory)."""
    setup_logging()
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except QdyloraError as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        code = e.exit_code
    except Interrupted as e:  # a signal, after the checkpoint was saved
        print(e, file=sys.stderr)
        code = e.exit_code
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        print(f"error: out of memory in `qdylora {' '.join((argv or sys.argv[1:])[:1])}` ({first_line(e)[:120]}); "
              "use smaller batches or a shorter sequence length", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # outside the training loop (which saves a checkpoint itself): nothing to keep
        print("interrupted", file=sys.stderr)
        code = 130
    except OSError as e:  # the disk or the file system, not the user's input: still one line
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        code = 1
    sys.exit(code)
