"""The whole token path with real processes and real clients: client → frontend → router →
worker → tokens back, over KServe v2 gRPC (tritonclient) and OpenAI HTTP (the openai package).

One deployment per module, in a discovery directory: a router (round-robin), two mocker workers
that never sleep, one mocker worker of another model that runs in real time (so that a request
stays in flight long enough to be abandoned), and the frontend. tritonclient defines the same
protobuf package (``inference``) as our generated code, so it runs in a child process of its own.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from openai.types.responses import ResponseIncompleteEvent, ResponseTextDeltaEvent

from tests.fixtures.processes import ServiceProcess, run_to_exit, wait_for_instance
from tokenyard.api.router.v1 import router_pb2, router_pb2_grpc
from tokenyard.api.worker.v1 import worker_pb2, worker_pb2_grpc
from tokenyard.common.discovery import Instance, open_discovery

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
SLOW_MODEL = "slow-model"


@dataclass
class Deployment:
    root: Path
    discovery: str
    router: Instance
    workers: list[Instance]
    slow_worker: Instance
    frontend: Instance
    procs: list[ServiceProcess]

    @property
    def http(self) -> str:
        return f"http://{self.frontend.metrics_address}"

    def openai(self) -> openai.OpenAI:
        # No retries: a 503 must reach the test as a 503.
        return openai.OpenAI(base_url=self.http + "/v1", api_key="unused", max_retries=0, timeout=60)


def _start(root: Path, name: str, argv: list[str]) -> ServiceProcess:
    return ServiceProcess(argv, root / f"{name}.log")


async def _instances(discovery: str, service: str, count: int, procs: list[ServiceProcess]) -> list[Instance]:
    client = open_discovery(discovery)
    try:
        deadline = time.monotonic() + 60
        while True:
            found = await client.instances(service)
            if len(found) >= count:
                return found
            for proc in procs:
                if proc.proc.poll() is not None:
                    raise AssertionError(f"{proc.argv} exited:\n{proc.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} {service} instances never registered")
            await asyncio.sleep(0.1)
    finally:
        await client.close()


def _worker_argv(discovery: str, *extra: str) -> list[str]:
    return ["worker", "--port", "0", "--metrics-port", "0", "--discovery", discovery, *extra]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("token-path")
    discovery = f"dir://{root / 'discovery'}"
    procs = [
        _start(
            root,
            "router",
            [
                "router",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--discovery",
                discovery,
                "--mode",
                "round-robin",
            ],
        ),
        _start(root, "worker-a", _worker_argv(discovery, "--mocker-speedup-ratio", "0")),
        _start(root, "worker-b", _worker_argv(discovery, "--mocker-speedup-ratio", "0")),
        _start(
            root, "worker-slow", _worker_argv(discovery, "--model", SLOW_MODEL, "--mocker-speedup-ratio", "1")
        ),
        _start(root, "frontend", ["frontend", "--port", "0", "--http-port", "0", "--discovery", discovery]),
    ]
    try:
        workers = asyncio.run(_instances(discovery, "worker", 3, procs))
        router = asyncio.run(wait_for_instance(discovery, "router", proc=procs[0]))
        frontend = asyncio.run(wait_for_instance(discovery, "frontend", proc=procs[-1]))
        fast = [w for w in workers if w.model_card is not None and w.model_card.model == MODEL]
        slow = next(w for w in workers if w.model_card is not None and w.model_card.model == SLOW_MODEL)
        d = Deployment(root, discovery, router, fast, slow, frontend, procs)
        _wait_ready(d)
        yield d
        # Shutdown is part of the path: SIGTERM drains and exits 0, without a traceback.
        assert procs[-1].terminate() == 0
        assert "Traceback" not in procs[-1].output()
    finally:
        for proc in procs:
            proc.close()


def _wait_ready(d: Deployment) -> None:
    """The frontend lists both models and the router has seen both workers of the main model."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            models = _get_json(d.http + "/v1/models")
        except OSError:
            models = {"data": []}
        if {m["id"] for m in models["data"]} >= {MODEL, SLOW_MODEL}:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the frontend never listed the models:\n{d.procs[-1].output()}")
    seen: set[int] = set()
    with grpc.insecure_channel(d.router.address) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        while len(seen) < 2 and time.monotonic() < deadline:
            try:
                reply = router.Route(
                    router_pb2.RouteRequest(request_id="ready-probe", model=MODEL, dry_run=True), timeout=5
                )
            except grpc.RpcError as exc:
                # The router learns of workers through its own discovery watch: it may lag the frontend.
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.05)
                continue
            seen.add(reply.worker_id)
            if len(seen) < 2:
                time.sleep(0.05)
    assert len(seen) == 2, "the router never saw both workers"


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _generate_calls(worker: Instance) -> float:
    """Requests the worker ended, whichever call carried them (Generate or GenerateMux)."""
    with urllib.request.urlopen(f"http://{worker.metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tokenyard_worker_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _active_blocks(worker: Instance) -> int:
    with grpc.insecure_channel(worker.address) as channel:
        load = worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
    return sum(int(rank.active_blocks) for rank in load.ranks)


def _eventually(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


# ---- KServe v2 with tritonclient ------------------------------------------------------------

TRITON_CLIENT = r"""
import faulthandler, json, queue, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, model = sys.argv[1], sys.argv[2]
# Should a call hang, the stacks of every thread tell where (the test's own timeout is 120 s).
faulthandler.dump_traceback_later(90, exit=True)
client = grpcclient.InferenceServerClient(url)
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "decoupled": client.get_model_config(model).config.model_transaction_policy.decoupled,
    "metadata_inputs": [i.name for i in client.get_model_metadata(model).inputs],
}

def tensor(name, dtype, value):
    t = grpcclient.InferInput(name, [1], dtype)
    t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else None))
    return t

text = tensor("text_input", "BYTES", "What is the capital of France?".encode())
max_tokens = grpcclient.InferInput("max_tokens", [1], "INT32")
max_tokens.set_data_from_numpy(np.array([6], dtype=np.int32))

result = client.infer(model, [text, max_tokens], request_id="unary-1", client_timeout=30)
out["unary"] = {
    "text": result.as_numpy("text_output")[0].decode(),
    "finish": result.as_numpy("finish_reason")[0].decode(),
    "id": result.get_response().id,
}
try:
    client.infer(model, [text, tensor("streaming", "BOOL", True)], client_timeout=30)
    out["unary_streaming_error"] = None
except InferenceServerException as exc:
    out["unary_streaming_error"] = exc.status()

responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)))
client.async_stream_infer(model, [text, max_tokens, tensor("streaming", "BOOL", True)], request_id="s-1")
client.async_stream_infer(model, [text, tensor("bogus", "BYTES", b"x")], request_id="s-bad")
client.async_stream_infer(model, [text, max_tokens], request_id="s-2")
events = []
finals = set()
try:
    while len(finals) < 3:
        result, error = responses.get(timeout=30)
        if error is not None:
            events.append({"error": str(error)})
            finals.add("s-bad")
            continue
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        events.append({
            "id": response.id,
            "text": result.as_numpy("text_output")[0].decode(),
            "finish": result.as_numpy("finish_reason")[0].decode(),
            "final": final,
        })
        if final:
            finals.add(response.id)
except BaseException:
    # The stream's response thread is not a daemon: exiting with the stream open would wait for
    # it forever. Cancel the stream and say what did arrive.
    print(json.dumps({"stream_so_far": events}), file=sys.stderr)
    client.stop_stream(cancel_requests=True)
    raise
client.stop_stream()
out["stream"] = events
print(json.dumps(out))
"""


def test_tritonclient_unary_and_streaming(deployment: Deployment) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CLIENT, deployment.frontend.address, MODEL],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    assert out["live"] and out["ready"] and out["model_ready"] and out["decoupled"]
    assert out["metadata_inputs"][0] == "text_input"
    unary = out["unary"]
    assert unary["text"] and unary["finish"] == "length" and unary["id"] == "unary-1"
    assert out["unary_streaming_error"] == "StatusCode.INVALID_ARGUMENT"
    events = out["stream"]
    errors = [e for e in events if "error" in e]
    assert len(errors) == 1 and "bogus" in errors[0]["error"]
    streamed = [e for e in events if e.get("id") == "s-1"]
    assert len(streamed) >= 1 and streamed[-1]["final"] and not any(e["final"] for e in streamed[:-1])
    assert streamed[-1]["finish"] == "length"
    assert all(e["finish"] == "" for e in streamed[:-1])
    assert "".join(e["text"] for e in streamed)
    whole = [e for e in events if e.get("id") == "s-2"]
    assert len(whole) == 1 and whole[0]["final"] and whole[0]["text"] and whole[0]["finish"] == "length"


# ---- OpenAI HTTP with the openai package ------------------------------------------------------


def test_openai_completions_stream_and_not(deployment: Deployment) -> None:
    client = deployment.openai()
    extra = {"ignore_eos": True}
    unary = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=9, seed=7, extra_body=extra
    )
    assert unary.usage is not None and unary.usage.completion_tokens == 9
    assert unary.usage.prompt_tokens > 0
    assert unary.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=9,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == unary.choices[0].text
    usage = chunks[-1].usage
    assert (
        usage is not None
        and usage.completion_tokens == 9
        and usage.prompt_tokens == unary.usage.prompt_tokens
    )


def test_openai_chat_stream_and_not(deployment: Deployment) -> None:
    client = deployment.openai()
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    extra = {"ignore_eos": True}
    unary = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=12, seed=3, extra_body=extra
    )
    assert unary.usage is not None and unary.usage.completion_tokens == 12
    assert unary.usage.prompt_tokens_details is not None
    assert unary.usage.prompt_tokens_details.cached_tokens is not None
    assert unary.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_openai_responses_stream_and_not(deployment: Deployment) -> None:
    client = deployment.openai()
    extra = {"ignore_eos": True, "seed": 4}
    unary = client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input="Name a colour.",
        max_output_tokens=10,
        extra_body=extra,
    )
    assert unary.object == "response" and unary.id.startswith("resp_")
    # Ten tokens asked, ten made: the output stopped at the limit.
    assert unary.status == "incomplete"
    assert unary.incomplete_details is not None and unary.incomplete_details.reason == "max_output_tokens"
    assert unary.usage is not None and unary.usage.output_tokens == 10 and unary.usage.input_tokens > 0
    assert unary.output_text
    events = list(
        client.responses.create(
            model=MODEL,
            instructions="Be brief.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}],
            max_output_tokens=10,
            stream=True,
            extra_body=extra,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    # Same input, same seed: the same text as the unary response.
    assert deltas == unary.output_text
    last = events[-1]
    assert isinstance(last, ResponseIncompleteEvent)
    final = last.response
    assert final.output_text == unary.output_text and final.usage is not None
    assert final.usage.output_tokens == 10


def test_requests_spread_across_both_workers(deployment: Deployment) -> None:
    client = deployment.openai()
    before = [_generate_calls(w) for w in deployment.workers]
    for _ in range(4):
        client.completions.create(model=MODEL, prompt="spread", max_tokens=2)

    def served() -> list[float]:
        return [_generate_calls(w) - b for w, b in zip(deployment.workers, before, strict=True)]

    # A worker counts a request once its stream ended, just after the client saw the end.
    _eventually(lambda: sum(served()) >= 4, "the workers counted the calls")
    # Sequential requests under round-robin alternate between the two workers.
    assert served() == [2, 2]


def test_a_client_that_disconnects_mid_stream_frees_the_worker_blocks(deployment: Deployment) -> None:
    worker = deployment.slow_worker
    body = {
        "model": SLOW_MODEL,
        "prompt": "go " * 200,
        "max_tokens": 8000,
        "ignore_eos": True,
        "stream": True,
    }
    request = urllib.request.Request(
        deployment.http + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        assert response.readline().startswith(b"data: ")
        assert _active_blocks(worker) > 0
    # The connection is closed. Generating 8000 tokens takes the real-time mocker tens of
    # seconds, so only the cancellation of the worker call frees its blocks before the deadline.
    _eventually(lambda: _active_blocks(worker) == 0, "the worker freed the abandoned request's blocks")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b"{"),
        ("/v1/completions", b'"just a string"'),
        ("/v1/completions", json.dumps({"model": MODEL}).encode()),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -3}).encode()),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": 5}]}).encode()),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hello"}).encode()),
    ],
)
def test_malformed_bodies_are_400(deployment: Deployment, path: str, body: bytes) -> None:
    status, out = _post(deployment.http + path, body)
    assert status == 400
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["message"]


def test_unknown_model_is_404(deployment: Deployment) -> None:
    with pytest.raises(openai.NotFoundError):
        deployment.openai().completions.create(model="no-such-model", prompt="x", max_tokens=1)


def test_a_model_without_workers_is_503(deployment: Deployment) -> None:
    doomed = _start(
        deployment.root,
        "worker-doomed",
        _worker_argv(deployment.discovery, "--model", "doomed", "--mocker-speedup-ratio", "0"),
    )
    try:
        _eventually(lambda: "doomed" in _listed(deployment), "the frontend listed the model", timeout=60)
        doomed.terminate()
        _eventually(lambda: "doomed" not in _listed(deployment), "the frontend saw the worker leave")
        with pytest.raises(openai.InternalServerError) as info:
            deployment.openai().completions.create(model="doomed", prompt="x", max_tokens=1)
        assert info.value.status_code == 503
    finally:
        doomed.close()


def _listed(d: Deployment) -> set[str]:
    return {m["id"] for m in _get_json(d.http + "/v1/models")["data"]}


def test_a_busy_http_port_is_a_one_line_startup_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_to_exit(
            ["frontend", "--port", "0", "--http-port", str(port), "--discovery", f"dir://{tmp_path}"],
            timeout=60,
        )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--http-port" in lines[0] and "TOKENYARD_FRONTEND_HTTP_PORT" in lines[0] and str(port) in lines[0]
