"""What a Route request may claim, checked against the model card of the workers it would go to.

A caller that claims a prompt of 4,294,967,295 tokens, or sends a million block hashes, would
have that recorded as active load and as predicted cache on the worker chosen, and skew every
later decision until it expires. The model card bounds both: a prompt fits the context length,
and its complete blocks number at most ``context_length // block_size``. Checked before anything
is recorded; a request for a model no worker serves is left to the scheduler (UNAVAILABLE).
"""

from __future__ import annotations

from tokenyard.common.errors import InvalidArgument
from tokenyard.router.scheduler import RouteQuery
from tokenyard.router.workers import WorkerSet

# Longest request id, in characters: an id is a key in every table, not a payload.
MAX_REQUEST_ID = 1024


def check_route_bounds(query: RouteQuery, workers: WorkerSet) -> None:
    if len(query.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id: at most {MAX_REQUEST_ID} characters, got {len(query.request_id)}")
    session = query.hints.session_id or ""
    if len(session) > MAX_REQUEST_ID:
        # A session id is a key of the session table (and of every replica's).
        raise InvalidArgument(f"hints.session_id: at most {MAX_REQUEST_ID} characters, got {len(session)}")
    cards = [
        c for w in workers.for_model(query.model, query.pool) if (c := w.instance.model_card) is not None
    ]
    if not cards:
        return
    # The most any of them takes: a request valid for one eligible worker is valid.
    context = max(c.context_length for c in cards)
    block_size = min(c.block_size for c in cards)
    max_blocks = context // block_size
    isl = query.isl_tokens
    blocks = len(query.local_hashes)
    where = f"model {query.model!r} (context length {context} tokens, blocks of {block_size})"
    if isl > context:
        raise InvalidArgument(f"isl_tokens: {isl} is more than the context length of {where}")
    if blocks > max_blocks:
        raise InvalidArgument(
            f"block_hashes: {blocks} blocks are more than a prompt of {where} can have ({max_blocks})"
        )
    if isl and blocks * block_size > isl:
        raise InvalidArgument(
            f"block_hashes: {blocks} complete blocks of {block_size} tokens do not fit a prompt of "
            f"isl_tokens={isl}"
        )
    expected = query.hints.expected_output_tokens
    if expected is not None and expected > context:
        raise InvalidArgument(
            f"hints.expected_output_tokens: {expected} is more than the context length of {where}"
        )
