"""Attention over the paged KV cache, plugged into transformers as an attention implementation.

One engine step runs the model once on a *packed* batch: every scheduled request's new tokens side
by side in one row, each with its own absolute position (RoPE takes positions per token, and every
other layer works token by token). Only attention needs to know where one request ends and the
next begins, so the step hands a :class:`PagedBatch` through the model's forward keyword arguments
(transformers passes unknown keyword arguments down to the attention function). Per layer, the
function writes the new tokens' K and V into their slots, then attends:

* requests that compute one token (decoding) together, padded to the longest context, one call;
* requests that compute several (a prompt or a chunk of one) each on their own, causal over their
  cached prefix and the chunk.

Registered through ``AttentionInterface``, the public extension point, so the layers, norms, RoPE
and MLPs are the model's own code and any causal LM whose attention goes through that interface
(Llama, Qwen2, Mistral, ...) runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "tokenyard_paged"
BATCH_KWARG = "tokenyard_batch"


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    """A request computing ``length`` tokens at rows ``[row, row + length)`` of the packed batch."""

    row: int
    length: int
    context_slots: torch.Tensor
    """Slots of every token it attends to: the cached prefix, then the chunk."""
    mask: torch.Tensor | None
    """``[length, context]`` (True: attend), None when there is no prefix (plain causal)."""


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Requests computing one token each, padded to the longest context."""

    rows: torch.Tensor
    """``[n]`` rows of the packed batch."""
    context_slots: torch.Tensor
    """``[n * longest]`` slots, row-major; padding points at slot 0 and is masked."""
    longest: int
    mask: torch.Tensor | None
    """``[n, 1, 1, longest]`` (True: attend), None when every context has the same length."""


@dataclass(frozen=True, slots=True)
class PagedBatch:
    k_pool: torch.Tensor
    """``[layers, slots, kv_heads, head_dim]``"""
    v_pool: torch.Tensor
    write_slots: torch.Tensor
    """``[tokens]``: where each new token's K and V go."""
    prefills: tuple[PrefillSpan, ...]
    decode: DecodeGroup | None


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query`` ``[1, heads, tokens, dim]``, ``key``/``value`` ``[1, kv_heads, tokens, dim]`` (RoPE
    applied); returns ``[1, tokens, heads, dim]`` as transformers' own implementations do."""
    batch: PagedBatch = kwargs[BATCH_KWARG]
    layer = int(module.layer_idx)  # type: ignore[arg-type]  # an int attribute of every attention module
    k_pool = batch.k_pool[layer]
    v_pool = batch.v_pool[layer]
    k_pool.index_copy_(0, batch.write_slots, key[0].transpose(0, 1))
    v_pool.index_copy_(0, batch.write_slots, value[0].transpose(0, 1))

    _, heads, tokens, dim = query.shape
    kv_heads = k_pool.shape[1]
    out = query.new_empty((1, tokens, heads, dim))
    gqa = heads != kv_heads
    for span in batch.prefills:
        q = query[:, :, span.row : span.row + span.length]
        k = k_pool.index_select(0, span.context_slots).transpose(0, 1).unsqueeze(0)
        v = v_pool.index_select(0, span.context_slots).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=span.mask, is_causal=span.mask is None, scale=scaling, enable_gqa=gqa
        )
        out[0, span.row : span.row + span.length] = o[0].transpose(0, 1)
    group = batch.decode
    if group is not None:
        n = group.rows.shape[0]
        q = query[0, :, group.rows].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, dim]
        k = k_pool.index_select(0, group.context_slots).view(n, group.longest, kv_heads, dim).transpose(1, 2)
        v = v_pool.index_select(0, group.context_slots).view(n, group.longest, kv_heads, dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scaling, enable_gqa=gqa)
        out[0, group.rows] = o.squeeze(2)
    return out, None


def register() -> None:
    """Make ``attn_implementation=ATTN_IMPLEMENTATION`` available to transformers models (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)


def causal_mask_with_prefix(length: int, context: int) -> torch.Tensor:
    """``[length, context]``: query i (at position ``context - length + i``) sees keys up to itself."""
    keys = torch.arange(context)
    last_visible = torch.arange(length) + (context - length)
    return keys[None, :] <= last_visible[:, None]
