"""Sampling of the CPU engine: greedy, temperature with top-k/top-p/min-p, seeds, penalties."""

from __future__ import annotations

import pytest
import torch

from tokenyard.worker.engines.base import SamplingParams
from tokenyard.worker.engines.cpu.sampling import Sampler, apply_penalties, sample, sample_one

pytestmark = pytest.mark.unit

LOGITS = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])


def draws(params: SamplingParams, n: int = 200) -> list[int]:
    sampler = Sampler.from_params(params, default_temperature=1.0)
    return [sample_one(LOGITS, sampler) for _ in range(n)]


def test_temperature_zero_is_argmax_and_takes_no_generator() -> None:
    sampler = Sampler.from_params(SamplingParams(temperature=0.0), 1.0)
    assert sampler.greedy and sampler.generator is None
    assert sample_one(LOGITS, sampler) == 1


def test_the_engine_default_applies_when_the_request_sets_no_temperature() -> None:
    assert Sampler.from_params(SamplingParams(), 0.0).greedy
    assert not Sampler.from_params(SamplingParams(), 0.7).greedy


def test_top_k_one_top_p_tiny_and_min_p_one_keep_only_the_best() -> None:
    assert set(draws(SamplingParams(temperature=2.0, top_k=1, seed=1))) == {1}
    assert set(draws(SamplingParams(temperature=2.0, top_p=0.01, seed=1))) == {1}
    assert set(draws(SamplingParams(temperature=2.0, min_p=1.0, seed=1))) == {1}


def test_top_k_two_never_leaves_the_two_best() -> None:
    got = set(draws(SamplingParams(temperature=5.0, top_k=2, seed=3)))
    assert got == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    probs = torch.softmax(LOGITS, dim=-1)
    # The two best tokens hold most of the mass; asking for slightly less than them keeps exactly them.
    mass = float(probs[1] + probs[2]) - 0.01
    assert set(draws(SamplingParams(temperature=1.0, top_p=mass, seed=4), 400)) == {1, 2}


def test_a_seed_repeats_its_draws_and_another_seed_differs() -> None:
    a = draws(SamplingParams(temperature=1.5, seed=42), 50)
    assert a == draws(SamplingParams(temperature=1.5, seed=42), 50)
    assert a != draws(SamplingParams(temperature=1.5, seed=43), 50)
    assert len(set(a)) > 1


def test_invalid_settings_are_refused() -> None:
    for params in (
        SamplingParams(temperature=-1.0),
        SamplingParams(top_p=0.0),
        SamplingParams(top_p=1.5),
        SamplingParams(top_k=-1),
        SamplingParams(min_p=2.0),
        SamplingParams(repetition_penalty=0.0),
    ):
        with pytest.raises(ValueError):
            Sampler.from_params(params, 1.0)


def test_penalties() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    rep = Sampler(temperature=0.0, repetition_penalty=2.0)
    got = apply_penalties(logits, rep, prompt=[0], output=[1])
    assert got.tolist() == [1.0, -4.0, 1.0, 0.5]  # positive logits divided, negative multiplied
    freq = Sampler(temperature=0.0, frequency_penalty=0.5, presence_penalty=1.0)
    got = apply_penalties(logits, freq, prompt=[3], output=[2, 2, 0])
    assert got.tolist() == [0.5, -2.0, -1.0, 0.5]  # the prompt does not count for these two
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # the input is left alone


def test_a_batch_mixes_greedy_rows_with_sampled_and_penalized_ones() -> None:
    logits = torch.stack([LOGITS, LOGITS, LOGITS])
    samplers = [
        Sampler.from_params(SamplingParams(temperature=0.0), 1.0),
        Sampler.from_params(SamplingParams(temperature=1.0, top_k=1, seed=0), 1.0),
        Sampler.from_params(SamplingParams(temperature=0.0, repetition_penalty=100.0), 1.0),
    ]
    # The penalized greedy row has seen token 1, which falls behind token 2.
    assert sample(logits, samplers, [(), (), (1,)], [(), (), ()]) == [1, 1, 2]
