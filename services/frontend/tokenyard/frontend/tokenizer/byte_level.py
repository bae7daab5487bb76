"""The GPT-2 byte-to-character alphabet, and ``builtin:bytes``: a vocabulary of the 256 bytes (id = byte
value) plus three ChatML specials, small enough for tests that need real text without a model."""

from __future__ import annotations

from functools import cache

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from tokenyard.frontend.tokenizer.chat_template import CHATML_TEMPLATE
from tokenyard.frontend.tokenizer.hf import HFTokenizer

BYTES_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 256, 257, 258


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from a byte to a printable character: byte-level BPE vocabularies (GPT-2, SmolLM2,
    Llama 3, Qwen) spell their tokens in it, so that no token contains whitespace or control bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def build_byte_tokenizer() -> HFTokenizer:
    alphabet = bytes_to_unicode()
    backend = Backend(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    # No merges, so the regex split would change nothing; skipping it keeps every byte its own token.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in BYTES_SPECIALS])
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
    }
    return HFTokenizer(backend, config, "builtin:bytes")
