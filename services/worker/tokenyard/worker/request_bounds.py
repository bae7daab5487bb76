"""Sizes a Generate request may have, whoever sends it.

The frontend bounds what clients ask for, but a worker is reachable by other callers too; every
field that the worker keeps, logs, compiles or loops over per token is bounded here, and the
prompt by the engine's context length (in :func:`tokenyard.worker.intake.validate`).
"""

from __future__ import annotations

from tokenyard.common.errors import InvalidArgument
from tokenyard.worker.engines.base import EngineRequest

# Ids and names are keys (in-flight tables, metric-free logs), not payloads.
MAX_ID_CHARS = 1024
# Token ids that end generation, checked on every token.
MAX_STOP_TOKEN_IDS = 1024
# Free-form annotations carried to the engine.
MAX_ANNOTATIONS = 64
MAX_ANNOTATION_CHARS = 4096
# A JSON schema to constrain the output to; compiled per request (the frontend's own limit is
# 64 KiB; other callers get some room, not unbounded compile time).
MAX_SCHEMA_BYTES = 1024 * 1024


def check_request_bounds(request: EngineRequest, context_length: int) -> None:
    for name, value in (
        ("request_id", request.request_id),
        ("lora_name", request.lora_name),
        ("cache_salt", request.cache_salt),
    ):
        if len(value) > MAX_ID_CHARS:
            raise InvalidArgument(f"{name}: at most {MAX_ID_CHARS} characters, got {len(value)}")
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(
            f"stop.stop_token_ids: at most {MAX_STOP_TOKEN_IDS} token ids, got {len(request.stop_token_ids)}"
        )
    if request.max_tokens is not None and request.min_tokens > request.max_tokens:
        raise InvalidArgument(
            f"stop.min_tokens ({request.min_tokens}) is more than stop.max_tokens ({request.max_tokens})"
        )
    if request.min_tokens >= context_length:
        raise InvalidArgument(
            f"stop.min_tokens ({request.min_tokens}) does not fit the context length of {context_length} tokens"
        )
    if len(request.annotations) > MAX_ANNOTATIONS:
        raise InvalidArgument(
            f"annotations: at most {MAX_ANNOTATIONS} entries, got {len(request.annotations)}"
        )
    for key, value in request.annotations.items():
        if len(key) + len(value) > MAX_ANNOTATION_CHARS:
            raise InvalidArgument(
                f"annotations: an entry may have at most {MAX_ANNOTATION_CHARS} characters "
                f"(key and value), got {len(key) + len(value)}"
            )
    guided = request.guided
    if guided is not None and len(guided.json_schema) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(
            f"guided_decoding.json_schema: at most {MAX_SCHEMA_BYTES} bytes, got {len(guided.json_schema)}"
        )
