"""Connectors apply the planner's decisions: ``local`` processes, ``kubernetes`` Deployments, or a
``virtual`` outside agent through discovery; ``none`` only reports."""

from tokenyard.planner.connectors.base import (
    Connector,
    ConnectorError,
    NoConnector,
    count_workers,
    pool_of,
    workers_by_pool,
)

__all__ = ["Connector", "ConnectorError", "NoConnector", "count_workers", "pool_of", "workers_by_pool"]
