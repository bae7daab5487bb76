"""Client API keys: loaded once, compared in constant time.

Keys come from a file (one per line; blank lines and ``#`` comments skipped) and/or a
comma-separated setting. A request presents one as ``Authorization: Bearer <key>`` (the OpenAI
clients' ``api_key``), in HTTP headers or gRPC metadata. Each candidate is compared with
:func:`hmac.compare_digest` against every configured key, so the time taken says nothing about
how much of a key matched, nor which key it was.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

BEARER = "bearer "
MIN_KEY_LENGTH = 16


class ApiKeyError(Exception):
    """The configured keys cannot be used; the message names the source."""


def _clean(keys: Iterable[str], source: str) -> list[str]:
    out = []
    for key in keys:
        key = key.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
            raise ApiKeyError(
                f"an API key in {source} is shorter than {MIN_KEY_LENGTH} characters or has spaces"
            )
        out.append(key)
    return out


class ApiKeys:
    """The keys a deployment accepts; empty means client authentication is off."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = [k.encode() for k in dict.fromkeys(keys)]

    @classmethod
    def load(cls, inline: str = "", file: str = "") -> ApiKeys:
        keys = _clean(inline.split(","), "--api-keys") if inline else []
        if file:
            try:
                text = Path(file).read_text()
            except OSError as exc:
                raise ApiKeyError(f"cannot read the API keys file {file!r}: {exc.strerror or exc}") from None
            found = _clean(text.splitlines(), file)
            if not found:
                raise ApiKeyError(f"the API keys file {file!r} holds no key")
            keys += found
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def valid(self, key: str) -> bool:
        candidate = key.encode()
        match = False
        for known in self._keys:
            # No early exit: every key is compared whatever matched before.
            match |= hmac.compare_digest(candidate, known)
        return match

    def authorized(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` value carries a valid key (always true when off)."""
        if not self._keys:
            return True
        if not authorization or authorization[: len(BEARER)].lower() != BEARER:
            return False
        return self.valid(authorization[len(BEARER) :].strip())
