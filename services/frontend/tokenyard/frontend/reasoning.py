"""Reasoning separation: the text a model writes between think tags becomes ``reasoning_content``.

Models of the DeepSeek-R1 / Qwen3 family think in ``<think>`` … ``</think>`` before answering.
There is at most one reasoning block: text before the start tag is content, the first end tag
closes the block, and everything after it is content verbatim (a second start tag included).
Some chat templates open the block themselves (DeepSeek-R1 appends ``<think>\\n`` to the
prompt), so the output starts inside reasoning; such a model may still repeat the start tag,
which is then dropped. Newlines right after the end tag are separators, not content, and are
stripped (as vLLM does). Without an end tag, reasoning runs to the end of the output.

:class:`ReasoningParser` does the same incrementally: it holds back only text that could be
the beginning of a tag, so the concatenation of its deltas equals :func:`parse_reasoning` of the
whole text, however the text was split.
"""

from __future__ import annotations

from enum import Enum

DEFAULT_START_TAG = "<think>"
DEFAULT_END_TAG = "</think>"
_SEPARATOR_NEWLINES = "\r\n"


def parse_reasoning(
    text: str,
    *,
    start_tag: str = DEFAULT_START_TAG,
    end_tag: str = DEFAULT_END_TAG,
    starts_in_reasoning: bool = False,
) -> tuple[str, str]:
    """``(reasoning, content)`` of a whole output."""
    _check_tags(start_tag, end_tag)
    before = ""
    if starts_in_reasoning:
        rest = text.removeprefix(start_tag)
    else:
        s = text.find(start_tag)
        if s == -1:
            return "", text
        before, rest = text[:s], text[s + len(start_tag) :]
    e = rest.find(end_tag)
    if e == -1:
        return rest, before
    return rest[:e], before + rest[e + len(end_tag) :].lstrip(_SEPARATOR_NEWLINES)


class _State(Enum):
    BEFORE = "before"
    REASONING = "reasoning"
    AFTER = "after"


class ReasoningParser:
    """Splits streamed output text into reasoning and content deltas."""

    def __init__(
        self,
        *,
        start_tag: str = DEFAULT_START_TAG,
        end_tag: str = DEFAULT_END_TAG,
        starts_in_reasoning: bool = False,
    ) -> None:
        _check_tags(start_tag, end_tag)
        self._start = start_tag
        self._end = end_tag
        self._state = _State.REASONING if starts_in_reasoning else _State.BEFORE
        # Only while nothing has been emitted from a block the template opened: a repeated
        # start tag there is dropped, so a prefix of it must wait.
        self._at_block_start = starts_in_reasoning
        self._strip_newlines = False
        self._held = ""

    @property
    def in_reasoning(self) -> bool:
        """Whether the text seen so far ends inside the reasoning block."""
        return self._state is _State.REASONING

    def feed(self, text: str) -> tuple[str, str]:
        """``(reasoning_delta, content_delta)`` safe to emit after ``text``."""
        buf = self._held + text
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state is _State.BEFORE:
                i = buf.find(self._start)
                if i == -1:
                    keep = _partial_tag_len(buf, self._start)
                    content.append(buf[: len(buf) - keep])
                    buf = buf[len(buf) - keep :]
                    break
                content.append(buf[:i])
                buf = buf[i + len(self._start) :]
                self._state = _State.REASONING
            elif self._state is _State.REASONING:
                if self._at_block_start:
                    if len(buf) < len(self._start) and self._start.startswith(buf):
                        break
                    self._at_block_start = False
                    buf = buf.removeprefix(self._start)
                i = buf.find(self._end)
                if i == -1:
                    keep = _partial_tag_len(buf, self._end)
                    reasoning.append(buf[: len(buf) - keep])
                    buf = buf[len(buf) - keep :]
                    break
                reasoning.append(buf[:i])
                buf = buf[i + len(self._end) :]
                self._state = _State.AFTER
                self._strip_newlines = True
            else:
                if self._strip_newlines:
                    buf = buf.lstrip(_SEPARATOR_NEWLINES)
                    self._strip_newlines = not buf
                content.append(buf)
                buf = ""
                break
        self._held = buf
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """Held-back text at the end of the output: it turned out not to be a tag."""
        held, self._held = self._held, ""
        self._at_block_start = False
        if self._state is _State.REASONING:
            return held, ""
        return "", held


def _check_tags(start_tag: str, end_tag: str) -> None:
    if not start_tag or not end_tag:
        raise ValueError("reasoning tags must not be empty")
    if start_tag == end_tag:
        raise ValueError("reasoning start and end tags must differ")


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
