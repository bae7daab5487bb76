"""The load generator's pure parts: workloads, SSE parsing, stream accounting, statistics, scheduling."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest

from bench.loadgen.cli import apply_overrides, build_parser, configurations
from bench.loadgen.client import Endpoint, RequestRecord, StreamReader, build_body, endpoint_url, models_url
from bench.loadgen.cpu import CpuMeter, find_pids, read_stat
from bench.loadgen.runner import LoadShape, run_load
from bench.loadgen.sse import SseEvent, SseParser
from bench.loadgen.stats import Distribution, percentile, summarize
from bench.loadgen.workload import (
    WORDS,
    MooncakeWorkload,
    RequestSpec,
    SharedPrefixWorkload,
    TokenRange,
    TraceEntry,
    as_text,
    load_trace,
)

pytestmark = pytest.mark.unit


# --- workloads ---------------------------------------------------------------------------------


def _synthetic(**kw: int) -> SharedPrefixWorkload:
    args = {"num_prefixes": 3, "prefix_len": 100, "suffix_len": 20, "output_len": 8, "seed": 7, **kw}
    return SharedPrefixWorkload(
        num_prefixes=args["num_prefixes"],
        prefix_len=args["prefix_len"],
        suffix_len=args["suffix_len"],
        output_len=args["output_len"],
        seed=args["seed"],
    )


def test_shared_prefix_requests_share_exactly_their_prefix_tokens() -> None:
    w = _synthetic()
    specs = [w.request(i) for i in range(60)]
    by_prefix: dict[int, list[RequestSpec]] = {}
    for spec in specs:
        assert len(spec.tokens) == 120 and spec.output_len == 8
        by_prefix.setdefault(w.prefix_of(spec.index), []).append(spec)
    assert sorted(by_prefix) == [0, 1, 2]
    for group in by_prefix.values():
        assert len({tuple(s.tokens[:100]) for s in group}) == 1
    assert len({tuple(group[0].tokens[:100]) for group in by_prefix.values()}) == 3
    assert len({tuple(s.tokens[100:]) for s in specs}) == 60


def test_synthetic_workload_is_seeded_and_endless() -> None:
    a, b, c = _synthetic(), _synthetic(), _synthetic(seed=8)
    assert a.request(5) == b.request(5)
    assert a.request(5).tokens != c.request(5).tokens
    it = iter(a)
    assert [next(it).index for _ in range(3)] == [0, 1, 2]
    assert a.size is None


def test_tokens_stay_inside_the_range() -> None:
    w = _synthetic(num_prefixes=1)
    w2 = SharedPrefixWorkload(
        num_prefixes=1, prefix_len=50, suffix_len=50, output_len=1, tokens=TokenRange(10, 20)
    )
    assert all(1000 <= t < 30000 for t in w.request(0).tokens)
    assert set(w2.request(0).tokens) <= set(range(10, 20))
    assert TokenRange.parse("5:9") == TokenRange(5, 9)
    with pytest.raises(ValueError):
        TokenRange.parse("9:5")


def test_text_prompts_share_the_text_of_shared_token_prefixes() -> None:
    w = _synthetic(num_prefixes=1)
    a, b = as_text(w.request(0).tokens), as_text(w.request(1).tokens)
    assert a.split()[:100] == b.split()[:100] and a != b
    assert len(a.split()) == 120
    assert set(a.split()) <= set(WORDS)


@pytest.mark.parametrize(
    "kw", [{"num_prefixes": 0}, {"prefix_len": 0, "suffix_len": 0}, {"output_len": 0}, {"suffix_len": -1}]
)
def test_synthetic_workload_rejects_impossible_shapes(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        _synthetic(**kw)


def test_mooncake_equal_hash_ids_give_equal_blocks() -> None:
    entries = [
        TraceEntry(0.0, 40, 5, (1, 2, 3)),
        TraceEntry(10.0, 25, 6, (1, 2)),
        TraceEntry(20.0, 30, 7, (9, 2)),
    ]
    w = MooncakeWorkload(entries, block_size=10, seed=3)
    r0, r1, r2 = (w.request(i) for i in range(3))
    assert [len(r.tokens) for r in (r0, r1, r2)] == [40, 25, 30]
    block = {1: r0.tokens[0:10], 2: r0.tokens[10:20], 3: r0.tokens[20:30]}
    assert r1.tokens[0:20] == block[1] + block[2]
    # The same hash id is the same block wherever it appears in a prompt.
    assert r2.tokens[10:20] == block[2]
    assert r2.tokens[0:10] != block[1]
    assert len({tuple(b) for b in block.values()}) == 3
    # Past its blocks, a prompt is padded with tokens of its own.
    assert r0.tokens[30:40] != r1.tokens[20:25] + r2.tokens[20:25]
    assert [r.output_len for r in (r0, r1, r2)] == [5, 6, 7]
    assert MooncakeWorkload(entries, block_size=10, seed=3).request(0) == r0


def test_mooncake_trace_loads_and_replays_in_time_order(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 2500, "input_length": 600, "output_length": 4, "hash_ids": [0, 1]},
        {"timestamp": 1000, "input_length": 100, "output_length": 3, "hash_ids": [0]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    w = MooncakeWorkload(load_trace(path))
    specs = list(w)
    assert [s.arrival_s for s in specs] == [0.0, 1.5]
    assert [len(s.tokens) for s in specs] == [100, 600]
    assert specs[0].tokens == specs[1].tokens[:100]
    assert w.size == 2 and w.has_timestamps


def test_mooncake_trace_rejects_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 1, "output_length": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_trace(path)
    path.write_text('{"input_length": 0, "output_length": 3}\n')
    with pytest.raises(ValueError):
        load_trace(path)


# --- SSE parsing -------------------------------------------------------------------------------

STREAM = (
    b": keep-alive comment\n"
    b'data: {"a": 1}\n\n'
    b"event: update\r\n"
    b"data: line one\r\n"
    b"data: line two\r\n\r\n"
    b"data:no-space\r\r" + "data: caf\u00e9 \u2603\n\n".encode() + b"data: [DONE]\n\n"
)
EXPECTED = [
    SseEvent('{"a": 1}'),
    SseEvent("line one\nline two", "update"),
    SseEvent("no-space"),
    SseEvent("caf\u00e9 \u2603"),
    SseEvent("[DONE]"),
]


def test_sse_parser_reads_whole_streams() -> None:
    parser = SseParser()
    assert parser.feed(STREAM) + parser.close() == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_sse_parser_handles_events_split_across_reads(cut: int) -> None:
    parser = SseParser()
    assert parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:]) + parser.close() == EXPECTED


def test_sse_parser_handles_one_byte_reads_and_an_unterminated_last_event() -> None:
    parser = SseParser()
    events = []
    for i in range(len(STREAM)):
        events += parser.feed(STREAM[i : i + 1])
    assert events == EXPECTED
    assert parser.feed(b"data: tail") == []
    assert parser.close() == [SseEvent("tail")]


def test_sse_event_field_without_data_is_not_an_event() -> None:
    parser = SseParser()
    assert parser.feed(b"event: ping\n\ndata: x\n\n") == [SseEvent("x")]


# --- stream accounting -------------------------------------------------------------------------


def _sse(*payloads: object) -> bytes:
    return b"".join(
        b"data: " + (p.encode() if isinstance(p, str) else json.dumps(p).encode()) + b"\n\n" for p in payloads
    )


def _text(t: str, finish: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "text": t, "finish_reason": finish}]}


USAGE = {
    "choices": [],
    "usage": {"prompt_tokens": 50, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}},
}


def test_stream_reader_times_content_chunks_and_reads_the_usage_chunk() -> None:
    rec = RequestRecord(index=0, start_s=10.0)
    reader = StreamReader(rec)
    body = _sse(_text("a"), _text("b"), _text("c", "length"), USAGE, "[DONE]")
    parts = body.split(b"\n\n")
    # Events arrive at t = 10.5, 10.6, 10.8 (the usage chunk and [DONE] with the last).
    reader.feed(parts[0] + b"\n\n" + parts[1][:5], 10.5)
    reader.feed(parts[1][5:] + b"\n\n", 10.6)
    reader.feed(b"\n\n".join(parts[2:]), 10.8)
    reader.close(10.9)
    assert rec.ok
    assert rec.ttft_s == pytest.approx(0.5)
    assert rec.itl_s == pytest.approx([0.1, 0.2])
    assert rec.content_chunks == 3 and rec.finish_reason == "length"
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (50, 3, 32)
    rec.end_s = 11.0
    assert rec.tpot_s == pytest.approx(0.15)
    assert rec.latency_s == pytest.approx(1.0)


def test_stream_reader_skips_the_chat_role_chunk() -> None:
    rec = RequestRecord(index=0, start_s=0.0)
    reader = StreamReader(rec)
    reader.feed(_sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), 0.1)
    reader.feed(_sse({"choices": [{"delta": {"content": "hi"}}]}), 0.4)
    reader.feed(_sse({"choices": [{"delta": {"reasoning_content": "hm"}, "finish_reason": "stop"}]}), 0.5)
    reader.feed(_sse("[DONE]"), 0.5)
    reader.close(0.5)
    assert rec.ok and rec.ttft_s == pytest.approx(0.4) and rec.content_chunks == 2
    # No usage chunk: output tokens fall back to the chunk count.
    assert rec.completion_tokens is None and rec.output_tokens == 2


def test_stream_reader_classifies_broken_streams() -> None:
    cases = {
        "incomplete_stream": _sse(_text("a")),
        "no_content": _sse(USAGE, "[DONE]"),
        "stream_error": _sse(_text("a"), {"error": {"message": "worker died"}}, "[DONE]"),
        "bad_chunk": _sse("{not json", "[DONE]"),
    }
    for error, body in cases.items():
        rec = RequestRecord(index=0, start_s=0.0)
        reader = StreamReader(rec)
        reader.feed(body, 1.0)
        reader.close(1.0)
        assert rec.error == error, error


def test_stream_reader_accepts_a_stream_ending_in_finish_reason_without_done() -> None:
    rec = RequestRecord(index=0, start_s=0.0)
    reader = StreamReader(rec)
    reader.feed(_sse(_text("a", "stop")), 1.0)
    reader.close(1.0)
    assert rec.ok


def test_request_bodies() -> None:
    spec = RequestSpec(3, [1001, 1002, 1003], 16)
    tokens = build_body(
        Endpoint("u", "completions", "m", prompt_format="tokens", extra_body={"top_k": 1}), spec
    )
    assert tokens == {
        "model": "m",
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "min_tokens": 16,
        "prompt": [1001, 1002, 1003],
        "top_k": 1,
    }
    text = build_body(Endpoint("u", "completions", "m", ignore_eos=False), spec)
    assert text["prompt"] == as_text(spec.tokens) and "ignore_eos" not in text
    chat = build_body(Endpoint("u", "chat", "m"), spec)
    assert chat["messages"] == [{"role": "user", "content": as_text(spec.tokens)}] and "prompt" not in chat
    with pytest.raises(ValueError):
        build_body(Endpoint("u", "chat", "m", prompt_format="tokens"), spec)


def test_endpoint_urls_accept_base_or_full_urls() -> None:
    assert endpoint_url("http://h:8000", "completions") == "http://h:8000/v1/completions"
    assert endpoint_url("http://h:8000/v1/", "chat") == "http://h:8000/v1/chat/completions"
    assert endpoint_url("http://h:8000/v1/completions", "completions") == "http://h:8000/v1/completions"
    assert models_url("http://h:8000/v1/chat/completions") == "http://h:8000/v1/models"


# --- statistics --------------------------------------------------------------------------------


def test_percentiles_match_numpy_linear_interpolation() -> None:
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 101):
        values = sorted(rng.uniform(0, 100) for _ in range(n))
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_scales_seconds_to_milliseconds() -> None:
    d = Distribution.of([0.001 * i for i in range(1, 101)], 1000.0)
    assert d is not None
    assert d.count == 100 and d.min == pytest.approx(1.0) and d.max == pytest.approx(100.0)
    assert d.mean == pytest.approx(50.5) and d.p50 == pytest.approx(50.5) and d.p99 == pytest.approx(99.01)
    assert Distribution.of([]) is None


def _record(i: int, *, error: str | None = None, prompt: int = 100, cached: int | None = 40) -> RequestRecord:
    rec = RequestRecord(index=i, start_s=float(i), end_s=float(i) + 2.0, error=error)
    if error is None:
        rec.ttft_s, rec.itl_s, rec.last_chunk_s = 0.5, [0.1, 0.3], float(i) + 0.9
        rec.content_chunks, rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens = 3, prompt, 3, cached
    return rec


def test_summary_rates_cache_hit_and_errors() -> None:
    records = [_record(0), _record(1, cached=60), _record(2, error="http_503"), _record(3, error="http_503")]
    records[2].error_detail = "overloaded"
    s = summarize(records, duration_s=4.0)
    assert (s.requests_sent, s.requests_ok, s.requests_failed) == (4, 2, 2)
    assert s.errors == {"http_503": 2} and s.error_samples == {"http_503": "overloaded"}
    assert s.request_throughput == 0.5 and s.output_token_throughput == 1.5
    assert s.prompt_tokens == 200 and s.cached_tokens == 100 and s.cache_hit_rate == 0.5
    assert s.mean_concurrency == 2.0
    assert s.send_rate == 1.0
    assert s.ttft_ms is not None and s.ttft_ms.p50 == pytest.approx(500.0)
    assert s.itl_ms is not None and s.itl_ms.count == 4 and s.itl_ms.mean == pytest.approx(200.0)
    assert s.tpot_ms is not None and s.tpot_ms.mean == pytest.approx(200.0)
    assert s.latency_ms is not None and s.latency_ms.max == pytest.approx(2000.0)


def test_summary_without_cached_tokens_has_no_hit_rate() -> None:
    s = summarize([_record(0, cached=None)], duration_s=1.0)
    assert s.cache_hit_rate is None and s.cached_tokens is None
    empty = summarize([], duration_s=0.0)
    assert empty.request_throughput == 0.0 and empty.ttft_ms is None


# --- CPU accounting ----------------------------------------------------------------------------


def _fake_proc(root: Path, pid: int, comm: str, cmdline: str, ticks: tuple[int, int], ppid: int = 1) -> None:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    rest = ["S", str(ppid)] + ["0"] * 9 + [str(ticks[0]), str(ticks[1])] + ["0"] * 10
    (root / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(rest)}\n")
    (root / str(pid) / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")


def test_read_stat_handles_command_names_with_spaces_and_parentheses(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 42, "tok (worker) 1", "python -m tokenyard.cli worker", (150, 50))
    assert read_stat(42, tmp_path) == ("tok (worker) 1", 200)
    assert read_stat(43, tmp_path) is None


def test_find_pids_matches_command_lines_but_not_its_own_lineage(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 10, "bash", "bash -c loadgen --measure-cpu-of tokenyard", (0, 0))
    _fake_proc(tmp_path, 11, "python", "python -m bench.loadgen --measure-cpu-of tokenyard", (0, 0), ppid=10)
    _fake_proc(tmp_path, 20, "python", "python -m tokenyard.cli frontend", (0, 0))
    _fake_proc(tmp_path, 21, "python", "python -m tokenyard.cli router", (0, 0))
    _fake_proc(tmp_path, 30, "redis", "redis-server", (0, 0))
    assert find_pids("tokenyard", tmp_path, self_pid=11) == [20, 21]
    assert find_pids(r"cli (frontend|router)$", tmp_path, self_pid=11) == [20, 21]


def test_cpu_meter_reports_the_difference_between_readings(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 20, "frontend", "tokenyard frontend", (100, 100))
    meter = CpuMeter([20], proc=tmp_path)
    meter.start()
    _fake_proc(tmp_path, 20, "frontend", "tokenyard frontend", (250, 150))
    report = meter.stop()
    tick = os.sysconf("SC_CLK_TCK")
    assert report.seconds == pytest.approx(200 / tick)
    assert [(p.pid, p.name) for p in report.processes] == [(20, "frontend")]


def test_cpu_meter_reads_this_process() -> None:
    stat = read_stat(os.getpid())
    assert stat is not None and stat[1] >= 0


# --- scheduling --------------------------------------------------------------------------------


def _specs(n: int | None = None, arrivals: list[float] | None = None) -> list[RequestSpec]:
    count = len(arrivals) if arrivals is not None else (n or 0)
    return [RequestSpec(i, [1], 1, None if arrivals is None else arrivals[i]) for i in range(count)]


class FakeSend:
    """Records when each request is sent and how many are in flight; replies after a short sleep."""

    def __init__(self, delay_s: float = 0.002) -> None:
        self.delay_s = delay_s
        self.sent: list[tuple[int, float]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, spec: RequestSpec) -> RequestRecord:
        self.sent.append((spec.index, time.perf_counter()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        rec = RequestRecord(index=spec.index, start_s=time.perf_counter())
        await asyncio.sleep(self.delay_s)
        self.in_flight -= 1
        rec.end_s = time.perf_counter()
        return rec


async def test_concurrency_mode_keeps_n_in_flight_and_sends_the_count() -> None:
    send = FakeSend()
    result = await run_load(send, iter(_specs(1000)), LoadShape(concurrency=3, num_requests=25))
    assert len(result.records) == 25 and sorted(i for i, _ in send.sent) == list(range(25))
    assert send.max_in_flight == 3
    assert result.duration_s > 0


async def test_rate_mode_sends_the_count_and_caps_in_flight() -> None:
    send = FakeSend(delay_s=0.01)
    shape = LoadShape(rate=2000.0, arrival="poisson", max_concurrency=2, num_requests=15)
    result = await run_load(send, iter(_specs(100)), shape)
    assert len(result.records) == 15 and send.max_in_flight <= 2


async def test_constant_rate_spaces_arrivals() -> None:
    send = FakeSend()
    await run_load(send, iter(_specs(100)), LoadShape(rate=100.0, arrival="constant", num_requests=4))
    times = [t for _, t in sorted(send.sent)]
    # asyncio timers never fire early, so the gaps are at least the period (less clock resolution).
    assert times[3] - times[0] >= 0.03 - 1e-3


async def test_fixed_schedule_sends_in_order_no_earlier_than_the_scaled_timestamps() -> None:
    send = FakeSend()
    arrivals = [5.0, 5.02, 5.06, 5.1]
    await run_load(send, iter(_specs(arrivals=arrivals)), LoadShape(fixed_schedule=True, speedup=2.0))
    indices = [i for i, _ in send.sent]
    assert indices == [0, 1, 2, 3]
    t0 = send.sent[0][1]
    for (_, t), a in zip(send.sent, arrivals, strict=True):
        assert t - t0 >= (a - 5.0) / 2.0 - 1e-3


async def test_duration_bound_and_stop_event_end_the_run() -> None:
    endless = (RequestSpec(i, [1], 1) for i in range(10**9))
    result = await run_load(FakeSend(), endless, LoadShape(concurrency=2, duration_s=0.05))
    assert 0 < len(result.records) < 10**9
    stop = asyncio.Event()
    stop.set()
    stopped = await run_load(FakeSend(), iter(_specs(10)), LoadShape(rate=10.0), stop=stop)
    assert stopped.records == []


def test_load_shape_needs_exactly_one_mode() -> None:
    with pytest.raises(ValueError):
        LoadShape()
    with pytest.raises(ValueError):
        LoadShape(concurrency=2, rate=1.0)
    with pytest.raises(ValueError):
        LoadShape(concurrency=0)
    assert LoadShape(rate=1.0).pool_size == 0 and LoadShape(concurrency=4).pool_size == 4


# --- configurations ----------------------------------------------------------------------------


def _configs(*argv: str) -> list[argparse.Namespace]:
    parser = build_parser()
    return [c.ns for c in configurations(parser.parse_args(list(argv)), parser)]


def test_ab_configuration_strings_override_and_extend_the_base() -> None:
    a, b = _configs(
        "--concurrency", "4", "--header", "x-a: 1", "--extra-body", '{"top_k": 1}', "--output-len", "9",
        "--ab", "--target http://127.0.0.1:9000", "--rate 5 --header 'x-route: random' --extra-body '{\"seed\": 2}'",
    )  # fmt: skip
    assert a.target == ["http://127.0.0.1:9000"] and a.concurrency == 4 and a.output_len == 9
    assert b.target is None and b.rate == 5 and b.concurrency is None and b.output_len == 9
    assert b.header == [("x-a", "1"), ("x-route", "random")]
    assert b.extra_body == {"top_k": 1, "seed": 2}


def test_two_targets_make_two_configurations() -> None:
    parser = build_parser()
    configs = configurations(parser.parse_args(["--target", "http://a", "--target", "http://b"]), parser)
    assert [(c.label, c.target) for c in configs] == [("A", "http://a"), ("B", "http://b")]
    (single,) = configurations(parser.parse_args(["--name", "smoke"]), parser)
    assert single.label == "smoke" and single.target == "http://127.0.0.1:8000"


def test_configuration_strings_may_not_set_invocation_flags() -> None:
    parser = build_parser()
    ns = parser.parse_args([])
    with pytest.raises(SystemExit):
        apply_overrides(ns, "--name other", parser)


def test_inconsistent_flags_are_rejected() -> None:
    for argv in (
        ["--endpoint", "chat", "--prompt-format", "tokens"],
        ["--fixed-schedule"],
        ["--concurrency", "2", "--rate", "3"],
        ["--target", "http://a", "--target", "http://b", "--labels", "x"],
        ["--target", "http://a", "--target", "http://b", "--ab", "", "--seed 1"],
        ["--ab", "--target http://a --target http://b", "--seed 1"],
    ):
        with pytest.raises(SystemExit):
            _configs(*argv)
