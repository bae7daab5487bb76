"""Before routing: the model's tokenizer, the chat template, token ids and KV block hashes.

Tokenizers are named by the model card (``ModelCard.tokenizer``) and loaded once per reference,
off the event loop (a GGUF vocabulary takes a moment to convert the first time). Requests that
arrive while it loads wait for the same load.

A large prompt is prepared off the event loop too (:meth:`Preprocessor.prepare_async`), in a small
thread pool: its tokenizing releases the GIL (a long text is encoded in pieces, see
:mod:`tokenyard.frontend.tokenizer.large`) and its Python parts (templating, id checks, block
hashes) yield it every switch interval, so other requests keep streaming meanwhile. Small prompts
are prepared in place: a thread hop would cost more than their tokenizing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tokenyard.common.discovery import ModelCard
from tokenyard.common.errors import FailedPrecondition, InvalidArgument
from tokenyard.common.hashing import local_block_hashes, salt_hash
from tokenyard.frontend.generation import GenerationRequest
from tokenyard.frontend.tokenizer import Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prepared:
    token_ids: Sequence[int]
    # The prompt as text, for ``echo`` (None when the client sent token ids and no echo is needed).
    prompt_text: str | None
    # Local hashes of the prompt's complete blocks (what the router indexes by).
    block_hashes: list[int]


# A prompt of at least this many characters (or token ids) is prepared in the pool.
OFF_LOOP_PROMPT_SIZE = 32 * 1024
_POOL_THREADS = 2
_POOL_NICE = 10


def prompt_size(request: GenerationRequest) -> int:
    """Characters (or token ids) of a request's prompt, for choosing where to prepare it."""
    if request.prompt is not None:
        return len(request.prompt)
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    size = 0
    for message in request.messages or ():
        content = message.get("content")
        if isinstance(content, str):
            size += len(content)
    return size


def _lower_priority() -> None:
    """A pool thread yields the CPU to the event loop's thread (Linux nices threads one by one):
    a long prompt may take seconds, the requests streaming meanwhile should not."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _POOL_NICE)


class Preprocessor:
    def __init__(self, loader: Callable[[str], Tokenizer] = load_tokenizer) -> None:
        self._loader = loader
        self._loads: dict[str, asyncio.Future[Tokenizer]] = {}
        self._pool: ThreadPoolExecutor | None = None

    async def prepare_async(
        self, tokenizer: Tokenizer, request: GenerationRequest, card: ModelCard
    ) -> Prepared:
        """:meth:`prepare`, in the pool for a large prompt."""
        if prompt_size(request) < OFF_LOOP_PROMPT_SIZE:
            return self.prepare(tokenizer, request, card)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                _POOL_THREADS, thread_name_prefix="tokenize", initializer=_lower_priority
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.prepare, tokenizer, request, card)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def prefetch(self, ref: str) -> None:
        """Start loading ``ref`` in the background (a model appeared in discovery)."""
        if ref not in self._loads:
            fut = self._start(ref)
            # A failed prefetch is reported to the requests that need it, not here.
            fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    def _start(self, ref: str) -> asyncio.Future[Tokenizer]:
        fut = asyncio.ensure_future(asyncio.to_thread(self._loader, ref))
        self._loads[ref] = fut
        return fut

    async def tokenizer(self, ref: str) -> Tokenizer:
        fut = self._loads.get(ref)
        if fut is None:
            fut = self._start(ref)
        try:
            return await asyncio.shield(fut)
        except Exception as exc:
            # Forget the failure so that a fixed deployment (a package installed) recovers
            # without a restart; the next request tries again.
            if self._loads.get(ref) is fut:
                del self._loads[ref]
            if isinstance(exc, TokenizerError):
                raise FailedPrecondition(str(exc)) from None
            log.exception("loading the tokenizer %r failed", ref)
            raise FailedPrecondition(f"tokenizer {ref!r} could not be loaded") from None

    def prepare(self, tokenizer: Tokenizer, request: GenerationRequest, card: ModelCard) -> Prepared:
        prompt_text: str | None
        if request.messages is not None:
            prompt_text = tokenizer.apply_chat_template(
                [_templatable(m) for m in request.messages],
                add_generation_prompt=request.add_generation_prompt,
                tools=[dict(t) for t in request.tools] if request.tools else None,
                template_kwargs=request.template_kwargs,
            )
            _check_chars(prompt_text, card.context_length)
            # The template already wrote whatever special tokens the model wants.
            token_ids: Sequence[int] = _encode(tokenizer, prompt_text, add_special_tokens=False)
        elif request.prompt is not None:
            prompt_text = request.prompt
            _check_chars(prompt_text, card.context_length)
            token_ids = _encode(tokenizer, prompt_text, add_special_tokens=True)
        elif request.prompt_token_ids is not None:
            token_ids = request.prompt_token_ids
            vocab = tokenizer.vocab_size
            if any(t < 0 or t >= vocab for t in token_ids):
                raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
            prompt_text = tokenizer.decode(token_ids, skip_special_tokens=False) if request.echo else None
        else:
            raise InvalidArgument("a prompt is required")
        if not token_ids:
            raise InvalidArgument("the prompt is empty")
        _check_length(len(token_ids), request.stop.max_tokens, card.context_length)
        seed = salt_hash(request.lora_name, request.cache_salt)
        hashes = local_block_hashes(token_ids, card.block_size, seed)
        return Prepared(token_ids, prompt_text, hashes)


def _templatable(message: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI sends ``content: null`` beside an assistant's tool calls; most chat templates
    concatenate content as a string, so they get "" (templates that know tool calls read those)."""
    out = dict(message)
    if out.get("content") is None:
        out["content"] = ""
    return out


def _encode(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool) -> Sequence[int]:
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except TypeError:
        # JSON may carry lone surrogates ("\ud800"), which are not text a tokenizer can take.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument("the prompt is not valid Unicode (it contains a lone surrogate)") from None
        raise


# No token of the vocabularies served here spans more characters than this (SmolLM2's longest is
# 81). Tokenizing holds the GIL and the event loop with it (about 0.5 s per MB), so a prompt that
# cannot fit the context whatever its tokens is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 256


def _check_chars(text: str, context_length: int) -> None:
    if len(text) > context_length * MAX_CHARS_PER_TOKEN:
        raise InvalidArgument(
            f"the prompt has {len(text)} characters, more than this model's context length "
            f"({context_length} tokens) can hold"
        )


def _check_length(prompt_tokens: int, max_tokens: int | None, context_length: int) -> None:
    if prompt_tokens >= context_length:
        raise InvalidArgument(
            f"the prompt has {prompt_tokens} tokens; this model's context length is {context_length}"
        )
    if max_tokens is not None and prompt_tokens + max_tokens > context_length:
        raise InvalidArgument(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
            f"context length ({context_length})"
        )
