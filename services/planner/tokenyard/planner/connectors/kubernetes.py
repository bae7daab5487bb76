"""The ``kubernetes`` connector: each pool is a Deployment whose replicas are set through the
scale subresource (``apps/v1 .../deployments/NAME/scale``), with the official client.

Scaling a pool reads its Scale, then patches ``spec.replicas`` with the ``resourceVersion`` it
read (a JSON merge patch), so that a concurrent writer (a person with ``kubectl scale``, a
rollout) makes the API server answer 409 Conflict instead of being overwritten blindly; on a
conflict the connector reads again and retries, a few times. It then waits until the
Deployment reports that many ready replicas. Ready replicas (``status.readyReplicas``) are what
:meth:`current_replicas` reports.

The planner's service account needs ``get`` on ``deployments`` and ``get``/``patch`` on
``deployments/scale`` (deploy/k8s/base/planner.yaml grants exactly that).

The client is synchronous; calls run in a worker thread so the planner's loop never blocks.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenyard.planner.connectors.base import ConnectorError
from tokenyard.planner.pools import Pool

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"
DEFAULT_DEPLOYMENTS = {
    Pool.AGGREGATED: "tokenyard-worker",
    Pool.PREFILL: "tokenyard-worker-prefill",
    Pool.DECODE: "tokenyard-worker-decode",
}


@dataclass(frozen=True)
class KubernetesOptions:
    api_server: str = ""
    """Empty: in-cluster configuration (service account), else the kubeconfig."""
    namespace: str = ""
    """Empty: the service account's namespace, else ``default``."""
    token_file: str = ""
    ca_file: str = ""
    verify_tls: bool = True
    deployments: dict[Pool, str] = field(default_factory=lambda: dict(DEFAULT_DEPLOYMENTS))
    request_timeout_s: float = 10.0
    conflict_retries: int = 3
    ready_timeout_s: float = 600.0
    poll_interval_s: float = 2.0


def _namespace(options: KubernetesOptions) -> str:
    if options.namespace:
        return options.namespace
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip() or "default"
    except OSError:
        return os.environ.get("POD_NAMESPACE", "default")


def _configuration(options: KubernetesOptions) -> Any:
    from kubernetes import client

    # The config loaders carry no annotations.
    config: Any = importlib.import_module("kubernetes.config")

    cfg = client.Configuration()
    if options.api_server:
        cfg.host = options.api_server.rstrip("/")
        if options.token_file:
            try:
                token = Path(options.token_file).read_text().strip()
            except OSError as exc:
                raise ConnectorError(
                    f"cannot read the API token {options.token_file}: {exc.strerror}"
                ) from None
            cfg.api_key = {"authorization": f"Bearer {token}"}
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            try:
                config.load_kube_config(client_configuration=cfg)
            except (config.ConfigException, OSError) as exc:
                raise ConnectorError(
                    "no Kubernetes API to talk to: not in a cluster, no kubeconfig, and no "
                    f"--kubernetes-api-server ({exc})"
                ) from None
    if options.ca_file:
        cfg.ssl_ca_cert = options.ca_file
    cfg.verify_ssl = options.verify_tls
    # The planner retries on its next tick; urllib3's own retries would only stretch a failure.
    cfg.retries = 0
    return cfg


class KubernetesConnector:
    def __init__(self, options: KubernetesOptions, pools: tuple[Pool, ...]) -> None:
        from kubernetes import client

        self.options = options
        self.pools = pools
        self.namespace = _namespace(options)
        self._api = client.AppsV1Api(client.ApiClient(_configuration(options)))
        missing = [p.value for p in pools if not options.deployments.get(p)]
        if missing:
            raise ConnectorError(f"no Deployment named for pool(s) {', '.join(missing)}")

    def name(self) -> str:
        return "kubernetes"

    def _deployment(self, pool: Pool) -> str:
        return self.options.deployments[pool]

    def _where(self, pool: Pool) -> str:
        return f"Deployment {self.namespace}/{self._deployment(pool)} ({pool.value} pool)"

    async def _call(self, pool: Pool, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["_request_timeout"] = self.options.request_timeout_s
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            raise _translate(exc, f"{what} {self._where(pool)}") from None

    async def _ready(self, pool: Pool) -> tuple[int, int]:
        """(ready replicas, pods the Deployment runs)."""
        deployment = await self._call(
            pool, "reading", self._api.read_namespaced_deployment, self._deployment(pool), self.namespace
        )
        status = deployment.status
        if status is None:
            return 0, 0
        return int(status.ready_replicas or 0), int(status.replicas or 0)

    async def current_replicas(self) -> dict[Pool, int]:
        return {pool: (await self._ready(pool))[0] for pool in self.pools}

    async def _patch(self, pool: Pool, replicas: int) -> bool:
        """Set spec.replicas; False when it already was that. Retries on 409 Conflict."""
        from kubernetes.client.exceptions import ApiException

        name = self._deployment(pool)
        for attempt in range(self.options.conflict_retries + 1):
            scale = await self._call(
                pool, "reading the scale of", self._api.read_namespaced_deployment_scale, name, self.namespace
            )
            if scale.spec is not None and scale.spec.replicas == replicas:
                return False
            body = {
                "metadata": {"resourceVersion": scale.metadata.resource_version},
                "spec": {"replicas": replicas},
            }
            try:
                await asyncio.to_thread(
                    self._api.patch_namespaced_deployment_scale,
                    name,
                    self.namespace,
                    body,
                    _content_type=MERGE_PATCH,
                    _request_timeout=self.options.request_timeout_s,
                )
                return True
            except ApiException as exc:
                if exc.status == 409 and attempt < self.options.conflict_retries:
                    log.info("conflict scaling %s, reading it again (%s)", self._where(pool), _message(exc))
                    continue
                raise _translate(exc, f"scaling {self._where(pool)} to {replicas}") from None
            except Exception as exc:
                raise _translate(exc, f"scaling {self._where(pool)} to {replicas}") from None
        raise AssertionError("unreachable")

    async def _wait(self, pool: Pool, replicas: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.ready_timeout_s
        while True:
            ready, pods = await self._ready(pool)
            if ready >= replicas and pods == replicas:
                return
            if loop.time() > deadline:
                raise ConnectorError(
                    f"{self._where(pool)}: {ready} of {replicas} replicas ready ({pods} pods) after "
                    f"{self.options.ready_timeout_s:.0f}s"
                )
            await asyncio.sleep(self.options.poll_interval_s)

    async def scale(self, target: dict[Pool, int], decision_id: int) -> None:
        for pool, replicas in target.items():
            if await self._patch(pool, replicas):
                log.info("decision %d: %s scaled to %d", decision_id, self._where(pool), replicas)
        await asyncio.gather(*(self._wait(pool, n) for pool, n in target.items()))

    async def close(self) -> None:
        await asyncio.to_thread(self._api.api_client.close)


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if body:
        try:
            doc = json.loads(body)
            if isinstance(doc, dict) and doc.get("message"):
                return str(doc["message"])
        except ValueError:
            pass
        return str(body)[:200]
    return str(getattr(exc, "reason", "") or exc)


def _translate(exc: Exception, doing: str) -> ConnectorError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ConnectorError):
        return exc
    if isinstance(exc, ApiException):
        status = exc.status
        if status == 404:
            return ConnectorError(f"{doing}: not found ({_message(exc)})")
        if status in (401, 403):
            return ConnectorError(
                f"{doing}: not allowed (HTTP {status}: {_message(exc)}); the planner's service account "
                "needs get on deployments and get/patch on deployments/scale"
            )
        if status == 409:
            return ConnectorError(f"{doing}: conflicting updates kept winning ({_message(exc)})")
        return ConnectorError(f"{doing}: the API server answered HTTP {status} ({_message(exc)})")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "timed out" in text.lower() or isinstance(exc, TimeoutError):
        return ConnectorError(f"{doing}: the API server did not answer in time ({text})")
    return ConnectorError(f"{doing}: cannot reach the API server ({type(exc).__name__}: {text})")
