"""vLLM's own offline engine on the prompts test_parity.py sends through Tokenyard.

    python tests/vllm/offline_reference.py MODEL_FOLDER PROMPTS.json

PROMPTS.json: ``{"prompts": [[token ids], ...], "salts": [...], "max_tokens": N}``. Each prompt is
generated alone, greedily, with the engine settings the vllm worker uses, under its own cache salt
(as through Tokenyard), so that both sides compute every prompt from scratch in a batch of one.
Prints ``RESULT {"outputs": [[token ids], ...]}`` (vLLM logs to stdout too).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    folder, prompts_path = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tokenyard.worker.engines.vllm.config import VllmEngineConfig

    spec = json.loads(prompts_path.read_text())
    cfg = VllmEngineConfig()
    llm: Any = LLM(
        model=folder,
        dtype=cfg.dtype,
        enforce_eager=True,
        block_size=cfg.block_size,
        enable_prefix_caching=cfg.enable_prefix_caching,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        kv_cache_memory_bytes=int(cfg.kv_cache_gib * (1 << 30)),
    )
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], detokenize=False)
    outputs = []
    for prompt, salt in zip(spec["prompts"], spec["salts"], strict=True):
        (result,) = llm.generate(
            [TokensPrompt(prompt_token_ids=prompt, cache_salt=salt)], params, use_tqdm=False
        )
        outputs.append(list(result.outputs[0].token_ids))
    print("RESULT " + json.dumps({"outputs": outputs}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
