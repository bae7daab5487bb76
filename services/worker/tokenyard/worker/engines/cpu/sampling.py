"""Turning a request's next-token logits into a token: greedy, or sampled with temperature, top-k,
top-p and min-p, after repetition, frequency and presence penalties.

Each sampling request draws from its own ``torch.Generator``: seeded, it makes the same choices
for the same logits whatever else shares the batch; unseeded, it starts from fresh entropy.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenyard.worker.engines.base import SamplingParams


@dataclass(slots=True)
class Sampler:
    """One request's sampling settings, resolved, and its random stream."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def from_params(
        cls, params: SamplingParams, default_temperature: float, default_top_p: float = 1.0
    ) -> Sampler:
        temperature = default_temperature if params.temperature is None else params.temperature
        sampler = cls(
            temperature=temperature,
            top_p=default_top_p if params.top_p is None else params.top_p,
            top_k=params.top_k or 0,
            min_p=params.min_p or 0.0,
            repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
            frequency_penalty=params.frequency_penalty or 0.0,
            presence_penalty=params.presence_penalty or 0.0,
        )
        sampler.validate()
        if not sampler.greedy:
            sampler.generator = torch.Generator()
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            sampler.generator.manual_seed(seed & ((1 << 63) - 1))
        return sampler

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must not be negative, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


def apply_penalties(
    logits: torch.Tensor, sampler: Sampler, prompt: Sequence[int], output: Sequence[int]
) -> torch.Tensor:
    """Repetition (over prompt and output, transformers' rule) then frequency and presence (over
    the output, OpenAI's rule) penalties on one request's ``[vocab]`` logits."""
    logits = logits.clone()
    vocab = logits.shape[0]
    if sampler.repetition_penalty != 1:
        seen = torch.tensor(sorted({t for t in (*prompt, *output) if t < vocab}), dtype=torch.int64)
        if seen.numel():
            picked = logits[seen]
            penalty = sampler.repetition_penalty
            logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    if output and (sampler.frequency_penalty != 0 or sampler.presence_penalty != 0):
        counts = torch.bincount(
            torch.tensor([t for t in output if t < vocab], dtype=torch.int64), minlength=vocab
        )
        logits -= sampler.frequency_penalty * counts + sampler.presence_penalty * (counts > 0)
    return logits


def sample_one(logits: torch.Tensor, sampler: Sampler) -> int:
    """A token from one request's ``[vocab]`` logits."""
    if sampler.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, sampler), 1, generator=sampler.generator))


def probabilities(logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """The distribution a non-greedy ``sampler`` draws from: temperature, then top-k, min-p and
    top-p (filtered tokens get 0, the rest keep their unnormalized mass)."""
    scaled = logits / sampler.temperature
    if sampler.top_k and sampler.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, sampler.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if sampler.min_p > 0:
        probs = probs.masked_fill(probs < sampler.min_p * probs.max(), 0.0)
    if sampler.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_probs = sorted_probs.masked_fill(before >= sampler.top_p * sorted_probs.sum(), 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample(
    logits: torch.Tensor,
    samplers: Sequence[Sampler],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
) -> list[int]:
    """One token per row of ``[rows, vocab]`` logits; greedy rows without penalties take one argmax."""
    tokens = [0] * len(samplers)
    plain = [i for i, s in enumerate(samplers) if s.greedy and not s.penalized]
    if plain:
        picked = torch.argmax(logits[plain], dim=-1).tolist()
        for i, token in zip(plain, picked, strict=True):
            tokens[i] = int(token)
    for i, sampler in enumerate(samplers):
        if sampler.greedy and not sampler.penalized:
            continue
        row = logits[i]
        if sampler.penalized:
            row = apply_penalties(row, sampler, prompts[i], outputs[i])
        tokens[i] = sample_one(row, sampler)
    return tokens
