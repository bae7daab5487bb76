"""The standard benchmark clients, unchanged, against a running deployment of mocker workers:
perf_analyzer 2.51.0 (``--streaming``, BYTES prompts) and genai-perf 0.0.16 (``--endpoint-type
kserve`` with its tensorrtllm and its vllm input sets) over KServe v2 gRPC, genai-perf
(``--endpoint-type chat``) and aiperf 0.13.0 (chat, streaming) over OpenAI HTTP.

bench/clients/install.sh installs the tools into .tools/ (from PyPI, and libb64 with apt: the
first run takes minutes) and bench/clients/run_all.sh runs them all against one `tokenyard up`
deployment. The assertions read the tools' own exports: every request asked for completed, with
no error, and its stream ended the way the protocol says (Triton's final response carrying the
finish reason, OpenAI's ``[DONE]``). Timings are not asserted.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 40
OUTPUT_TOKENS = 24
# Ports run_all.sh uses, as offsets from --port-base (two workers).
PORT_OFFSETS = (0, 1, 100, 101, 200, 201, 300, 301, 401, 1300, 1301)


@dataclass(frozen=True)
class ClientRuns:
    out: Path
    returncode: int
    output: str


def _free_port_base() -> int:
    for _ in range(200):
        base = random.randrange(20000, 58000)
        socks: list[socket.socket] = []
        try:
            for offset in PORT_OFFSETS:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free set of ports")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ClientRuns:
    install = subprocess.run(
        ["bash", str(ROOT / "bench/clients/install.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    out = tmp_path_factory.mktemp("clients")
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "bench/clients/run_all.sh"),
            "--skip-install",
            "--requests",
            str(REQUESTS),
            "--concurrency",
            "2",
            "--input-tokens",
            "64",
            "--output-tokens",
            str(OUTPUT_TOKENS),
            "--port-base",
            str(_free_port_base()),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    return ClientRuns(out=out, returncode=proc.returncode, output=proc.stdout + proc.stderr)


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {found}"
    return found[0]


def _triton_requests(export: Path) -> list[dict[str, Any]]:
    """The requests of a perf_analyzer profile export (genai-perf's runs write one too)."""
    doc = _load(export)
    return [r for experiment in doc["experiments"] for r in experiment["requests"]]


def _assert_kserve_streams(requests: list[dict[str, Any]], runs: ClientRuns) -> None:
    assert len(requests) == REQUESTS, runs.output[-4000:]
    for r in requests:
        outputs = r["response_outputs"]
        # Streamed: several responses, the last one (triton_final_response) with the reason.
        assert len(outputs) > 1 and len(r["response_timestamps"]) == len(outputs)
        assert all(o["finish_reason"] == "" for o in outputs[:-1])
        assert outputs[-1]["finish_reason"] == "length"
        assert "".join(o["text_output"] for o in outputs).strip()


def test_run_all_reports_every_run_ok(runs: ClientRuns) -> None:
    assert runs.returncode == 0, runs.output[-6000:]
    summary = _load(runs.out / "summary.json")
    assert [r["name"] for r in summary["runs"]] == [
        "perf-analyzer-kserve-stream",
        "genai-perf-kserve-tensorrtllm",
        "genai-perf-kserve-vllm",
        "genai-perf-chat",
        "aiperf-chat-stream",
    ]
    assert all(r["requests"] == REQUESTS and r["errors"] == 0 and not r["problems"] for r in summary["runs"])


def test_perf_analyzer_streams_string_prompts_over_kserve(runs: ClientRuns) -> None:
    folder = runs.out / "perf-analyzer-kserve-stream"
    requests = _triton_requests(_only(folder, "profile_export.json"))
    _assert_kserve_streams(requests, runs)
    assert all(isinstance(r["request_inputs"]["text_input"], str) for r in requests)
    assert all(r["request_inputs"]["max_tokens"] == OUTPUT_TOKENS for r in requests)


@pytest.mark.parametrize(
    ("backend", "inputs"),
    [
        ("tensorrtllm", {"text_input", "max_tokens", "stream", "exclude_input_in_output"}),
        ("vllm", {"text_input", "sampling_parameters", "stream", "exclude_input_in_output"}),
    ],
)
def test_genai_perf_kserve_input_sets(runs: ClientRuns, backend: str, inputs: set[str]) -> None:
    folder = runs.out / f"genai-perf-kserve-{backend}"
    requests = _triton_requests(_only(folder, "*/profile_export.json"))
    _assert_kserve_streams(requests, runs)
    assert all(set(r["request_inputs"]) == inputs for r in requests)
    stats = _load(_only(folder, "*/profile_export_genai_perf.json"))
    assert stats["request_count"]["avg"] == REQUESTS
    assert stats["time_to_first_token"]["avg"] > 0


def test_genai_perf_chat_streams_over_openai_http(runs: ClientRuns) -> None:
    folder = runs.out / "genai-perf-chat"
    requests = _triton_requests(_only(folder, "*/profile_export.json"))
    assert len(requests) == REQUESTS, runs.output[-4000:]
    for r in requests:
        events = [o["response"] for o in r["response_outputs"]]
        assert len(events) > 1
        assert "[DONE]" in events[-1]
        assert not any('"error"' in e for e in events)
    stats = _load(_only(folder, "*/profile_export_genai_perf.json"))
    assert stats["request_count"]["avg"] == REQUESTS


def test_aiperf_chat_streaming(runs: ClientRuns) -> None:
    folder = runs.out / "aiperf-chat-stream"
    records = [
        json.loads(line)
        for line in _only(folder, "profile_export.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    assert len(records) == REQUESTS, runs.output[-4000:]
    assert not [r["error"] for r in records if r.get("error")]
    assert all(r["metrics"]["usage_completion_tokens"]["value"] == OUTPUT_TOKENS for r in records)
    stats = _load(_only(folder, "profile_export_aiperf.json"))
    assert stats["completed_request_count"]["avg"] == REQUESTS
    assert not stats["error_summary"]
    assert stats["request_error_rate"]["avg"] == 0
    assert stats["time_to_first_token"]["avg"] > 0
