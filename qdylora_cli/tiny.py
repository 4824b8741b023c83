"""The built-in tiny setup: a byte-level tokenizer and toy instruction data, so a first run needs no download."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"  # ids 256, 257, 258 (conf/model/tiny.yaml relies on these)


def _byte_chars() -> list[str]:
    """The printable character ByteLevel pre-tokenization uses for each byte value 0..255.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) take the
    characters from U+0100 up, in byte order. This is the scheme `tokenizers` implements.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (id = byte value) plus <s>, </s>, <pad>; BOS is prepended like Llama's tokenizer."""
    vocab = {ch: b for b, ch in enumerate(_byte_chars())}
    # BPE without merges: every byte stays its own token.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1_000_000
    )


_WORDS = (
    "cat dog sun moon tree bird fish star rain snow wind fire lake hill road ship book lamp door cake "
    "milk rose frog bear wolf king ring song game blue red green gold apple river stone cloud bread "
    "house light night water earth plant tiger zebra lemon mango pearl robot piano"
).split()


def _record(instruction: str, input_: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "input": input_, "output": output}


def _reverse(rng: random.Random) -> dict[str, str]:
    w = rng.choice(_WORDS)
    return _record("Reverse the word.", w, w[::-1])


def _upper(rng: random.Random) -> dict[str, str]:
    w = rng.choice(_WORDS)
    return _record("Write the word in capital letters.", w, w.upper())


def _add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return _record(f"What is {a} plus {b}?", "", str(a + b))


def _repeat(rng: random.Random) -> dict[str, str]:
    w, n = rng.choice(_WORDS), rng.randint(2, 3)
    return _record(f"Repeat the word {n} times.", w, " ".join([w] * n))


def _sort_letters(rng: random.Random) -> dict[str, str]:
    w = rng.choice(_WORDS)
    return _record("Sort the letters alphabetically.", w, "".join(sorted(w)))


def _first_letter(rng: random.Random) -> dict[str, str]:
    w = rng.choice(_WORDS)
    return _record(f"What is the first letter of {w}?", "", w[0])


_TASKS = (_reverse, _upper, _add, _repeat, _sort_letters, _first_letter)


def tiny_instructions(n: int = 1000, seed: int = 0) -> list[dict[str, str]]:
    """`n` Alpaca-style records of small learnable tasks, the same for the same seed."""
    rng = random.Random(seed)
    return [_TASKS[i % len(_TASKS)](rng) for i in range(n)]
