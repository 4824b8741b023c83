"""Sampling in which every rank throws the same dice.

`qdylora generate rank=[1,4,8] temperature=0.8` answers each prompt at several ranks in one batch.
With ordinary sampling (one `torch.multinomial` over the batch) the random draws of a row depend
on which other rows share the batch, so the answers of rank 4 would change with the ranks asked
alongside it, and two ranks would differ by luck as much as by quality.

Here sampling is the Gumbel-max trick: token = argmax(logits / T + G) with G drawn from a Gumbel
distribution picks token i with probability softmax(logits / T)_i. The noise G of each step comes
from a generator seeded with (seed, prompt text), so a prompt gets the same noise at every rank,
alone or in any batch: its answer depends only on the prompt, the rank and the seed, and ranks
are compared under common random numbers. The processor returns the perturbed scores and
`generate` decodes greedily (argmax) on them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor


@dataclass(frozen=True)
class Sampling:
    temperature: float  # > 0
    top_p: float = 1.0  # nucleus: keep the most likely tokens holding this much probability
    seed: int = 0


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """True where a token is outside the nucleus: the fewest most likely tokens whose probability reaches top_p."""
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(dim=-1) - probs  # the most likely token (mass before it 0) always stays
    outside = mass_before >= top_p
    return torch.empty_like(outside).scatter(-1, order, outside)


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class SharedNoiseSampler(LogitsProcessor):
    """Gumbel-max sampling whose noise is a function of (seed, row key, step), never of the batch.

    `row_keys[i]` names row i's stream (the prompt text): rows with the same key get the same noise.
    One instance serves one `generate` call: its generators advance one draw per step.
    """

    def __init__(self, sampling: Sampling, row_keys: list[str]) -> None:
        self.sampling = sampling
        keys = list(dict.fromkeys(row_keys))
        self.generators = [_generator(sampling.seed, key) for key in keys]
        self.row_stream = torch.tensor([keys.index(k) for k in row_keys])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.sampling.temperature
        if self.sampling.top_p < 1:
            logits = logits.masked_fill(nucleus_mask(logits, self.sampling.top_p), float("-inf"))
        # -log(E) with E ~ Exp(1) is Gumbel noise. Drawn on the CPU, so every device samples alike, and in
        # float64 kept above 0: a float32 draw of exactly 0 (about one in 2^24) would make a token certain.
        vocab, tiny = scores.shape[-1], torch.finfo(torch.float64).tiny
        noise = torch.stack([torch.empty(vocab, dtype=torch.float64).exponential_(generator=g) for g in self.generators])
        gumbel = -noise.clamp_(min=tiny).log()
        return logits + gumbel[self.row_stream].to(logits.device, logits.dtype)
