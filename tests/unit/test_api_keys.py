"""API keys of the frontend: loading, and the Authorization check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenyard.common.api_keys import ApiKeyError, ApiKeys
from tokenyard.frontend.config import FrontendSettings

pytestmark = pytest.mark.unit

A = "sk-aaaaaaaaaaaaaaaaaaaa"
B = "sk-bbbbbbbbbbbbbbbbbbbb"


def test_no_key_means_authentication_is_off() -> None:
    keys = ApiKeys.load("", "")
    assert not keys.enabled
    assert keys.authorized(None) and keys.authorized("Bearer anything")


def test_keys_from_a_file_and_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# team a\n{A}\n\n  {A}  \n")
    keys = ApiKeys.load(B, str(path))
    assert len(keys) == 2
    for key in (A, B):
        assert keys.authorized(f"Bearer {key}")
        assert keys.authorized(f"bearer {key}")
    for header in (
        None,
        "",
        A,
        f"Basic {A}",
        f"Bearer {A[:-1]}",
        f"Bearer {A}x",
        "Bearer ",
        f"Bearer {A},{B}",
    ):
        assert not keys.authorized(header), header


def test_bad_key_sources_are_refused_with_the_source_named(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match="cannot read the API keys file"):
        ApiKeys.load("", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ApiKeyError, match="holds no key"):
        ApiKeys.load("", str(empty))
    with pytest.raises(ApiKeyError, match="shorter than 16"):
        ApiKeys.load("short", "")


def test_the_frontend_reads_keys_from_its_env_or_the_shared_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENYARD_API_KEYS", A)
    assert FrontendSettings().api_keys == A
    monkeypatch.setenv("TOKENYARD_FRONTEND_API_KEYS", B)
    assert FrontendSettings().api_keys == B
