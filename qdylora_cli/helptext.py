"""The key reference of `qdylora COMMAND --help`: every key of the command's schema, its default and meaning.

Keys come from the typed schema (config.py), defaults from the composed YAML, and meanings from
the comment after each key in conf/ (the command's file, then the options of the key's group), so
the help cannot drift from what the command accepts. A key without a comment anywhere in conf/
shows no meaning, and a test catches it.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<item>-\s+)?(?P<key>[A-Za-z_]\w*)\s*:(?P<rest>.*)$")
MAX_DEFAULT = 24  # longer defaults are cut with "..."


def _split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of what follows `key:`; a # inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(text):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def yaml_comments(path: Path) -> dict[str, str]:
    """{dotted key: its trailing comment} of one conf/ YAML file.

    Entries of the `defaults:` list (`- data: null  # ...`) document the top-level key they name.
    """
    comments: dict[str, str] = {}
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for line in path.read_text().splitlines():
        m = _KEY_LINE.match(line)
        if not m:
            continue
        indent, key = len(m["indent"]), m["key"]
        value, comment = _split_comment(m["rest"])
        if m["item"]:  # a list item: only the defaults list names keys
            if parents and parents[-1][1] == "defaults" and comment:
                comments.setdefault(key, comment)
            continue
        while parents and parents[-1][0] >= indent:
            parents.pop()
        dotted = ".".join([*(k for _, k in parents), key])
        if comment:
            comments.setdefault(dotted, comment)
        if not value:  # a mapping (or list) opens below this key
            parents.append((indent, key))
    return comments


def conf_comments(conf_dir: Path, command: str, groups: dict[str, str | None]) -> dict[str, str]:
    """Comments of every key a command can have: its own file first, then the options of each of its
    `groups` ({group: the option to read first}). Options with `# @package _global_` document keys
    outside their group."""
    comments = dict(yaml_comments(conf_dir / f"{command}.yaml"))
    for group, first in groups.items():
        files = sorted((conf_dir / group).glob("*.yaml"), key=lambda p: (p.stem != first, p.stem))
        for path in files:
            is_global = "@package _global_" in path.read_text().split("\n", 1)[0]
            for key, text in yaml_comments(path).items():
                comments.setdefault(key if is_global else f"{group}.{key}", text)
    return comments


def show_value(value: Any) -> str:
    """A default as you would type it: null, true, [a, b], {model_type: llama, ...}; ??? reads `required`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "???":
        return "required"
    if isinstance(value, list):
        text = "[" + ", ".join(show_value(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    else:
        text = str(value) if value != "" else "''"
    return text if len(text) <= MAX_DEFAULT else text[: MAX_DEFAULT - 3] + "..."


def _section_type(hint: Any) -> type | None:
    return next((t for t in (hint, *get_args(hint)) if is_dataclass(t)), None)


def _schema_default(f: Field) -> Any:
    """A field's fallback default, for keys the composed YAML leaves out (data=json has no block_size)."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return "???" if f.default is MISSING else f.default


def key_rows(schema: type, defaults: dict, comments: dict[str, str], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) for every leaf key of `schema`, in schema order.

    A section that may be null (eval's `data`) gets a row of its own, then its keys.
    """
    rows = []
    hints = get_type_hints(schema)
    for f in fields(schema):
        key = prefix + f.name
        section = _section_type(hints[f.name])
        value = defaults[f.name] if f.name in defaults else _schema_default(f)
        if section is None:
            rows.append((key, show_value(value), comments.get(key, "")))
            continue
        if f.default is None:  # an optional section: null unless chosen
            rows.append((key, "null", comments.get(key, "")))
        rows += key_rows(section, value if isinstance(value, dict) else {}, comments, key + ".")
    return rows


def key_table(rows: list[tuple[str, str, str]]) -> list[str]:
    """Aligned `key  default  meaning` lines."""
    key_width = max(len(k) for k, _, _ in rows)
    default_width = max(len(d) for _, d, _ in rows)
    return [f"  {k:<{key_width}}  {d:<{default_width}}  {meaning}".rstrip() for k, d, meaning in rows]
