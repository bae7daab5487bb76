"""The CPU engine's weights through the memory service (``--cpu-gms``).

The first worker to take the lock (RW) has a child process (``python -m`` this module) load the
model from disk, copy every parameter and buffer into one gms allocation in the dtype the model
computes in, record where each lies (and the model's configuration), and commit; the child then
exits, and with it the memory that loading took. Then the worker does what every later worker,
and every restart, does: take the lock read-only, build the model's skeleton on the meta device
(no memory, no disk) and point each parameter at its place in the mapped memory, so that the
model computes on the shared pages themselves. For Llama-family models the skeleton is the
engine's own (:mod:`.llama`) and transformers is never imported; other architectures use
transformers' model. Every worker on the device then reads one copy of the weights, which
outlives them all.

The RO session is held for the model's life: while any worker maps the weights, no writer can
replace them (a RW connect waits for the last reader).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
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
    use_attention,
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
    # This worker is to publish. The loading runs in a child process that takes the lock itself:
    # a serving process that imported transformers and built the model from disk keeps that
    # memory (well over a hundred MiB) for its whole life, where a child's is gone once it has
    # published. Nothing was allocated yet, so letting go of the lock aborts nothing; a worker
    # that takes it meanwhile publishes instead, and the child then finds its weights (RW_OR_RO).
    client.close()
    layout_hash = _publish_in_child(config)
    client = GmsClient.connect(socket, LockMode.RO, timeout_s=config.gms_timeout_s, client_name=name)
    if client.layout_hash != layout_hash:
        client.close()
        raise ModelLoadError(
            f"the weights in the gms at {socket} were replaced right after this worker published them"
        )
    return client


def _publish_in_child(config: CpuEngineConfig) -> int:
    """Run :func:`publish_main` in a child process; the layout hash it published (or found)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", __name__],
        input=config.model_dump_json(),
        capture_output=True,
        text=True,
        check=False,
    )
    for line in done.stderr.splitlines():
        log.info("weights publisher: %s", line)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise ModelLoadError(f"publishing the weights to the gms failed: {last[0]}")
    try:
        layout_hash = int(json.loads(done.stdout)["layout_hash"])
    except (ValueError, KeyError, TypeError):
        raise ModelLoadError(f"the weights publisher answered {done.stdout[:200]!r}") from None
    log.info("the weights publisher finished in %.2fs", time.perf_counter() - started)
    return layout_hash


def publish_main() -> None:
    """The publisher process: the engine's configuration (JSON) on stdin; takes the lock (RW, or RO
    when another worker published first), loads from disk and publishes; prints the layout hash
    (JSON) on stdout, errors on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    config = CpuEngineConfig.model_validate_json(sys.stdin.read())
    socket = gms_socket(config)
    name = f"cpu weights publisher pid {os.getpid()} (worker pid {os.getppid()})"
    try:
        weights_dir, _ = resolve_weights(config)
        mode = LockMode.RW if config.gms_lock_mode == "rw" else LockMode.RW_OR_RO
        with GmsClient.connect(socket, mode, timeout_s=config.gms_timeout_s, client_name=name) as client:
            if client.mode is LockMode.RO:
                layout_hash = client.layout_hash or 0
            else:
                layout_hash = _publish(client, config, weights_dir)
    except (ModelLoadError, TokenyardError) as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"layout_hash": layout_hash}))


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
    model = _skeleton(description["config"], description.get("generation_config"))
    tensors = mapped_tensors(client, layout, prefix=TENSOR_PREFIX)
    _attach(model, tensors)
    model.eval()
    model.requires_grad_(False)
    if attn_implementation is not None:
        use_attention(model, attn_implementation)
    return LoadedModel(
        model=model,
        weights_dir=weights_dir,
        geometry=geometry_of(model.config),
        eos_token_ids=eos_ids(model),
        converted=False,
        load_seconds=0.0,
        gms_session=client,
    )


def _skeleton(config: dict[str, Any], generation_config: dict[str, Any] | None) -> Any:
    """The model on the meta device (no memory: every tensor is replaced by its mapped one): our
    own Llama when it computes what transformers would (no transformers import, which is most of
    a restart and a large share of a worker's private memory), else transformers' model."""
    from tokenyard.worker.engines.cpu import llama

    if llama.supports(config):
        return llama.build(config, generation_config)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    if generation_config:
        model.generation_config = GenerationConfig.from_dict(generation_config)
    return model


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


if __name__ == "__main__":
    publish_main()
