"""Planner process wiring."""

from __future__ import annotations

from tokenyard.common.service import ServiceRuntime
from tokenyard.planner.config import PlannerSettings
from tokenyard.planner.replicas import ReplicaObserver
from tokenyard.planner.servicer import SERVICE_NAME, PlannerServicer
from tokenyard.planner.v1 import planner_pb2_grpc


async def serve(settings: PlannerSettings) -> None:
    async with ServiceRuntime(settings, service="planner", metrics_port=settings.metrics_port) as runtime:
        observer = ReplicaObserver(runtime.discovery)
        servicer = PlannerServicer(observer)
        runtime.add_servicer(planner_pb2_grpc.add_PlannerServiceServicer_to_server, servicer, SERVICE_NAME)
        await runtime.start()
        observer.start()
        runtime.on_close(observer.close)
        runtime.set_serving(True)
        await runtime.wait_for_shutdown()
