"""A chat completion's output split into content, reasoning and tool calls.

Reasoning is separated first and tool calls are parsed from the content only: a model that
drafts a ``<tool_call>`` while thinking has not called anything.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from tokenyard.common.discovery import ModelCard
from tokenyard.common.errors import InvalidArgument
from tokenyard.frontend.generation import GenerationRequest
from tokenyard.frontend.reasoning import DEFAULT_END_TAG, DEFAULT_START_TAG, ReasoningParser, parse_reasoning
from tokenyard.frontend.tool_calls import (
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    new_tool_call_id,
    parse_tool_calls,
    tool_names,
)


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """What a chunk of output adds to each part of the message; falsy when it adds nothing."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class ChatOutputParser:
    """Streaming split; with neither parser, all text is content."""

    def __init__(
        self, reasoning: ReasoningParser | None = None, tools: ToolCallStreamParser | None = None
    ) -> None:
        self._reasoning = reasoning
        self._tools = tools

    @property
    def tool_call_count(self) -> int:
        return self._tools.call_count if self._tools is not None else 0

    def feed(self, text: str) -> ChatDelta:
        if self._reasoning is None:
            reasoning, content = "", text
        else:
            reasoning, content = self._reasoning.feed(text)
        return self._with_tools(reasoning, content, final=False)

    def flush(self) -> ChatDelta:
        """What the parsers held back, at the end of the output."""
        reasoning, content = self._reasoning.flush() if self._reasoning is not None else ("", "")
        return self._with_tools(reasoning, content, final=True)

    def _with_tools(self, reasoning: str, content: str, *, final: bool) -> ChatDelta:
        if self._tools is None:
            return ChatDelta(content=content, reasoning=reasoning)
        content, calls = self._tools.feed(content)
        if final:
            rest, more = self._tools.flush()
            content += rest
            calls += more
        return ChatDelta(content=content, reasoning=reasoning, tool_calls=tuple(calls))


def parse_chat_output(
    text: str,
    *,
    reasoning: bool,
    tools: bool,
    start_tag: str = DEFAULT_START_TAG,
    end_tag: str = DEFAULT_END_TAG,
    starts_in_reasoning: bool = False,
    valid_tool_names: Collection[str] | None = None,
    id_factory: Callable[[], str] = new_tool_call_id,
) -> tuple[str, str, list[ToolCall]]:
    """``(content, reasoning, tool_calls)`` of a whole output."""
    thought = ""
    content = text
    if reasoning:
        thought, content = parse_reasoning(
            text, start_tag=start_tag, end_tag=end_tag, starts_in_reasoning=starts_in_reasoning
        )
    calls: list[ToolCall] = []
    if tools:
        content, calls = parse_tool_calls(content, valid_names=valid_tool_names, id_factory=id_factory)
    return content, thought, calls


def output_parser(card: ModelCard, request: GenerationRequest) -> ChatOutputParser | None:
    """The parser for a chat or responses request to a model, as its card says; None when the
    output is plain content (the fast path)."""
    reasoning = None
    if card.reasoning_parser in ("think", "deepseek_r1"):
        reasoning = ReasoningParser(starts_in_reasoning=card.reasoning_parser == "deepseek_r1")
    tools = None
    if request.tools and request.tool_choice != "none" and card.tool_call_parser == "hermes":
        tools = ToolCallStreamParser(valid_names=tool_names([dict(t) for t in request.tools]))
    if reasoning is None and tools is None:
        return None
    return ChatOutputParser(reasoning, tools)


def parse_output(card: ModelCard, request: GenerationRequest, text: str) -> tuple[str, str, list[ToolCall]]:
    """``(content, reasoning, tool_calls)`` of a whole output, as :func:`output_parser` would."""
    tools = bool(request.tools) and request.tool_choice != "none" and card.tool_call_parser == "hermes"
    return parse_chat_output(
        text,
        reasoning=card.reasoning_parser in ("think", "deepseek_r1"),
        tools=tools,
        starts_in_reasoning=card.reasoning_parser == "deepseek_r1",
        valid_tool_names=tool_names([dict(t) for t in request.tools]) if tools and request.tools else None,
    )


def merge(a: ChatDelta, b: ChatDelta) -> ChatDelta:
    if not a:
        return b
    if not b:
        return a
    return ChatDelta(a.content + b.content, a.reasoning + b.reasoning, a.tool_calls + b.tool_calls)


def check_capabilities(card: ModelCard, request: GenerationRequest) -> None:
    """Refuse what the model's engine or parsers cannot honour, before anything is generated."""
    if request.guided is not None and request.guided.kind not in card.structured_output:
        supported = (
            f"it supports only {', '.join(card.structured_output)}"
            if card.structured_output
            else "it supports no structured output"
        )
        raise InvalidArgument(
            f"response_format: the {card.engine} engine serving {card.model!r} cannot constrain its "
            f"output to {request.guided.kind} ({supported}); ask without response_format, or "
            "serve the model with an engine that supports it"
        )
    if not request.tools or request.tool_choice == "none":
        return
    # A forced tool call needs the whole parser format (its tags around a JSON document shaped by
    # the tool's schema) constrained, which no engine does yet: refused rather than hoped for.
    if request.tool_choice in ("required", "function"):
        raise InvalidArgument(
            f"tool_choice: {request.tool_choice!r} cannot be enforced for {card.model!r} (no engine "
            "constrains output to a tool call yet); use tool_choice 'auto' or 'none'"
        )
    if not card.tool_call_parser:
        raise InvalidArgument(
            f"tools: the model {card.model!r} is served without a tool-call parser, so tool calls "
            "could not be recognized (start its workers with --tool-call-parser, or send "
            "tool_choice 'none')"
        )
