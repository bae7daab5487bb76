"""What one request may ask for and how many the frontend serves at once.

Every refusal names the setting that caused it, flag and environment variable both, so that the
client reading the error and the operator reading the log know which knob to turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenyard.common.errors import InvalidArgument, Overloaded


def _setting(flag: str) -> str:
    return f"--{flag} / TOKENYARD_FRONTEND_{flag.upper().replace('-', '_')}"


@dataclass(frozen=True, slots=True)
class Limits:
    """0 means no limit beyond the model's own (its context length)."""

    max_prompt_tokens: int = 0
    max_output_tokens: int = 0
    max_inflight_requests: int = 0
    # Seconds from arrival to the last token.
    request_timeout: float = 0.0
    # What a request that names no max_tokens gets (under max_output_tokens when both are set).
    default_max_tokens: int = 0

    def output_tokens(self, requested: int | None) -> int | None:
        """The max_tokens a request runs with; InvalidArgument when it asks for more than allowed."""
        limit = self.max_output_tokens
        if requested is None:
            # With a default, the limit is set once the prompt's length is known (default_output).
            return None if self.default_max_tokens else (limit or None)
        if not limit:
            return requested
        if requested > limit:
            raise InvalidArgument(
                f"max_tokens: {requested} is more than this server allows ({limit}, {_setting('max-output-tokens')})"
            )
        return requested

    def default_output(self, requested: int | None, prompt_tokens: int, context_length: int) -> int | None:
        """The max_tokens of a request that named none: the default cap (under max_output_tokens),
        within what the context leaves after the prompt, so that a default never makes a request
        too long for the model."""
        if requested is not None or not self.default_max_tokens:
            return requested
        cap = min(self.default_max_tokens, self.max_output_tokens or self.default_max_tokens)
        return max(1, min(cap, context_length - prompt_tokens))

    def check_prompt(self, prompt_tokens: int) -> None:
        limit = self.max_prompt_tokens
        if limit and prompt_tokens > limit:
            raise InvalidArgument(
                f"the prompt has {prompt_tokens} tokens, more than this server allows ({limit}, "
                f"{_setting('max-prompt-tokens')})"
            )


# Stop strings are matched on every piece of output text, on the event loop: their number and
# length bound the work per token (OpenAI itself takes 4).
MAX_STOP_STRINGS = 256
MAX_STOP_STRING_CHARS = 1024


def check_stop_strings(stop: Sequence[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise InvalidArgument(
            f"stop: a stop string may have at most {MAX_STOP_STRING_CHARS} characters, got one of {longest}"
        )


class Admission:
    """Counts the requests in flight against ``--max-inflight-requests``."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def admit(self) -> None:
        if self.limit and self.active >= self.limit:
            raise Overloaded(
                f"this frontend is serving its limit of {self.limit} requests "
                f"({_setting('max-inflight-requests')}); retry later"
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


def stream_limit_error(limit: int) -> Overloaded:
    return Overloaded(
        f"this stream already has {limit} requests in flight ({_setting('max-streams-per-connection')}); "
        "wait for one to finish or open another stream"
    )
