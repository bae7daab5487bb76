"""The engine layer: the protocols every engine speaks (``base``), the registry (``registry``), the
batching core shared by engines that Tokenyard schedules itself (``core``), and one package per
engine (``mocker``, ``cpu``, ``vllm``)."""

from tokenyard.worker.engines.registry import ENGINES, EngineKind, create_engine

__all__ = ["ENGINES", "EngineKind", "create_engine"]
