"""The OpenAI-compatible HTTP surface (``/v1/...``) plus ``/health`` and ``/metrics``."""

from __future__ import annotations

import time

from aiohttp import web

from tokenyard.common.metrics import Metrics
from tokenyard.frontend.models import ModelRegistry

REGISTRY_KEY = web.AppKey("registry", ModelRegistry)
METRICS_KEY = web.AppKey("metrics", Metrics)
READY_KEY = web.AppKey("ready", list)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


async def health(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    ready = bool(request.app[READY_KEY][0])
    models = sorted(registry.models())
    body = {"status": "healthy" if ready else "starting", "models": models}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    data, content_type = request.app[METRICS_KEY].render()
    # aiohttp wants the charset apart from the mime type.
    return web.Response(body=data, headers={"Content-Type": content_type})


async def list_models(request: web.Request) -> web.Response:
    now = int(time.time())
    cards = request.app[REGISTRY_KEY].models()
    data = [
        {"id": name, "object": "model", "created": now, "owned_by": "tokenyard", "max_model_len": card.context_length}
        for name, card in sorted(cards.items())
    ]
    return web.json_response({"object": "list", "data": data})


async def not_found(request: web.Request) -> web.Response:
    return _error(404, f"no route for {request.method} {request.path}", "not_found_error")


def build_app(registry: ModelRegistry, metrics_: Metrics, ready: list[bool]) -> web.Application:
    # Prompts can be long; 32 MiB bounds a hostile body without refusing real ones.
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[REGISTRY_KEY] = registry
    app[METRICS_KEY] = metrics_
    app[READY_KEY] = ready
    app.router.add_get("/health", health)
    app.router.add_get("/live", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
