"""The serving benchmark's HTTP driver and summaries, against the fake vLLM server in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

import aiohttp
from aiohttp import web

BENCH_DIR = Path(__file__).resolve().parents[2] / "scripts" / "bench_serving"
sys.path.insert(0, str(BENCH_DIR))

from client import Result, percentile, run_in_processes, run_requests, summarize, summarize_by_model  # noqa: E402
from fake_server import ENGINE, make_app  # noqa: E402
from workload import Request  # noqa: E402


async def _start(app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@contextlib.contextmanager
def serving(*apps: web.Application) -> Iterator[list[str]]:
    """Serve the apps on free local ports from a background thread's event loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runners = [asyncio.run_coroutine_threadsafe(_start(app), loop).result(10) for app in apps]
    try:
        yield [f"http://127.0.0.1:{runner.addresses[0][1]}" for runner in runners]
    finally:
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _req(idx: int, model: str = "m", t: float = 0.0, max_tokens: int = 8) -> Request:
    return Request(idx, model, t, tuple(range(1000 + idx, 1004 + idx)), max_tokens)


def _result(idx: int, ttft: float | None, e2e: float, n_out: int, t_sent: float = 0.0, model: str = "m") -> Result:
    ok = ttft is not None
    tpot = (e2e - ttft) / (n_out - 1) if ttft is not None and n_out >= 2 else None
    return Result(idx, model, t_sent, t_sent, ttft, e2e, n_out, tpot, ok, None if ok else "HTTP 500: boom")


def test_every_request_completes_with_its_tokens():
    requests = [_req(i, t=0.02 * i, max_tokens=8) for i in range(10)]
    seen: list[int] = []
    with serving(make_app("m", prefill_ms=30, tpot_ms=5)) as (url,):
        results = asyncio.run(run_requests(requests, {"m": url}, on_result=lambda r: seen.append(r.idx)))
    assert [r.idx for r in results] == list(range(10))
    assert sorted(seen) == list(range(10))
    for r in results:
        assert r.ok and r.error is None
        assert r.n_out == 8
        assert r.ttft_s is not None and r.ttft_s >= 0.030
        # The server times every token from admission, so a late first token shortens the rest.
        assert r.e2e_s >= 0.030 + 7 * 0.005
        assert r.tpot_s is not None and 0 < r.tpot_s < 0.05
        assert r.t_sched - 0.002 <= r.t_sent < r.t_sched + 0.05
        assert json.loads(json.dumps(r.to_dict()))["idx"] == r.idx


def test_queueing_behind_max_running_raises_ttft():
    # 6 requests at once, 2 slots, 100 ms each (20 ms prefill + 4 x 20 ms): three waves.
    app = make_app("m", max_running=2, prefill_ms=20, tpot_ms=20)
    requests = [_req(i, max_tokens=5) for i in range(6)]

    async def run_and_peek(url: str) -> tuple[list[Result], str]:
        task = asyncio.create_task(run_requests(requests, {"m": url}))
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
            metrics = await resp.text()
        return await task, metrics

    with serving(app) as (url,):
        results, metrics = asyncio.run(run_and_peek(url))
    assert 'vllm:num_requests_running{model_name="m"} 2.0' in metrics
    assert 'vllm:num_requests_waiting{model_name="m"} 4.0' in metrics
    assert all(r.ok and r.n_out == 5 for r in results)
    ttfts = sorted(r.ttft_s for r in results if r.ttft_s is not None)
    assert ttfts[1] < 0.08
    assert ttfts[2] > ttfts[1] + 0.07 and ttfts[4] > ttfts[3] + 0.07
    assert app[ENGINE].num_running == 0 and app[ENGINE].num_waiting == 0
    assert app[ENGINE].num_generated_tokens == 30 and app[ENGINE].num_finished == 6


def test_engine_timing_splits_the_first_token_as_vllms_histograms_do():
    from engine_metrics import timing_means, timing_totals
    from servers import Server

    # 6 requests at once, 2 slots, 100 ms each: queued 0, 0, ~100, ~100, ~200, ~200 ms.
    app = make_app("m", max_running=2, prefill_ms=20, tpot_ms=20)
    with serving(app) as (url,):
        server = Server("m", int(url.rsplit(":", 1)[1]), proc=None, log="")  # type: ignore[arg-type]
        asyncio.run(run_requests([_req(i, max_tokens=2) for i in range(3)], {"m": url}))  # before the window
        before = timing_totals([server])
        results = asyncio.run(run_requests([_req(i, max_tokens=5) for i in range(6)], {"m": url}))
        means = timing_means(before, timing_totals([server]))["m"]
    assert all(r.ok for r in results)
    assert means["ttft_n"] == means["queue_n"] == means["prefill_n"] == 6  # only the window's requests
    assert 0.08 < means["queue_mean_s"] < 0.14
    assert 0.019 < means["prefill_mean_s"] < 0.04
    assert means["ttft_mean_s"] == pytest.approx(means["queue_mean_s"] + means["prefill_mean_s"], abs=0.002)
    client_mean = statistics.mean(r.ttft_s for r in results if r.ttft_s is not None)
    assert means["ttft_mean_s"] <= client_mean < means["ttft_mean_s"] + 0.02  # the client sees HTTP on top
    assert timing_totals([Server("gone", _free_port(), proc=None, log="")]) == {}  # type: ignore[arg-type]


def test_failures_are_results_not_exceptions():
    dead = f"http://127.0.0.1:{_free_port()}"
    requests = [_req(0, "dead"), _req(1, "wrong"), _req(2, "slow")]
    slow = make_app("slow", max_running=1, prefill_ms=2000)
    with serving(make_app("m"), slow) as (url, slow_url):
        results = asyncio.run(run_requests(requests, {"dead": dead, "wrong": url, "slow": slow_url}, timeout_s=0.3))
        # The client went away, so the server gave its place back (as vLLM aborts the request).
        deadline = time.monotonic() + 2.0
        while slow[ENGINE].num_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow[ENGINE].num_running == 0
    for r in results:
        assert not r.ok and r.ttft_s is None and r.tpot_s is None and r.error
    assert "Connect" in results[0].error
    assert results[1].error.startswith("HTTP 404") and "`wrong` does not exist" in results[1].error
    assert results[2].error == "timed out" and 0.25 < results[2].e2e_s < 1.0


def _canned_stream(body: bytes) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(body)
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'data: {"choices": [{"text": "x"}]}\n\ndata: {"error": {"message": "boom"}}\n\n', "server error in stream"),
        (b"data: not json\n\n", "ValueError: malformed event: b'not json'"),
        (b'data: ["a list"]\n\n', "ValueError: malformed event"),
        (b'data: {"choices": [{"text": "x"}]}\n\n', "stream ended without data: [DONE]"),
        (b"data: [DONE]\n\n", "no token in the response"),
    ],
)
def test_a_bad_stream_is_a_failed_result(body, error):
    with serving(_canned_stream(body)) as (url,):
        (result,) = asyncio.run(run_requests([_req(0)], {"m": url}))
    assert not result.ok and result.ttft_s is None
    assert result.error is not None and result.error.startswith(error)


def test_a_model_without_url_is_refused():
    with pytest.raises(ValueError, match=r"no URL for model\(s\) \['x'\]"):
        asyncio.run(run_requests([_req(0, "x")], {"m": "http://127.0.0.1:1"}))


def test_fake_server_speaks_vllms_protocol():
    async def talk(url: str) -> dict:
        out: dict = {}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/health") as resp:
                out["health"] = resp.status
            async with session.get(f"{url}/v1/models") as resp:
                out["models"] = [m["id"] for m in (await resp.json())["data"]]
            body = {
                "model": "m",
                "prompt": [1, 2, 3],
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                out["stream"] = [line for line in (await resp.text()).split("\n") if line]
            body = {"model": "m", "prompt": "two words", "max_tokens": 4}
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                out["plain"] = await resp.json()
        return out

    with serving(make_app("m", prefill_ms=1, tpot_ms=1)) as (url,):
        out = asyncio.run(talk(url))
    assert out["health"] == 200 and out["models"] == ["m"]
    lines = out["stream"]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [e["choices"][0]["text"] for e in events[:3]] == ["x", "x", "x"]
    assert [e["choices"][0]["finish_reason"] for e in events[:3]] == [None, None, "length"]
    assert events[3]["choices"] == []
    assert events[3]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert out["plain"]["choices"][0]["text"] == "xxxx"
    assert out["plain"]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_percentile_interpolates_linearly():
    values = [0.7, 0.1, 0.4, 0.2, 0.9, 0.3, 0.35]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for q in range(1, 100):
        assert percentile(values, q) == pytest.approx(cuts[q - 1])
    assert percentile(values, 0) == 0.1 and percentile(values, 100) == 0.9
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_matches_hand_computed_numbers():
    results = [
        _result(0, 0.1, 1.1, 11, t_sent=0.0),
        _result(1, 0.2, 2.2, 21, t_sent=1.0),
        _result(2, 0.3, 0.3, 1, t_sent=2.0),  # one token: no TPOT
        _result(3, 0.4, 4.4, 41, t_sent=3.0),
        _result(4, None, 0.5, 0, t_sent=4.0, model="n"),  # failed
    ]
    s = summarize(results)
    assert (s["count"], s["ok"], s["failed"]) == (5, 4, 1)
    assert s["ttft_mean_s"] == pytest.approx(0.25)
    assert s["ttft_p50_s"] == pytest.approx(0.25)  # halfway between 0.2 and 0.3
    assert s["ttft_p90_s"] == pytest.approx(0.37)  # position 2.7: 0.3 + 0.7 * 0.1
    assert s["ttft_p99_s"] == pytest.approx(0.397)
    assert s["ttft_max_s"] == pytest.approx(0.4)
    assert s["tpot_mean_s"] == pytest.approx(0.1)  # (1.0 / 10, 2.0 / 20, 4.0 / 40)
    assert s["tpot_p50_s"] == pytest.approx(0.1) and s["tpot_p99_s"] == pytest.approx(0.1)
    assert s["e2e_mean_s"] == pytest.approx(2.0)
    assert s["e2e_p99_s"] == pytest.approx(2.2 + 0.97 * 2.2)
    assert s["output_tokens"] == 74
    assert s["span_s"] == pytest.approx(7.4)  # first send 0.0, last end 3.0 + 4.4
    assert s["output_tokens_per_s"] == pytest.approx(74 / 7.4)
    assert s["requests_per_s"] == pytest.approx(4 / 7.4)
    assert summarize(results, duration_s=10.0)["requests_per_s"] == pytest.approx(0.4)
    json.dumps(s)

    by_model = summarize_by_model(results)
    assert list(by_model) == ["m", "n"]
    assert by_model["m"]["count"] == 4 and by_model["m"]["failed"] == 0
    assert by_model["n"]["ok"] == 0 and by_model["n"]["ttft_p50_s"] is None
    assert by_model["n"]["output_tokens_per_s"] == 0.0
    empty = summarize([])
    assert empty["count"] == 0 and empty["ttft_mean_s"] is None and empty["requests_per_s"] is None


@pytest.mark.multiproc
def test_run_in_processes_merges_every_model():
    requests = [_req(i, "ab"[i % 2], t=0.03 * i, max_tokens=4) for i in range(12)]
    with serving(make_app("a", prefill_ms=5, tpot_ms=2), make_app("b", prefill_ms=5, tpot_ms=2)) as urls:
        t0 = time.time() + 1.5
        results = run_in_processes(requests, dict(zip("ab", urls, strict=True)), t0=t0)
        finished = time.time()
    assert [r.idx for r in results] == list(range(12))
    assert [r.model for r in results] == ["a", "b"] * 6
    assert all(r.ok and r.n_out == 4 for r in results)
    # Every worker waited for the shared start rather than sending early.
    assert all(r.t_sent >= r.t_sched - 0.002 for r in results)
    assert finished >= t0 + 0.33


@pytest.mark.multiproc
def test_fake_server_stops_cleanly_on_sigterm():
    port = _free_port()
    command = [sys.executable, str(BENCH_DIR / "fake_server.py"), "--port", str(port), "--model", "m"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"fake_server: model m on http://127.0.0.1:{port}"
        results = asyncio.run(run_requests([_req(0, max_tokens=3)], {"m": f"http://127.0.0.1:{port}"}))
        assert results[0].ok
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--again", "15"], "--again takes rates of --rates (10)"),
        (["--config", "static", "--without-budget", "10"], "--without-budget applies to multi --config kvcached only"),
    ],
)
def test_rerun_options_name_what_is_allowed(tmp_path, args, message):
    command = [sys.executable, str(BENCH_DIR / "run.py"), "multi", "--fake", "--rates", "10", "--model", "x"]
    proc = subprocess.run([*command, "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"run.py: error: {message}"
    assert not any(tmp_path.iterdir())  # refused before anything was written
