"""Performance profiles: what one worker does at a given load, measured by ``tokenyard profile``.

File format (JSON, ``tokenyard-profile/1``; an NPZ with the same array keys is read too). The
array keys are the mocker's interpolated perf model's (the mocker can replay a profile with
``--mocker-perf-model-path``), plus throughput and the worker's limits:

``prefill_isl`` (tokens, 1-D, ascending)
    Prompt lengths swept, one request at a time with nothing cached.
``prefill_ttft_ms`` (ms, same length)
    Time to first token of such a request on an idle worker.
``prefill_throughput_tokens_per_s`` (optional; derived when absent)
    ``isl / ttft``: prompt tokens per second one worker computes at that length.
``decode_active_kv_tokens`` (tokens, 1-D) and ``decode_context_length`` (tokens, 1-D)
    The axes of the decode grid. Cell ``[i, j]`` was measured with ``round(kv_i / ctx_j)``
    requests (at least 1, at most ``max_num_seqs``) decoding at a mean context of ``ctx_j``.
``decode_itl`` (ms, shape ``(len(kv), len(ctx))``)
    Mean inter-token latency in that cell.
``decode_throughput_tokens_per_s`` (optional; derived when absent)
    Output tokens per second of the whole worker in that cell: ``concurrency / itl``.
``max_kv_tokens``, ``max_num_seqs``, ``max_num_batched_tokens`` (scalars)
    The worker's KV capacity in tokens, its most running requests and its step token budget.
    Absent (a mocker profile): the largest swept KV, 256 and 8192.
``meta`` (object, JSON only)
    Free-form: engine, model, settings of the worker that was swept, when.

A file that does not parse, lacks a key, or holds non-finite, negative or unsorted values is
refused with :class:`ProfileError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

FORMAT = "tokenyard-profile/1"
_ARRAYS = ("prefill_isl", "prefill_ttft_ms", "decode_active_kv_tokens", "decode_context_length", "decode_itl")
_DEFAULT_MAX_NUM_SEQS = 256
_DEFAULT_MAX_BATCHED = 8192

Array = NDArray[np.float64]


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Profile:
    prefill_isl: Array
    prefill_ttft_ms: Array
    decode_active_kv_tokens: Array
    decode_context_length: Array
    decode_itl: Array
    max_kv_tokens: int
    max_num_seqs: int = _DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = _DEFAULT_MAX_BATCHED
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _axis(self.prefill_isl, "prefill_isl")
        _axis(self.decode_active_kv_tokens, "decode_active_kv_tokens")
        _axis(self.decode_context_length, "decode_context_length")
        if self.prefill_ttft_ms.shape != self.prefill_isl.shape:
            raise ProfileError("prefill_ttft_ms must have one value per prefill_isl point")
        shape = (self.decode_active_kv_tokens.size, self.decode_context_length.size)
        if self.decode_itl.shape != shape:
            raise ProfileError(
                f"decode_itl must have shape (len(decode_active_kv_tokens), len(decode_context_length)) "
                f"= {shape}, got {self.decode_itl.shape}"
            )
        for name in ("prefill_ttft_ms", "decode_itl"):
            values = getattr(self, name)
            if not np.all(np.isfinite(values)) or np.any(values <= 0):
                raise ProfileError(f"{name} must hold positive, finite milliseconds")
        for name in ("max_kv_tokens", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProfileError(f"{name} must be a positive integer, got {value!r}")

    @property
    def prefill_throughput_tokens_per_s(self) -> Array:
        return self.prefill_isl / self.prefill_ttft_ms * 1000.0

    @property
    def decode_throughput_tokens_per_s(self) -> Array:
        concurrency = decode_concurrency(
            self.decode_active_kv_tokens, self.decode_context_length, self.max_num_seqs
        )
        return concurrency / self.decode_itl * 1000.0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "meta": self.meta,
            "max_kv_tokens": self.max_kv_tokens,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "prefill_isl": self.prefill_isl.tolist(),
            "prefill_ttft_ms": _rounded(self.prefill_ttft_ms),
            "prefill_throughput_tokens_per_s": _rounded(self.prefill_throughput_tokens_per_s),
            "decode_active_kv_tokens": self.decode_active_kv_tokens.tolist(),
            "decode_context_length": self.decode_context_length.tolist(),
            "decode_itl": _rounded(self.decode_itl),
            "decode_throughput_tokens_per_s": _rounded(self.decode_throughput_tokens_per_s),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def decode_concurrency(kv: Array, ctx: Array, max_num_seqs: int) -> Array:
    """The number of requests each decode cell was measured with (see the module docstring)."""
    grid = np.rint(kv[:, None] / ctx[None, :])
    return np.clip(grid, 1, max_num_seqs)


def _rounded(values: Array) -> Any:
    return np.round(values, 4).tolist()


def _axis(values: Array, name: str) -> None:
    if values.ndim != 1 or values.size < 2:
        raise ProfileError(f"{name} must be a 1-D array of at least 2 points")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ProfileError(f"{name} must hold positive, finite token counts")
    if np.any(np.diff(values) <= 0):
        raise ProfileError(f"{name} must be strictly ascending")


def _scalar(raw: Any, name: str, default: int | None) -> int:
    value = raw.get(name) if isinstance(raw, dict) else None
    if value is None:
        if default is None:
            raise ProfileError(f"lacks {name}")
        return default
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size == 1 else value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ProfileError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ProfileError(f"{name} must be an integer, got {value!r}")
    return int(number)


def load_profile(path: str | Path) -> Profile:
    """Read a JSON or NPZ profile; :class:`ProfileError` says what is wrong and where."""
    path = Path(path)
    try:
        return _load(path)
    except ProfileError as exc:
        raise ProfileError(f"profile {path}: {exc}") from None


def _load(path: Path) -> Profile:
    raw: dict[str, Any]
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                raw = {key: np.asarray(npz[key]) for key in npz.files}
        else:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                raise ProfileError("a profile is a JSON object")
            raw = doc
    except FileNotFoundError:
        raise ProfileError("no such file") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(f"does not parse: {exc}") from None
    fmt = raw.get("format", FORMAT)
    if fmt != FORMAT:
        raise ProfileError(f"format {fmt!r} is not {FORMAT!r}")
    arrays: dict[str, Array] = {}
    for key in _ARRAYS:
        if key not in raw:
            raise ProfileError(f"lacks {key}")
        try:
            arrays[key] = np.asarray(raw[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise ProfileError(f"{key} is not an array of numbers") from None
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise ProfileError("meta must be an object")
    kv = arrays["decode_active_kv_tokens"]
    default_kv = int(np.max(kv)) if kv.size else None
    return Profile(
        **arrays,
        max_kv_tokens=_scalar(raw, "max_kv_tokens", default_kv),
        max_num_seqs=_scalar(raw, "max_num_seqs", _DEFAULT_MAX_NUM_SEQS),
        max_num_batched_tokens=_scalar(raw, "max_num_batched_tokens", _DEFAULT_MAX_BATCHED),
        meta=meta,
    )
