"""A Llama-family causal LM in plain PyTorch, for weights mapped from the gms.

With ``--cpu-gms`` a worker that maps published weights needs only the model's code, not
transformers' machinery: importing transformers' modelling stack costs seconds at every start and
over a hundred MiB of private memory in every worker (pages no other process shares, unlike the
mapped weights). So for the architectures listed in :func:`supports` the mapped weights are
put into this module instead, which computes exactly what transformers' ``LlamaForCausalLM``
computes (the same torch ops in the same order: the tests compare logits bit for bit), with the
same parameter names, and the same paged attention (:mod:`.attention`). Anything else still maps
into transformers' own model.

The parameters and buffers are created on the meta device (no memory) and replaced by the mapped
tensors; the rotary frequencies are buffers the publisher stored, so nothing is recomputed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenyard.worker.engines.cpu.attention import ATTN_IMPLEMENTATION, BATCH_KWARG, paged_attention

SDPA = "sdpa"
"""Plain causal attention over the call's own tokens (no KV cache), as transformers' ``sdpa``."""


class Settings:
    """A configuration (or generation configuration) dictionary with attribute access, which is
    all the engine reads of transformers' configuration objects."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        # Only for names not in the dictionary (typed Any for the keys read below).
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def supports(config: dict[str, Any]) -> bool:
    """Whether :class:`LlamaForCausalLM` computes what transformers computes for ``config`` (a
    transformers configuration as a dictionary): Llama with SiLU and plain RoPE, no tensor-parallel
    split of the projections."""
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    return (
        config.get("model_type") == "llama"
        and config.get("hidden_act", "silu") == "silu"
        and rope_type == "default"
        and not config.get("rope_scaling")
        and config.get("pretraining_tp", 1) == 1
        and float(config.get("attention_dropout", 0.0) or 0.0) == 0.0
    )


@dataclass(frozen=True, slots=True)
class CausalLMOutput:
    logits: torch.Tensor


def _meta(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


# torch's nn.Linear and nn.Embedding initialize their weights at construction, which on the meta
# device goes through torch's reference ops and imports torch._dynamo (seconds); these compute the
# same (their forward is the same functional call) and initialize nothing.


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = _meta(out_features, in_features)
        self.bias = _meta(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = _meta(num_embeddings, embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = _meta(hidden_size)
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        # Both come from the publisher's model (transformers stores the original for dynamic RoPE
        # types; kept so that the names match one to one).
        self.inv_freq = nn.Buffer(torch.empty(head_dim // 2, device="meta"), persistent=False)
        self.original_inv_freq = nn.Buffer(torch.empty(head_dim // 2, device="meta"), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        # transformers multiplies by its attention scaling, 1.0 for the plain RoPE supported here
        # (a multiplication by 1.0 changes no bit).
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


class Attention(nn.Module):
    def __init__(self, config: Settings, layer_idx: int, implementation: list[str]) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self._implementation = implementation
        bias = bool(getattr(config, "attention_bias", False))
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = Linear(hidden, heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(heads * self.head_dim, hidden, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Any,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = _apply_rotary(query, key, cos, sin)
        if self._implementation[0] == ATTN_IMPLEMENTATION:
            out, _ = paged_attention(self, query, key, value, None, scaling=self.scaling, **kwargs)
        else:
            # transformers' sdpa without a mask: causal over the call's tokens, grouped KV heads.
            out = F.scaled_dot_product_attention(
                query,
                key,
                value,
                scale=self.scaling,
                is_causal=query.shape[2] > 1,
                enable_gqa=self.num_key_value_groups > 1,
            ).transpose(1, 2)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out)  # type: ignore[no-any-return]  # nn.Module.__call__ is untyped


class MLP(nn.Module):
    def __init__(self, config: Settings) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


class DecoderLayer(nn.Module):
    def __init__(self, config: Settings, layer_idx: int, implementation: list[str]) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, implementation)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class LlamaModel(nn.Module):
    def __init__(self, config: Settings, implementation: list[str]) -> None:
        super().__init__()
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, implementation) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, **kwargs)
        return self.norm(hidden_states)  # type: ignore[no-any-return]


class LlamaForCausalLM(nn.Module):
    """Called like transformers' model by the engine's runner: ``input_ids``, ``position_ids``,
    ``logits_to_keep`` (an int as transformers takes it, or a 1-D tensor of rows) and, with the
    paged attention set, the step's batch as a keyword argument."""

    paged_attention_built_in = True
    """:func:`~tokenyard.worker.engines.cpu.model.use_attention` registers nothing for it."""

    def __init__(self, config: Settings, generation_config: Settings | None = None) -> None:
        super().__init__()
        self.config = config
        self.generation_config = generation_config
        # Shared by every attention layer, so that switching implementation is one assignment.
        self._implementation = [SDPA]
        self.model = LlamaModel(config, self._implementation)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def set_attn_implementation(self, name: str) -> None:
        if name not in (ATTN_IMPLEMENTATION, SDPA):
            raise ValueError(f"attention implementation {name!r}: only {ATTN_IMPLEMENTATION!r} and {SDPA!r}")
        self._implementation[0] = name

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutput:
        if use_cache:
            raise ValueError("this model keeps no cache of its own: the engine's paged KV is the cache")
        if self._implementation[0] == ATTN_IMPLEMENTATION and BATCH_KWARG not in kwargs:
            raise ValueError(f"paged attention needs the step's batch ({BATCH_KWARG})")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
        hidden_states = self.model(input_ids, position_ids, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutput(self.lm_head(hidden_states[:, keep, :]))


def build(config: dict[str, Any], generation_config: dict[str, Any] | None) -> LlamaForCausalLM:
    """The model's skeleton on the meta device (no memory): every parameter and buffer is to be
    replaced by its mapped tensor."""
    return LlamaForCausalLM(Settings(config), Settings(generation_config) if generation_config else None)
