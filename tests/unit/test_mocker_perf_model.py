"""Step-time models: the reference polynomial, and interpolation of a profile (NPZ or JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenyard.worker.engines.mocker.perf_model import (
    InterpolatedPerfModel,
    PolynomialPerfModel,
    load_perf_model,
)

pytestmark = pytest.mark.unit


def prefill_poly(tokens: float) -> float:
    return 4.209989e-07 * tokens**2 + 1.518344e-02 * tokens + 16.50142


def test_polynomial_prefill_counts_new_tokens_of_the_whole_batch() -> None:
    model = PolynomialPerfModel()
    assert model.prefill_ms(1, 1000, 0) == pytest.approx(prefill_poly(1000))
    assert model.prefill_ms(1, 1000, 0) == pytest.approx(32.1054, abs=1e-3)
    # batch * (isl - prefix): 4 prompts of 300 with 50 cached each are 1000 new tokens.
    assert model.prefill_ms(4, 300, 50) == pytest.approx(prefill_poly(1000))
    assert model.prefill_ms(1, 4000, 2000) == pytest.approx(prefill_poly(2000))
    assert model.prefill_ms(1, 500, 500) == 0.0
    assert model.prefill_ms(0, 500, 0) == 0.0


def test_polynomial_decode_follows_kv_utilisation() -> None:
    model = PolynomialPerfModel()
    total = 16384 * 64
    assert model.decode_ms(1, 0, 100, total) == pytest.approx(5.74)
    assert model.decode_ms(8, total // 2, 100, total) == pytest.approx(-25.74 * 0.25 + 54.01 * 0.5 + 5.74)
    # Utilisation is capped at 1.
    assert model.decode_ms(8, 3 * total, 100, total) == pytest.approx(-25.74 + 54.01 + 5.74)
    assert model.decode_ms(0, total, 100, total) == 0.0


def _profile() -> dict[str, np.ndarray]:
    kv = np.array([0.0, 10_000.0, 50_000.0, 200_000.0])
    ctx = np.array([100.0, 1000.0, 4000.0])
    a, c = np.meshgrid(kv, ctx, indexing="ij")
    return {
        "prefill_isl": np.array([100.0, 1000.0, 4000.0]),
        "prefill_ttft_ms": 2.0 * np.array([100.0, 1000.0, 4000.0]) + 10.0,
        "decode_active_kv_tokens": kv,
        "decode_context_length": ctx,
        # A bilinear function: bilinear interpolation and extrapolation reproduce it exactly.
        "decode_itl": 3.0 + 1e-4 * a + 2e-3 * c + 1e-8 * a * c,
    }


def save_npz(path: Path, profile: dict[str, Any]) -> None:
    np.savez(path, **profile)


def _itl(a: float, c: float) -> float:
    return 3.0 + 1e-4 * a + 2e-3 * c + 1e-8 * a * c


def _check(model: InterpolatedPerfModel) -> None:
    assert model.prefill_ms(1, 500, 0) == pytest.approx(1010.0)
    assert model.prefill_ms(2, 600, 100) == pytest.approx(2010.0)  # x = total new tokens = 1000
    assert model.prefill_ms(1, 8000, 0) == pytest.approx(16010.0)  # extrapolated past the end
    assert model.prefill_ms(1, 50, 0) == pytest.approx(110.0)  # and before the start
    assert model.prefill_ms(1, 50, 50) == 0.0
    for a, c in [(5000, 500), (0, 100), (120_000, 2500), (400_000, 8000), (1000, 10)]:
        assert model.decode_ms(4, a, c, 1) == pytest.approx(_itl(a, c))
    assert model.decode_ms(0, 5000, 500, 1) == 0.0


def test_interpolation_is_linear_and_extrapolates() -> None:
    _check(InterpolatedPerfModel(*_profile().values()))


def test_decode_time_is_at_least_one_millisecond() -> None:
    profile = _profile()
    profile["decode_itl"] = np.full((4, 3), 0.2)
    assert InterpolatedPerfModel(*profile.values()).decode_ms(1, 100, 100, 1) == 1.0


def test_loads_npz_and_json(tmp_path: Path) -> None:
    profile = _profile()
    save_npz(tmp_path / "profile.npz", profile)
    (tmp_path / "profile.json").write_text(json.dumps({k: v.tolist() for k, v in profile.items()}))
    _check(InterpolatedPerfModel.from_file(tmp_path / "profile.npz"))
    _check(InterpolatedPerfModel.from_file(tmp_path / "profile.json"))
    assert isinstance(load_perf_model(tmp_path / "profile.npz"), InterpolatedPerfModel)
    assert isinstance(load_perf_model(None), PolynomialPerfModel)


def test_unsorted_axes_are_sorted_with_their_values() -> None:
    profile = _profile()
    order = np.array([2, 0, 3, 1])
    profile["decode_active_kv_tokens"] = profile["decode_active_kv_tokens"][order]
    profile["decode_itl"] = profile["decode_itl"][order]
    profile["prefill_isl"] = profile["prefill_isl"][::-1].copy()
    profile["prefill_ttft_ms"] = profile["prefill_ttft_ms"][::-1].copy()
    _check(InterpolatedPerfModel(*profile.values()))


def test_rejects_malformed_profiles(tmp_path: Path) -> None:
    profile = _profile()
    with pytest.raises(ValueError, match="shape"):
        InterpolatedPerfModel(*{**profile, "decode_itl": profile["decode_itl"].T}.values())
    with pytest.raises(ValueError, match="one value per"):
        InterpolatedPerfModel(*{**profile, "prefill_ttft_ms": np.array([1.0, 2.0])}.values())
    with pytest.raises(ValueError, match="at least 2"):
        InterpolatedPerfModel(
            *{**profile, "prefill_isl": np.array([1.0]), "prefill_ttft_ms": np.array([1.0])}.values()
        )
    del profile["decode_itl"]
    save_npz(tmp_path / "partial.npz", profile)
    with pytest.raises(ValueError, match="decode_itl"):
        InterpolatedPerfModel.from_file(tmp_path / "partial.npz")
