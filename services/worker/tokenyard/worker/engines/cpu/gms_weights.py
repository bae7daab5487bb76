"""The CPU engine's weights through the memory service (``--cpu-gms``).

The first worker to take the lock (RW) loads the model from disk, copies every parameter and
buffer into one gms allocation, records where each lies (and the model's configuration), and
commits. Then it does what every later worker, and every restart, does: take the lock read-only,
build the model's skeleton on the meta device (no memory, no disk) and point each parameter at
its place in the mapped memory. Every worker on the device then reads one copy of the weights,
which outlives them all.

The RO session is held for the model's life: while any worker maps the weights, no writer can
replace them (a RW connect waits for the last reader).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tokenyard.common.errors import TokenyardError
from tokenyard.common.gms import GmsClient, LockMode, MetadataEntry, default_socket
from tokenyard.common.gms.tensors import mapped_tensors, publish_tensors
from tokenyard.worker.engines.cpu.config import CpuEngineConfig
from tokenyard.worker.engines.cpu.model import (
    LoadedModel,
    ModelLoadError,
    eos_ids,
    geometry_of,
    load_model_from_disk,
    resolve_weights,
)

log = logging.getLogger(__name__)

MODEL_KEY = "model"
"""Metadata entry describing the model: which weights, its configuration (JSON)."""
TENSOR_PREFIX = "tensor/"
FORMAT = 1


def gms_socket(config: CpuEngineConfig) -> str:
    return config.gms_socket or default_socket()


def _identity(weights_dir: Path) -> str:
    """Names the weights: the converted GGUF directory's name carries its content key."""
    return str(weights_dir.resolve())


def load_model_via_gms(config: CpuEngineConfig, *, attn_implementation: str | None = None) -> LoadedModel:
    """The configured model with its weights in the gms; blocking (waits for the lock)."""
    socket = gms_socket(config)
    started = time.perf_counter()
    weights_dir, _ = resolve_weights(config)
    try:
        client = _session(config, socket, weights_dir)
        try:
            loaded = _map(client, weights_dir, socket, attn_implementation)
        except BaseException:
            client.close()
            raise
    except TokenyardError as exc:
        raise ModelLoadError(
            f"gms at {socket} (--cpu-gms-socket / TOKENYARD_WORKER_CPU__GMS_SOCKET): {exc}"
        ) from None
    loaded.load_seconds = time.perf_counter() - started
    log.info(
        "mapped %s from the gms at %s in %.2fs (layout %#018x)",
        weights_dir.name,
        socket,
        loaded.load_seconds,
        client.layout_hash or 0,
    )
    return loaded


def _session(config: CpuEngineConfig, socket: str, weights_dir: Path) -> GmsClient:
    """A read-only session on published weights: publish them first when this worker gets RW."""
    name = f"cpu worker pid {os.getpid()}"
    client = GmsClient.connect(
        socket, LockMode(config.gms_lock_mode), timeout_s=config.gms_timeout_s, client_name=name
    )
    if client.mode is LockMode.RO:
        return client
    try:
        layout_hash = _publish(client, config, weights_dir)
    finally:
        client.close()  # a writer that failed aborts: nothing half-published stays
    client = GmsClient.connect(socket, LockMode.RO, timeout_s=config.gms_timeout_s, client_name=name)
    if client.layout_hash != layout_hash:
        client.close()
        raise ModelLoadError(
            f"the weights in the gms at {socket} were replaced right after this worker published them"
        )
    return client


def _publish(client: GmsClient, config: CpuEngineConfig, weights_dir: Path) -> int:
    """Load from disk, copy every tensor into the gms, commit; returns the layout hash."""
    loaded = load_model_from_disk(config)
    model = loaded.model
    tensors = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    allocation = publish_tensors(client, tensors, prefix=TENSOR_PREFIX)
    generation = getattr(model, "generation_config", None)
    description = {
        "format": FORMAT,
        "identity": _identity(loaded.weights_dir),
        "config": model.config.to_dict(),
        "generation_config": generation.to_dict() if generation is not None else None,
    }
    client.put_metadata(
        [MetadataEntry(MODEL_KEY, allocation.allocation_id, 0, json.dumps(description).encode())]
    )
    layout_hash = client.commit()
    log.info(
        "published %d tensors (%d bytes) of %s to the gms (layout %#018x)",
        len(tensors),
        allocation.size,
        weights_dir.name,
        layout_hash,
    )
    return layout_hash


def _map(client: GmsClient, weights_dir: Path, socket: str, attn_implementation: str | None) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    layout = client.import_layout()
    try:
        description = json.loads(layout.entry(MODEL_KEY).value)
    except KeyError:
        raise ModelLoadError(
            f"the gms at {socket} holds a layout that is not a CPU engine's weights"
        ) from None
    if description.get("format") != FORMAT or description.get("identity") != _identity(weights_dir):
        client.close()
        raise ModelLoadError(
            f"the gms at {socket} holds the weights of {description.get('identity')!r}, not "
            f"{_identity(weights_dir)!r}: serve that model, or give this one its own gms"
        )
    model_config = AutoConfig.for_model(**description["config"])
    # The meta device allocates nothing: every tensor is replaced by its mapped one below.
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    if description.get("generation_config"):
        model.generation_config = GenerationConfig.from_dict(description["generation_config"])
    tensors = mapped_tensors(client, layout, prefix=TENSOR_PREFIX)
    _attach(model, tensors)
    model.eval()
    model.requires_grad_(False)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return LoadedModel(
        model=model,
        weights_dir=weights_dir,
        geometry=geometry_of(model.config),
        eos_token_ids=eos_ids(model),
        converted=False,
        load_seconds=0.0,
        gms_session=client,
    )


def _attach(model: Any, tensors: dict[str, Any]) -> None:
    """Point every parameter and buffer of ``model`` at its mapped tensor; tensors that share
    memory (tied weights) become one parameter again."""
    import torch

    params: dict[int, torch.nn.Parameter] = {}
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            param = params.get(id(tensor))
            if param is None:
                param = params[id(tensor)] = torch.nn.Parameter(tensor, requires_grad=False)
            module._parameters[leaf] = param
        elif leaf in module._buffers:
            module._buffers[leaf] = tensor
        else:
            raise ModelLoadError(f"the gms holds tensor {name!r}, which this model does not have")
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(f"the gms lacks {len(missing)} tensors of this model, e.g. {missing[0]!r}")
