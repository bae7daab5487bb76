"""KServe v2 ``inference.GRPCInferenceService`` (with Triton's ModelConfig and ModelStreamInfer):
proto in → the frontend core → proto out.

Every served model is a text model with the inputs and outputs of
:mod:`tokenyard.frontend.kserve_tensors`. ModelStreamInfer serves the requests of one stream
concurrently; each request's responses come in order, the last one with the parameter
``triton_final_response = true``, and a request that fails gets a response with
``error_message`` while the stream goes on with the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc

from tokenyard.api.kserve.v2 import grpc_service_pb2 as pb
from tokenyard.api.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tokenyard.api.kserve.v2 import model_config_pb2 as mc
from tokenyard.common.errors import InvalidArgument, NotFound, TokenyardError
from tokenyard.frontend.core import Frontend, new_request_id
from tokenyard.frontend.generation import Endpoint
from tokenyard.frontend.kserve_tensors import (
    INPUTS,
    OUTPUTS,
    build_request,
    check_model_version,
    infer_response,
    parse_infer_request,
)
from tokenyard.frontend.limits import stream_limit_error

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "tokenyard"
MODEL_VERSION = "1"
# Responses buffered per ModelStreamInfer stream.
STREAM_QUEUE = 256

Context = grpc.aio.ServicerContext[Any, Any]


def _server_version() -> str:
    try:
        return version("tokenyard")
    except PackageNotFoundError:
        return "0"


class _Marker:
    """Queue markers of ModelStreamInfer: the reader or one request is done."""


_READER_DONE = _Marker()
_REQUEST_DONE = _Marker()


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, frontend: Frontend, *, max_requests_per_stream: int = 1024) -> None:
        self._frontend = frontend
        self._version = _server_version()
        self._max_per_stream = max_requests_per_stream

    # ---- server and model metadata ----------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self._frontend.models.models()))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            # No "statistics": per-model counters live in /metrics, and perf_analyzer, told the
            # extension exists, picks the model version whose statistics counts grew.
            name=PLATFORM,
            version=self._version,
            extensions=["model_configuration"],
        )

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        served = self._frontend.models.get(request.name) is not None
        return pb.ModelReadyResponse(ready=served and request.version in ("", MODEL_VERSION))

    def _known(self, name: str, version: str = "") -> None:
        if not self._frontend.models.is_known(name):
            raise NotFound(f"the model {name!r} does not exist")
        check_model_version(name, version)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        self._known(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        # max_batch_size is 0, so shapes carry no batch dimension (ModelConfig says the same).
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=[1]) for s in INPUTS],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=[-1]) for s in OUTPUTS],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        self._known(request.name, request.version)
        config = mc.ModelConfig(
            name=request.name,
            platform=PLATFORM,
            backend=PLATFORM,
            max_batch_size=0,
            input=[
                mc.ModelInput(name=s.name, data_type=s.config_type, dims=[1], optional=s.optional)  # type: ignore[arg-type]
                for s in INPUTS
            ],
            output=[mc.ModelOutput(name=s.name, data_type=s.config_type, dims=[-1]) for s in OUTPUTS],  # type: ignore[arg-type]
            # Decoupled: a request may get any number of responses (perf_analyzer --streaming needs it).
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        # Per-model request statistics live in /metrics; this answers with the models only, so
        # that clients that ask (perf_analyzer) carry on.
        names = [request.name] if request.name else sorted(self._frontend.models.models())
        for name in names:
            self._known(name)
        return pb.ModelStatisticsResponse(
            model_stats=[
                pb.ModelStatistics(name=n, version=MODEL_VERSION, inference_stats=pb.InferStatistics())
                for n in names
            ]
        )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        servable = self._frontend.models.models()
        return pb.RepositoryIndexResponse(
            models=[index(name=n, version=MODEL_VERSION, state="READY") for n in sorted(servable)]
        )

    # ---- inference --------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        try:
            parsed = parse_infer_request(request)
            if parsed.stream:
                raise InvalidArgument("streaming is only available on ModelStreamInfer")
            gen_request = build_request(parsed, Endpoint.KSERVE_INFER)
        except TokenyardError as exc:
            self._frontend.count_failure(None, exc, Endpoint.KSERVE_INFER.value)
            raise
        async with await self._frontend.start(gen_request, new_request_id()) as generation:
            text, last = await generation.collect()
        reason = last.finish_reason.value if last.finish_reason else ""
        return infer_response(request.model_name, request.id, text, reason, None)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterable[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Bounded: a client that stops reading holds its requests back instead of growing
        # this queue without end.
        queue: asyncio.Queue[pb.ModelStreamInferResponse | _Marker] = asyncio.Queue(STREAM_QUEUE)
        tasks: set[asyncio.Task[None]] = set()
        spawned = 0

        async def read_requests() -> None:
            nonlocal spawned
            try:
                async for request in request_iterator:
                    if len(tasks) >= self._max_per_stream:
                        # Refused in band: the stream and its other requests go on.
                        exc = stream_limit_error(self._max_per_stream)
                        self._frontend.count_failure(None, exc, Endpoint.KSERVE_STREAM_INFER.value)
                        self._frontend.count_rejection(
                            None, "frontend_limit", Endpoint.KSERVE_STREAM_INFER.value
                        )
                        await queue.put(_stream_error(request.model_name, request.id, exc))
                        continue
                    task = asyncio.create_task(self._serve_one(request, queue))
                    spawned += 1
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                # After the last spawn: once this arrives, `spawned` is final.
                await queue.put(_READER_DONE)

        reader = asyncio.create_task(read_requests())
        reader_done = False
        finished = 0
        try:
            while not (reader_done and finished == spawned):
                item = await queue.get()
                if item is _READER_DONE:
                    reader_done = True
                elif item is _REQUEST_DONE:
                    finished += 1
                else:
                    assert not isinstance(item, _Marker)
                    yield item
        finally:
            # The client cancelled (or the server stops): cancel every request still running,
            # which cancels their worker calls.
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            everything = [reader, *tasks]
            pending = set(everything)
            while pending:
                # Nobody reads the queue any more: empty it, or a cancelled task whose cleanup
                # puts its done marker into a full queue (a client that stopped reading, then
                # left) would wait for room forever.
                while not queue.empty():
                    queue.get_nowait()
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # Retrieves their exceptions (all are done by now).
            await asyncio.gather(*everything, return_exceptions=True)

    async def _serve_one(
        self, request: pb.ModelInferRequest, queue: asyncio.Queue[pb.ModelStreamInferResponse | _Marker]
    ) -> None:
        try:
            await self._respond(request, queue)
        finally:
            await queue.put(_REQUEST_DONE)

    async def _respond(
        self, request: pb.ModelInferRequest, queue: asyncio.Queue[pb.ModelStreamInferResponse | _Marker]
    ) -> None:
        model, rid = request.model_name, request.id
        try:
            parsed = parse_infer_request(request)
            gen_request = build_request(parsed, Endpoint.KSERVE_STREAM_INFER)
        except TokenyardError as exc:
            self._frontend.count_failure(None, exc, Endpoint.KSERVE_STREAM_INFER.value)
            await queue.put(_stream_error(model, rid, exc))
            return
        except Exception as exc:
            # Still a response: a request of the stream must never go unanswered.
            log.exception("parsing request %s on ModelStreamInfer failed", rid or "(no id)")
            await queue.put(_stream_error(model, rid, exc))
            return
        try:
            async with await self._frontend.start(gen_request, new_request_id()) as generation:
                if not gen_request.stream:
                    text, last = await generation.collect()
                    reason = last.finish_reason.value if last.finish_reason else ""
                    await queue.put(
                        pb.ModelStreamInferResponse(
                            infer_response=infer_response(model, rid, text, reason, True)
                        )
                    )
                    return
                async for delta in generation:
                    final = delta.finish_reason is not None
                    reason = delta.finish_reason.value if delta.finish_reason else ""
                    await queue.put(
                        pb.ModelStreamInferResponse(
                            infer_response=infer_response(model, rid, delta.text, reason, final)
                        )
                    )
        except TokenyardError as exc:
            await queue.put(_stream_error(model, rid, exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request %s on ModelStreamInfer failed", rid or "(no id)")
            await queue.put(_stream_error(model, rid, exc))


def _stream_error(model: str, request_id: str, exc: BaseException) -> pb.ModelStreamInferResponse:
    message = str(exc) if isinstance(exc, TokenyardError) else "internal error"
    if isinstance(exc, TokenyardError):
        message = f"{exc.code.name}: {message}"
    response = pb.ModelInferResponse(model_name=model, model_version=MODEL_VERSION, id=request_id)
    # Lets clients that track requests by id see this one end.
    response.parameters["triton_final_response"].bool_param = True
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)
