"""The CPU engine's step executor: a transformers model over paged KV, and the sampling after it.

Every torch op of the engine runs on one dedicated compute thread (:meth:`CpuExecutor.load`
explains why); the event loop waits for each forward pass without blocking, so it keeps serving
gRPC while the model works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

from tokenyard.common.errors import Unavailable
from tokenyard.worker.engines.base import EngineRequest, GuidedKind, KvBlockLayout
from tokenyard.worker.engines.core.block_pool import Block, BlockPool
from tokenyard.worker.engines.core.executor import ExecutorSpec
from tokenyard.worker.engines.core.scheduler import Scheduled, SequenceState
from tokenyard.worker.engines.cpu import attention
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.guided import Guide, GuideFactory
from tokenyard.worker.engines.cpu.kv_storage import KvGeometry, KvStorage
from tokenyard.worker.engines.cpu.model import LoadedModel, ModelLoadError, load_model, use_attention
from tokenyard.worker.engines.cpu.runner import ModelRunner
from tokenyard.worker.engines.cpu.sampling import Sampler

log = logging.getLogger(__name__)

KV_DTYPE = "float32"


def process_age_s() -> float:
    """Seconds since this process started (Linux: its start time in /proc, 10 ms ticks); NaN
    elsewhere."""
    try:
        with open("/proc/self/stat") as stat:
            # Fields after the command name (which may hold spaces): the 22nd, starttime, is 20th.
            start_ticks = int(stat.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as uptime:
            now = float(uptime.read().split()[0])
        return now - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def default_num_threads() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


class CpuExecutor:
    """:class:`~tokenyard.worker.engines.core.executor.StepExecutor` with KV bytes and guided
    decoding: the torch forward pass of one rank."""

    def __init__(self, config: CpuEngineConfig, *, model: LoadedModel | None = None) -> None:
        """``model``: weights loaded already (by :func:`~tokenyard.worker.engines.cpu.model.load_model`);
        the executor switches it to paged attention, so it must not be shared with other users."""
        self.config = config
        self._loaded = model
        self._guide_file: tuple[Path, int] | None = None
        self._guides: GuideFactory | None = None
        self._guides_loaded = False
        self._guides_lock = threading.Lock()
        self._storage: KvStorage | None = None
        self._runner: ModelRunner | None = None
        self._layout: KvBlockLayout | None = None
        self._thread: ThreadPoolExecutor | None = None

    @property
    def model(self) -> LoadedModel:
        if self._loaded is None:
            raise Unavailable("the CPU engine has not loaded its model yet")
        return self._loaded

    @property
    def storage(self) -> KvStorage:
        if self._storage is None:
            raise Unavailable("the CPU engine is not started")
        return self._storage

    async def load(self) -> ExecutorSpec:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenyard-cpu-engine")
        loop = asyncio.get_running_loop()
        try:
            storage = await loop.run_in_executor(self._thread, self._build)
        except ModelLoadError as exc:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise Unavailable(str(exc)) from None
        loaded = self.model
        g = loaded.geometry
        cfg = self.config
        self._storage = storage
        self._runner = ModelRunner(loaded.model, storage)
        layout_key = (
            f"{g.num_layers}/{g.num_kv_heads}/{g.head_dim}/{cfg.block_size}/{KV_DTYPE}/kv-layer-major"
        )
        self._layout = KvBlockLayout(
            num_layers=g.num_layers,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            block_size=cfg.block_size,
            dtype=KV_DTYPE,
            layout_hash=xxhash.xxh3_64_intdigest(layout_key.encode()),
        )
        log.info("CPU model loaded: %d KV blocks, %d threads", storage.num_blocks, torch.get_num_threads())
        return ExecutorSpec(
            num_blocks=storage.num_blocks,
            context_length=g.max_position_embeddings,
            eos_token_ids=loaded.eos_token_ids,
        )

    def _build(self) -> KvStorage:
        """Load the model and allocate the KV tensors, on the compute thread.

        PyTorch runs its intra-op parallelism on an OpenMP thread team per calling thread. Two
        threads that both run parallel ops means two teams on the same cores, whose idle workers
        then sleep instead of spinning, and a forward pass (hundreds of parallel regions) gets
        about 60% slower. So the model is loaded, the pools are allocated, and every forward pass
        runs here; the event loop only touches torch for tiny tensors and numpy views.
        """
        cfg = self.config
        started = process_age_s()
        torch.set_num_threads(cfg.num_threads or default_num_threads())
        clock = time.perf_counter()
        if self._loaded is None:
            self._loaded = load_model(cfg, attn_implementation=attention.ATTN_IMPLEMENTATION)
        else:
            use_attention(self._loaded.model, attention.ATTN_IMPLEMENTATION)
        weights_s, clock = time.perf_counter() - clock, time.perf_counter()
        g = self._loaded.geometry
        self._guide_file = self._guide_source(self._loaded)
        geometry = KvGeometry(g.num_layers, g.num_kv_heads, g.head_dim, cfg.block_size)
        num_blocks = cfg.num_kv_blocks or max(1, int(cfg.kv_cache_gib * (1 << 30)) // geometry.block_bytes)
        storage = KvStorage(num_blocks, geometry)
        # One line with where a start goes (bench/gms.py reads it): what the process did before
        # the engine (interpreter, imports, settings), the weights, the KV pools.
        log.info(
            "CPU engine startup: engine began %.2fs after process start, weights %.2fs, KV pools %.2fs, "
            "ready %.2fs after process start",
            started,
            weights_s,
            time.perf_counter() - clock,
            process_age_s(),
        )
        return storage

    @staticmethod
    def _guide_source(loaded: LoadedModel) -> tuple[Path, int] | None:
        """The tokenizer file and logits width guided decoding needs; None (no guided decoding)
        for a model without EOS or without a tokenizer file next to its weights."""
        path = loaded.weights_dir / "tokenizer.json"
        if not loaded.eos_token_ids or not path.is_file():
            return None
        return path, loaded.geometry.vocab_size

    def _guide_factory(self) -> GuideFactory | None:
        """llguidance's view of the vocabulary, loaded by the first guided request: it takes
        about half a second and 70 MiB of private memory (for a 49k vocabulary), which a worker
        that never sees a guided request, or is only starting, need not pay. None when llguidance
        cannot use the tokenizer."""
        with self._guides_lock:
            if not self._guides_loaded and self._guide_file is not None:
                self._guides = GuideFactory.load(*self._guide_file)  # warns once when it cannot
                self._guides_loaded = True
            return self._guides

    def bind(self, dp_rank: int, pool: BlockPool) -> None:
        if dp_rank != 0 or pool.num_blocks != self.storage.num_blocks:
            raise ValueError("the CPU engine runs one rank over its own KV storage")

    def sampler(self, request: EngineRequest) -> Sampler:
        return Sampler.from_params(
            request.sampling, self.config.default_temperature, self.config.default_top_p
        )

    async def execute(self, dp_rank: int, plan: Sequence[Scheduled]) -> dict[SequenceState, int]:
        assert self._runner is not None and self._thread is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._runner.step, plan)

    def finish_delay_s(self, seq: SequenceState) -> float:
        return 0.0

    def idle(self, dp_rank: int) -> None:
        """Real time: nothing to restart."""

    async def close(self) -> None:
        if self._thread is not None:
            # Let a forward pass still running finish before anything is torn down.
            thread, self._thread = self._thread, None
            await asyncio.to_thread(thread.shutdown, wait=True)

    # -- guided decoding --------------------------------------------------------------------

    def guided_kinds(self) -> tuple[GuidedKind, ...]:
        return GuideFactory.kinds if self._guide_file is not None else ()

    def guide(self, request: EngineRequest) -> Guide | None:
        """The request's output constraint; ValueError for a schema the guide cannot compile, or
        when llguidance cannot use the model's tokenizer. Called off the event loop: the first
        guided request loads the vocabulary here."""
        if request.guided is None or self._guide_file is None:
            return None
        factory = self._guide_factory()
        if factory is None:
            raise ValueError("guided decoding is off: llguidance cannot use this model's tokenizer")
        # Once the output is complete it ends: on the model's EOS or a stop token, whichever the
        # model prefers (a stop token is what ends a request that ignores EOS).
        ends = dict.fromkeys((*self.model.eos_token_ids, *sorted(request.stop_token_ids)))
        return factory.guide(request.guided, tuple(ends))

    # -- KV bytes ---------------------------------------------------------------------------

    def block_bytes(self) -> int:
        return self.storage.geometry.block_bytes

    def kv_layout(self) -> KvBlockLayout:
        if self._layout is None:
            raise Unavailable("the CPU engine is not started")
        return self._layout

    def read_block(self, dp_rank: int, block: Block) -> bytes:
        return self.storage.read_block(block)

    def write_block(self, dp_rank: int, block: Block, data: bytes) -> None:
        self.storage.write_block(block, data)
