"""Chat data: conversations rendered with the tokenizer's chat template, loss on the assistant turns.

A record holds a list of messages (`role`, `content`; the field names are configurable, and
ShareGPT's `human`/`gpt` roles are understood). Each conversation is rendered with the chat
template as one string and tokenized once; the assistant turns are located in that string by
rendering it prefix by prefix:

- a turn starts where `render(messages[:i], add_generation_prompt=True)` ends (after the
  template's assistant header, which is prompt, not response), and
- it ends where `render(messages[:i + 1])` ends (after the template's end-of-turn marker, which the
  model must learn to produce), less the whitespace the template puts between turns.

Tokens whose character span overlaps an assistant turn carry loss. This works with any template,
not only those marked up with `{% generation %}`, and it never tokenizes pieces separately (which
would change the tokens at the seams, e.g. SentencePiece's leading space). It needs a template that
renders a conversation's prefixes as prefixes of the whole; one that does not (a template that
rewrites earlier turns) is refused with the record that showed it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from qdylora_cli.config import DataConfig, is_inline_template
from qdylora_cli.errors import QdyloraError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT

# ChatML, for tokenizers without a template of their own. The EOS after each assistant turn lets
# generation stop at EOS with tokenizers that have no <|im_end|> token (most base models).
CHATML_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]  # a template's smoke test


@dataclass
class ChatTemplate:
    """The Jinja text a chat dataset is rendered with, and where it came from (for messages)."""

    text: str
    source: str


def resolve_template(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """`data.chat_template` (Jinja text, a file, or `chatml`), else the tokenizer's own, else ChatML.

    The template is tried on a two-message conversation here, so a broken one stops with one line
    naming it, not with an error about the first record.
    """
    value = cfg.chat_template
    if value is None:
        try:
            template = ChatTemplate(tokenizer.get_chat_template(), f"the chat template of {tokenizer.name_or_path!r}")
        except ValueError:  # transformers' way of saying the tokenizer has none
            log.info("%s has no chat template: using qdylora's built-in ChatML (set data.chat_template for another)",
                     tokenizer.name_or_path or "the tokenizer")
            template = ChatTemplate(CHATML_TEMPLATE, "the built-in ChatML template")
    elif value == "chatml":
        template = ChatTemplate(CHATML_TEMPLATE, "the built-in ChatML template")
    elif is_inline_template(value):
        template = ChatTemplate(value, "data.chat_template")
    else:
        path = Path(value).expanduser()
        try:
            template = ChatTemplate(path.read_text(encoding="utf-8"), f"data.chat_template={value!r}")
        except (OSError, UnicodeDecodeError) as e:
            raise QdyloraError(f"data.chat_template={value!r}: cannot read the template file ({e})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise QdyloraError(f"chat data needs a fast tokenizer (token offsets); {tokenizer.name_or_path!r} is not one")
    _render(tokenizer, template, PROBE, False, None)
    return template


def _render(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, messages: list[dict[str, str]],
            generation_prompt: bool, where: str | None) -> str:
    """`where`: the record (file:line) in error messages; None for the smoke test of the template itself."""
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template.text, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # a template is a program: anything it raises means "cannot render this"
        reason = " ".join(str(e).split()) or type(e).__name__
        line = getattr(e, "lineno", None)
        at = f" (template line {line})" if isinstance(line, int) else ""
        if where is None:
            raise QdyloraError(f"{template.source} fails on a two-message conversation{at}: {reason}") from None
        raise QdyloraError(f"{where}: {template.source} fails{at}: {reason}") from None
    if not isinstance(text, str):
        raise QdyloraError(f"{where or 'a two-message conversation'}: {template.source} did not render to text")
    return text


# --- records ------------------------------------------------------------------------------------------


def parse_messages(where: str, record: Any, cfg: DataConfig) -> list[dict[str, str]]:
    """The messages of one record as `{"role", "content"}` dicts with canonical roles, checked.

    `data.system_prompt` becomes the first message of a record that has no system message.
    """
    messages_key, role_key, content_key = cfg.messages_field or "messages", cfg.role_field, cfg.content_field
    if not isinstance(record, dict):
        raise QdyloraError(f"{where}: expected a JSON object with {messages_key!r}, got {type(record).__name__}")
    raw = record.get(messages_key)
    if raw is None:
        raise QdyloraError(f"{where}: missing field {messages_key!r} (set data.messages_field if it has another name)")
    if not isinstance(raw, list):
        raise QdyloraError(f"{where}: field {messages_key!r} must be a list of messages, got {type(raw).__name__}")
    if not raw:
        raise QdyloraError(f"{where}: no messages (field {messages_key!r} is an empty list)")
    messages = []
    for n, message in enumerate(raw, start=1):
        if not isinstance(message, dict):
            raise QdyloraError(f"{where}: message {n} must be an object with {role_key!r} and {content_key!r}, "
                               f"got {type(message).__name__}")
        role, content = message.get(role_key), message.get(content_key)
        if role is None:
            raise QdyloraError(f"{where}: message {n} has no {role_key!r} (set data.role_field if it has another name)")
        canonical = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None
        if canonical not in ROLES:
            raise QdyloraError(f"{where}: message {n} has an unknown role {role!r}; expected "
                               f"{', '.join(ROLES)} (or ShareGPT's {', '.join(ROLE_ALIASES)})")
        if content is None:
            raise QdyloraError(f"{where}: message {n} has no {content_key!r} "
                               "(set data.content_field if it has another name)")
        if not isinstance(content, str):
            raise QdyloraError(f"{where}: message {n}: {content_key!r} must be a string, got {type(content).__name__}")
        messages.append({"role": canonical, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise QdyloraError(f"{where}: no assistant message (nothing to learn from)")
    if messages[0]["role"] == "assistant":
        raise QdyloraError(f"{where}: message 1 is the assistant's; a conversation starts with a user "
                           "(or system) message")
    if cfg.system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


# --- rendering and masks -----------------------------------------------------------------------------


def assistant_spans(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, messages: list[dict[str, str]],
                    where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (see the module docstring)."""
    text = _render(tokenizer, template, messages, False, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix(tokenizer, template, messages[:i], True, text, where))
        end = len(_prefix(tokenizer, template, messages[: i + 1], False, text, where))
        end = start + len(text[start:end].rstrip())  # the blank line between turns is not the assistant's to write
        if message["content"].strip() not in text[start:end]:
            raise QdyloraError(f"{where}: {template.source} does not render assistant message {i + 1} where "
                               "expected (after the generation prompt), so its tokens cannot be located")
        spans.append((start, end))
    return text, spans


def _prefix(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, messages: list[dict[str, str]],
            generation_prompt: bool, full: str, where: str) -> str:
    text = _render(tokenizer, template, messages, generation_prompt, where)
    if not full.startswith(text):
        raise QdyloraError(f"{where}: {template.source} renders the first {len(messages)} messages differently "
                           "alone than within the whole conversation, so assistant turns cannot be located "
                           "(set data.chat_template to a template that renders turn by turn)")
    return text


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (its character span), whether it overlaps one of `spans` (sorted, disjoint)."""
    mask, s = [], 0
    for start, end in offsets:
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        mask.append(s < len(spans) and end > spans[s][0] and start < spans[s][1])
    return mask


@dataclass
class ChatStats:
    """What truncation to data.max_length did to a dataset (logged, never silent)."""

    records: int = 0
    cut: int = 0
    dropped: int = 0


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    conversations: list[tuple[str, list[dict[str, str]]]],
    cfg: DataConfig,
) -> tuple[list[dict[str, list[int]] | None], ChatStats]:
    """One tokenized example `{"input_ids", "labels"}` per (where, messages) pair, and truncation counts.

    Labels are the token ids on assistant turns and -100 elsewhere (every token with
    data.train_on_source). A conversation longer than data.max_length keeps its first max_length
    tokens; one left without an assistant token to predict is dropped: None in its place (both are
    counted), so examples stay aligned with the records they came from.
    """
    texts, all_spans = [], []
    for where, messages in conversations:
        text, spans = assistant_spans(tokenizer, template, messages, where)
        texts.append(text)
        all_spans.append(spans)
    # The template writes the special tokens (BOS, ...) itself, as `apply_chat_template(tokenize=True)` does.
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    examples: list[dict[str, list[int]] | None] = []
    stats = ChatStats(records=len(texts))
    for ids, offsets, spans in zip(encoded["input_ids"], encoded["offset_mapping"], all_spans):
        assistant = token_mask(offsets, spans)
        cut = len(ids) > cfg.max_length
        if cut:
            ids, assistant = ids[: cfg.max_length], assistant[: cfg.max_length]
        if not any(assistant[1:]):  # the first token is never predicted
            stats.dropped += 1
            examples.append(None)
            continue
        stats.cut += cut
        labels = list(ids) if cfg.train_on_source else [t if a else -100 for t, a in zip(ids, assistant)]
        examples.append({"input_ids": list(ids), "labels": labels})
    return examples, stats


def generation_prompt(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, messages: list[dict[str, str]],
                      where: str) -> str:
    """The rendered conversation followed by the template's assistant header: what a model continues."""
    return _render(tokenizer, template, messages, True, where)


@dataclass
class TurnEnd:
    """How the template ends an assistant turn: its text without special tokens, and those tokens' ids.

    Generation stops at the special tokens and is cut at the text: a model trained on chat data ends
    its turn there, and what it writes after (a turn it imagines next) is not its answer.
    """

    text: str
    token_ids: list[int]


def find_turn_end(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> TurnEnd:
    """What the template writes after an assistant message (e.g. `<|im_end|>`, `<|eot_id|>`)."""
    text = _render(tokenizer, template, PROBE, False, None)
    if "Hello." not in text:  # a template that rewrites answers: nothing to recognise the end of a turn by
        return TurnEnd("", [])
    tail = text[text.rindex("Hello.") + len("Hello."):]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return TurnEnd(tokenizer.decode(ids, skip_special_tokens=True).strip(), [t for t in ids if t in special])
