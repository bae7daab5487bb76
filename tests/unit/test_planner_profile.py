"""Profile files: the documented format round-trips, the mocker's NPZ reads, bad files are refused
with the file and the key named; the perf model interpolates them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tokenyard.planner.perf import ProfilePerfModel
from tokenyard.planner.profile import FORMAT, Profile, ProfileError, load_profile

pytestmark = pytest.mark.unit


def sample() -> Profile:
    return Profile(
        prefill_isl=np.array([100.0, 1000.0, 4000.0]),
        prefill_ttft_ms=np.array([20.0, 40.0, 100.0]),
        decode_active_kv_tokens=np.array([1000.0, 10000.0]),
        decode_context_length=np.array([500.0, 1000.0]),
        decode_itl=np.array([[10.0, 12.0], [20.0, 24.0]]),
        max_kv_tokens=20000,
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        meta={"engine": "mocker"},
    )


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    sample().save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT
    assert doc["prefill_throughput_tokens_per_s"] == [5000.0, 25000.0, 40000.0]
    # Cell [1, 0]: round(10000 / 500) = 20 requests at 20 ms -> 1000 tokens/s.
    assert doc["decode_throughput_tokens_per_s"][1][0] == 1000.0
    loaded = load_profile(path)
    assert loaded.max_num_seqs == 32 and loaded.meta == {"engine": "mocker"}
    np.testing.assert_array_equal(loaded.decode_itl, sample().decode_itl)


def test_the_mockers_npz_format_reads_with_defaults(tmp_path: Path) -> None:
    p = sample()
    path = tmp_path / "p.npz"
    np.savez(
        path,
        prefill_isl=p.prefill_isl,
        prefill_ttft_ms=p.prefill_ttft_ms,
        decode_active_kv_tokens=p.decode_active_kv_tokens,
        decode_context_length=p.decode_context_length,
        decode_itl=p.decode_itl,
    )
    loaded = load_profile(path)
    assert (loaded.max_kv_tokens, loaded.max_num_seqs, loaded.max_num_batched_tokens) == (10000, 256, 8192)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "does not parse"),
        ("[1, 2]", "a profile is a JSON object"),
        ('{"format": "other/2"}', "is not 'tokenyard-profile/1'"),
        ("{}", "lacks prefill_isl"),
    ],
)
def test_unparseable_profiles_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("prefill_isl", [100, 50, 4000], "strictly ascending"),
        ("prefill_ttft_ms", [20, None, 100], "not an array of numbers|positive, finite"),
        ("prefill_ttft_ms", [20, 40], "one value per prefill_isl"),
        ("decode_itl", [[10, 12]], "must have shape"),
        ("decode_itl", [[10, -1], [1, 2]], "positive, finite"),
        ("max_num_seqs", 0, "positive integer"),
        ("max_kv_tokens", "many", "must be a number"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: object, message: str) -> None:
    doc = sample().to_json()
    doc[key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "nope.json")


def test_perf_model_interpolates_and_chunks() -> None:
    model = ProfilePerfModel(sample())
    assert model.prefill_ms(550) == pytest.approx(30.0)
    # Past the sweep (4000 tokens): 2048-token chunks, each interpolated: 2 x 60.96 + interp(904).
    assert model.prefill_ms(5000) == pytest.approx(
        2 * (40 + (2048 - 1000) / 3000 * 60) + (20 + (904 - 100) / 900 * 20)
    )
    # Grid corners and the middle (bilinear).
    assert model.itl_ms(2, 500) == pytest.approx(10.0)
    assert model.itl_ms(10, 1000) == pytest.approx(24.0)
    mid = model.itl_ms(5500 / 750, 750)  # kv 5500 -> t = 0.5, ctx 750 -> u = 0.5
    assert mid == pytest.approx((10 + 12 + 20 + 24) / 4)
