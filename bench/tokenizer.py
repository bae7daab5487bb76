"""What the frontend's tokenizer costs: loading SmolLM2's tokenizer from its GGUF file (converted vs
cached), templating and encoding a 2000-token prompt, and streaming 2000 generated tokens back to
text (DetokenizeStream vs re-decoding everything at every token, in the same run).

Prints a table and writes JSON to bench/results/tokenizer.json. Loads go to a temporary cache, so
the user's cache is left alone.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import plots
from tokenyard.frontend.tokenizer import DetokenizeStream, Tokenizer, load_tokenizer
from tokenyard.frontend.tokenizer.gguf_vocab import metadata_key
from tokenyard.frontend.tokenizer.registry import shipped_gguf_path

PROMPT_TOKENS = 2000
PARAGRAPH = (
    "The frontend applies the chat template, tokenizes the prompt and hashes its KV blocks before it "
    "asks the router for a worker. Numbers like 3.14159 and 2048 split into digits; naïve café text, "
    "中文字符 and emoji 🎉 take several byte-level tokens each.\n"
)


def timeit(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def prompt_of(tok: Tokenizer, n_tokens: int) -> tuple[list[dict[str, str]], str]:
    text = ""
    while len(tok.encode(text)) < n_tokens:
        text += PARAGRAPH
    ids = tok.encode(text)[:n_tokens]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": tok.decode(ids)},
    ]
    return messages, tok.apply_chat_template(messages)


def encode_unseen(fresh: Tokenizer, helper: Tokenizer) -> float:
    """Median time to encode 2000-token prompts that a new tokenizer (empty BPE word cache) has not
    seen, cut from the standard library's source: the cost of a prompt of new words."""
    source = "".join(Path(m.__file__).read_text() for m in (json, statistics, tempfile) if m.__file__)
    ids = helper.encode(source)
    prompts = [
        helper.decode(ids[i : i + PROMPT_TOKENS]) for i in range(0, len(ids) - PROMPT_TOKENS, PROMPT_TOKENS)
    ]
    samples = []
    for text in prompts:
        t0 = time.perf_counter()
        fresh.encode(text)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def stream_all(tok: Tokenizer, ids: Sequence[int]) -> str:
    stream = DetokenizeStream(tok)
    return "".join(stream.push([i]) for i in ids) + stream.flush()


def redecode_all(tok: Tokenizer, ids: Sequence[int]) -> str:
    # The obvious alternative: decode the whole response at every token and emit the new suffix.
    out, emitted = [], 0
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        if not text.endswith("\ufffd"):
            out.append(text[emitted:])
            emitted = len(text)
    return "".join(out) + tok.decode(ids)[emitted:]


def main() -> None:
    gguf = shipped_gguf_path("smollm2-135m-instruct")
    rows: dict[str, float] = {}
    rows["metadata_key_ms"] = timeit(lambda: metadata_key(gguf), 5) * 1e3
    with tempfile.TemporaryDirectory() as scratch:
        colds = []
        for i in range(3):
            t0 = time.perf_counter()
            load_tokenizer("smollm2", cache_root=Path(scratch) / f"cold{i}")
            colds.append(time.perf_counter() - t0)
        rows["load_converted_ms"] = statistics.median(colds) * 1e3
        warm = Path(scratch) / "cold0"
        rows["load_cached_ms"] = timeit(lambda: load_tokenizer("smollm2", cache_root=warm), 5) * 1e3
        tok = load_tokenizer("smollm2", cache_root=warm)
        rows["encode_unseen_us"] = encode_unseen(load_tokenizer("smollm2", cache_root=warm), tok) * 1e6

    messages, prompt = prompt_of(tok, PROMPT_TOKENS)
    ids = tok.encode(prompt)
    rows["prompt_tokens"] = len(ids)
    rows["template_us"] = timeit(lambda: tok.apply_chat_template(messages), 200) * 1e6
    rows["encode_repeated_us"] = timeit(lambda: tok.encode(prompt), 200) * 1e6
    rows["decode_us"] = timeit(lambda: tok.decode(ids), 200) * 1e6
    response = ids[-PROMPT_TOKENS:]
    assert stream_all(tok, response) == redecode_all(tok, response) == tok.decode(response)
    rows["stream_us_per_token"] = timeit(lambda: stream_all(tok, response), 5) * 1e6 / len(response)
    rows["redecode_us_per_token"] = timeit(lambda: redecode_all(tok, response), 3) * 1e6 / len(response)

    width = max(map(len, rows))
    for name, value in rows.items():
        print(f"{name:<{width}} {value:>12.1f}")
    print(
        f"{'stream speedup vs re-decode':<{width}} {rows['redecode_us_per_token'] / rows['stream_us_per_token']:>11.1f}x"
    )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(rows, indent=2))
    ms = {k.removesuffix("_ms"): v for k, v in rows.items() if k.endswith("_ms")}
    us = {k.removesuffix("_us"): v for k, v in rows.items() if k.endswith("_us")}
    per_token = {k.removesuffix("_us_per_token"): v for k, v in rows.items() if k.endswith("_us_per_token")}
    plots.save(
        out / "tokenizer.json",
        plots.Chart(
            [
                plots.Bars("loading", "ms", {"SmolLM2": ms}, log=True),
                plots.Bars(f"one {rows['prompt_tokens']}-token prompt", "µs", {"SmolLM2": us}),
                plots.Bars("detokenizing a response", "µs per token", {"SmolLM2": per_token}),
            ],
            title="tokenizer (SmolLM2-135M-Instruct)",
        ),
    )


if __name__ == "__main__":
    main()
