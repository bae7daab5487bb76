"""One forward pass of the model over a step's scheduled work, and the sampling after it.

:meth:`ModelRunner.step` runs on the engine's compute thread while the event loop waits for it:
the block tables and token lists it reads change only between steps, and it writes nothing but
the KV pools (the slots of the step's own tokens) and the samplers' generators.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from tokenyard.worker.engines.core.scheduler import Scheduled, SequenceState
from tokenyard.worker.engines.cpu.attention import (
    BATCH_KWARG,
    DecodeGroup,
    PagedBatch,
    PrefillSpan,
    causal_mask_with_prefix,
)
from tokenyard.worker.engines.cpu.guided import Guide, mask_disallowed
from tokenyard.worker.engines.cpu.kv_storage import KvStorage
from tokenyard.worker.engines.cpu.sampling import Sampler, sample


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor
    """``[1, tokens]``: every scheduled request's new tokens, packed."""
    position_ids: torch.Tensor
    batch: PagedBatch
    sample_rows: torch.Tensor
    """Rows whose logits are sampled: the last row of each request that computes its last token."""
    sample_seqs: tuple[SequenceState, ...]
    samplers: tuple[Sampler, ...]
    prompts: tuple[Seq[int], ...]
    """Per sampled request: the prompt and the output so far, for penalties (empty when unused)."""
    outputs: tuple[Seq[int], ...]
    guides: tuple[Guide | None, ...] = ()
    """Per sampled request: its output constraint, if any; empty when no request has one."""


class ModelRunner:
    def __init__(self, model: Any, cache: KvStorage) -> None:
        self.model = model
        self.cache = cache

    def prepare(self, plan: Seq[Scheduled]) -> StepInputs:
        cache = self.cache
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        write: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        decode_rows: list[int] = []
        decode_slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sample_seqs: list[SequenceState] = []
        for work in plan:
            seq, start, length = work.seq, work.start, work.length
            row = len(ids)
            end = start + length
            ids.extend(seq.tokens[start:end])
            positions.append(torch.arange(start, end, dtype=torch.int64))
            write.append(cache.slots(seq.table, start, end))
            context = cache.slots(seq.table, 0, end)
            if length == 1:
                decode_rows.append(row)
                decode_slots.append(context)
            else:
                mask = causal_mask_with_prefix(length, end) if start > 0 else None
                prefills.append(PrefillSpan(row, length, context, mask))
            if work.samples:
                sample_rows.append(row + length - 1)
                sample_seqs.append(seq)

        decode = None
        if decode_rows:
            lengths = [s.shape[0] for s in decode_slots]
            longest = max(lengths)
            padded = torch.zeros((len(decode_rows), longest), dtype=torch.int64)
            for i, slots in enumerate(decode_slots):
                padded[i, : slots.shape[0]] = slots
            mask = None
            if min(lengths) != longest:
                visible = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
                mask = visible[:, None, None, :]
            decode = DecodeGroup(torch.tensor(decode_rows), padded.flatten(), longest, mask)

        penalized = [s.sampler.penalized for s in sample_seqs]
        guides = tuple(s.guide for s in sample_seqs)
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64)[None],
            position_ids=torch.cat(positions)[None],
            batch=PagedBatch(cache.k, cache.v, torch.cat(write), tuple(prefills), decode),
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64),
            sample_seqs=tuple(sample_seqs),
            samplers=tuple(s.sampler for s in sample_seqs),
            prompts=tuple(
                tuple(s.tokens[: s.prompt_len]) if p else ()
                for s, p in zip(sample_seqs, penalized, strict=True)
            ),
            outputs=tuple(tuple(s.output) if p else () for s, p in zip(sample_seqs, penalized, strict=True)),
            guides=guides if any(g is not None for g in guides) else (),
        )

    def step(self, plan: Seq[Scheduled]) -> dict[SequenceState, int]:
        """Compute ``plan``; the token sampled for each request whose work completes its sequence."""
        inputs = self.prepare(plan)
        return dict(zip(inputs.sample_seqs, self.execute(inputs), strict=True))

    def execute(self, inputs: StepInputs) -> list[int]:
        """Run the model, then sample one token per row of ``inputs.sample_rows``."""
        with torch.inference_mode():
            out = self.model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                use_cache=False,
                logits_to_keep=inputs.sample_rows,
                **{BATCH_KWARG: inputs.batch},
            )
            if not inputs.sample_seqs:
                return []
            logits = out.logits[0].float()
            if inputs.guides:
                return _sample_with_guides(logits, inputs)
            return sample(logits, inputs.samplers, inputs.prompts, inputs.outputs)


def _sample_with_guides(logits: torch.Tensor, inputs: StepInputs) -> list[int]:
    """Mask each constrained row to the tokens its guide allows, sample all rows as usual, then
    advance the guides past their tokens."""
    for i, guide in enumerate(inputs.guides):
        if guide is not None:
            mask_disallowed(logits[i], guide)
    tokens = sample(logits, inputs.samplers, inputs.prompts, inputs.outputs)
    for guide, token in zip(inputs.guides, tokens, strict=True):
        if guide is not None:
            guide.accept(token)
    return tokens
