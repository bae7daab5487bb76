"""Hostile request bodies against the frontend's parsers and limits: every one is a clear
InvalidArgument naming the field, never an unexpected exception (a 500)."""

from __future__ import annotations

from typing import Any

import pytest

from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, check_stop_strings
from tokenyard.frontend.responses_api import parse_responses

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("role", [["user"], {"a": 1}, 5, None])
def test_a_message_role_of_any_json_type_is_a_clear_error(role: Any) -> None:
    body = {"model": "m", "input": [{"type": "message", "role": role, "content": "hi"}]}
    with pytest.raises(InvalidArgument, match=r"input\.0\.role"):
        parse_responses(body)


def test_stop_strings_are_bounded_in_number_and_length() -> None:
    check_stop_strings(["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)
    with pytest.raises(InvalidArgument, match=f"at most {MAX_STOP_STRINGS} stop strings"):
        check_stop_strings(["x"] * (MAX_STOP_STRINGS + 1))
    with pytest.raises(InvalidArgument, match=f"at most {MAX_STOP_STRING_CHARS} characters"):
        check_stop_strings(["ok", "x" * (MAX_STOP_STRING_CHARS + 1)])
