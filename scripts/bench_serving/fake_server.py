#!/usr/bin/env python3
"""A stand-in for a vLLM OpenAI-compatible server, for tests and CPU rehearsals of the benchmark.

    python scripts/bench_serving/fake_server.py --port 8001 --model a \\
        [--max-running 64] [--prefill-ms 20] [--tpot-ms 10] [--host 127.0.0.1]

Serves GET /health, GET /v1/models, GET /metrics (vLLM's num_requests_running and
num_requests_waiting gauges, the sums and counts of its first-token histograms: TTFT, queue
and prefill time; Prometheus text) and POST /v1/completions, streamed the way vLLM streams it
(one `data:` chunk per token, finish_reason "length" on the last, a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`) or not streamed. It generates "x" tokens
and always exactly max_tokens of them (as with ignore_eos). At most --max-running requests
decode at once; the rest wait in arrival order, so queueing shows up as a longer TTFT. The first
token comes --prefill-ms after admission, each next one --tpot-ms later. SIGTERM or Ctrl-C
stops it, ending open streams. Tests import `make_app` and run it in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_SHUTDOWN_TIMEOUT_S = 1.0


@dataclass
class FakeEngine:
    """Admission and counters of one fake server. Used from its event loop only."""

    model: str
    max_running: int
    prefill_s: float
    tpot_s: float
    num_running: int = 0
    num_generated_tokens: int = 0
    num_finished: int = 0
    # vLLM's first-token histograms, as (sum of seconds, count): arrival to first token,
    # arrival to admission, admission to first token
    timings: dict[str, list[float]] = field(
        default_factory=lambda: {k: [0.0, 0] for k in ("time_to_first_token", "request_queue_time", "request_prefill_time")}
    )
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)

    @property
    def num_waiting(self) -> int:
        return sum(not fut.done() for fut in self.waiters)

    async def admit(self) -> None:
        """Wait for a decode slot, first come first served; pair every admit with one release."""
        if self.num_running < self.max_running and not self.waiters:
            self.num_running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us just before the cancel: pass it on
            elif fut in self.waiters:
                self.waiters.remove(fut)
            raise

    def record(self, metric: str, seconds: float) -> None:
        entry = self.timings[metric]
        entry[0] += seconds
        entry[1] += 1

    def release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # num_running stays: the slot changes hands
                return
        self.num_running -= 1


ENGINE = web.AppKey("engine", FakeEngine)


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.json_response(body, status=status)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def _models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    model = {
        "id": engine.model,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "fake_server",
        "root": engine.model,
    }
    return web.json_response({"object": "list", "data": [model]})


async def _metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    label = f'{{model_name="{engine.model}"}}'
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{label} {float(engine.num_running)}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{label} {float(engine.num_waiting)}",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{label} {float(engine.num_generated_tokens)}",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        f"vllm:request_success_total{label} {float(engine.num_finished)}",
    ]
    for metric, (total, count) in engine.timings.items():
        name = f"vllm:{metric}_seconds"
        lines += [f"# TYPE {name} histogram", f"{name}_sum{label} {total}", f"{name}_count{label} {float(count)}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


def _count_prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, list):
        return len(prompt)
    return len(str(prompt).split())


async def _completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body is not JSON", "BadRequestError")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object", "BadRequestError")
    if body.get("model") != engine.model:
        return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return _error(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", "BadRequestError")
    usage = {"prompt_tokens": _count_prompt_tokens(body.get("prompt", ""))}
    usage["completion_tokens"] = max_tokens
    usage["total_tokens"] = usage["prompt_tokens"] + max_tokens
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": engine.model,
    }
    stream = bool(body.get("stream"))
    include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))

    response: web.StreamResponse | None = None
    if stream:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
    loop = asyncio.get_running_loop()
    arrived = loop.time()
    await engine.admit()
    try:
        admitted = loop.time()
        engine.record("request_queue_time", admitted - arrived)
        first_token_at = admitted + engine.prefill_s
        for i in range(max_tokens):
            # Token i is due at a fixed time, so per-token sleep overhead does not accumulate.
            await asyncio.sleep(max(0.0, first_token_at + i * engine.tpot_s - loop.time()))
            engine.num_generated_tokens += 1
            if i == 0:
                engine.record("request_prefill_time", loop.time() - admitted)
                engine.record("time_to_first_token", loop.time() - arrived)
            if response is not None:
                finish = "length" if i == max_tokens - 1 else None
                choice = {"index": 0, "text": "x", "logprobs": None, "finish_reason": finish, "stop_reason": None}
                await response.write(_sse({**head, "choices": [choice]}))
        engine.num_finished += 1
    finally:
        engine.release()
    if response is None:
        choice = {
            "index": 0,
            "text": "x" * max_tokens,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
        return web.json_response({**head, "choices": [choice], "usage": usage})
    if include_usage:
        await response.write(_sse({**head, "choices": [], "usage": usage}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def make_app(model: str, max_running: int = 64, prefill_ms: float = 20.0, tpot_ms: float = 10.0) -> web.Application:
    """An aiohttp application serving one fake model; `app[ENGINE]` is its FakeEngine.

    Run it with handler_cancellation=True (`web.AppRunner(app, handler_cancellation=True)`),
    as `main` does, so that a client that goes away frees its place, as vLLM aborts it.

    Raises:
        ValueError: an empty model name, max_running < 1, or a negative time.
    """
    if not model:
        raise ValueError("model must be a non-empty name")
    if max_running < 1:
        raise ValueError(f"max_running must be >= 1, got {max_running}")
    if prefill_ms < 0 or tpot_ms < 0:
        raise ValueError(f"prefill_ms and tpot_ms must be >= 0, got {prefill_ms} and {tpot_ms}")
    app = web.Application()
    app[ENGINE] = FakeEngine(model, max_running, prefill_ms / 1000, tpot_ms / 1000)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/v1/completions", _completions)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake vLLM OpenAI-compatible server (CPU only).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the name requests must use")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-running", type=int, default=64, help="requests decoding at once (default 64)")
    parser.add_argument("--prefill-ms", type=float, default=20.0, help="admission to first token (default 20)")
    parser.add_argument("--tpot-ms", type=float, default=10.0, help="time per next token (default 10)")
    args = parser.parse_args(argv)
    try:
        app = make_app(args.model, args.max_running, args.prefill_ms, args.tpot_ms)
    except ValueError as exc:
        parser.error(str(exc))
    address = f"http://{args.host}:{args.port}"

    def announce(_message: str) -> None:
        print(f"fake_server: model {args.model} on {address}", flush=True)

    # run_app turns SIGINT and SIGTERM into a graceful exit; open streams get _SHUTDOWN_TIMEOUT_S.
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=announce,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        access_log=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
