"""Chat templates: the Jinja programs shipped with a model that turn a conversation into prompt text.

They run in jinja2's immutable sandbox with the helpers Hugging Face templates expect
(``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text and takes ``indent``,
``loopcontrols`` and a pass-through ``{% generation %}`` block), so templates written for
``transformers`` render the same text here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from typing import Any, NoReturn

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenyard.frontend.tokenizer.errors import ChatTemplateError, TokenizerError

# The conversation format of SmolLM2 and other ChatML models, for tokenizers that ship no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        # The stock sandbox returns an Undefined that prints as "", so `{{ x.__class__ }}` would pass
        # silently; an attempt to escape is a broken (or hostile) template and must fail the render.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; renders its body."""

    tags = {"generation"}  # noqa: RUF012 - the attribute jinja2 reads

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        body: list[nodes.Node] = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return body


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@cache
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


class ChatTemplate:
    """A compiled template plus the special-token strings (``bos_token``, ``eos_token``...) it may use."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except TemplateSyntaxError as exc:
            raise TokenizerError(
                f"chat template does not compile: {exc.message} (line {exc.lineno})"
            ) from exc
        self.source = source
        self._special_tokens = dict(special_tokens or {})

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        context: dict[str, Any] = {**self._special_tokens, **(template_kwargs or {})}
        context.update(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
        try:
            return self._template.render(context)
        except SecurityError as exc:
            raise ChatTemplateError(f"chat template attempted an unsafe operation: {exc}") from exc
        except TemplateError as exc:
            # raise_exception() lands here with the template's own words ("roles must alternate...").
            raise ChatTemplateError(f"chat template rejected the conversation: {exc}") from exc
        except Exception as exc:
            # The template is code from the model files running on request data: a TypeError from a
            # message without "content" is a bad request, not a server fault.
            raise ChatTemplateError(
                f"chat template failed on this conversation: {type(exc).__name__}: {exc}"
            ) from exc
