"""Closed-loop HTTP load on an OpenAI-compatible server: N clients streaming chat completions.

One *level* is N concurrent clients (httpx, one connection each), every client sending its next
request as soon as its previous one ends, until the level's request count is used up or its time
is over; requests still streaming then are cancelled and count as *cut* (their tokens so far
still count toward throughput: they were served within the level's wall time). Requests are
greedy with a fixed ``max_tokens`` and ``stream_options.include_usage``, so the final chunk
carries the server's own token counts (and, from Octomil, ``usage.early_exit``).

Measures per level, from the client's side of the socket:
- aggregate output tok/s = all completion tokens received / wall time of the level;
- TTFT (request sent -> first content chunk) and inter-token latency (gaps between successive
  content chunks of one stream, pooled over all streams) at p50/p95/p99;
- requests/s completed, errors (non-200 answers, broken streams), cut requests;
- average layers per token (Octomil's ``usage.early_exit.avg_layers_used``, weighted by tokens).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Prompt:
    kind: str  # "short" | "long"
    text: str


@dataclass
class Result:
    kind: str
    start: float
    stamps: list[float] = field(default_factory=list)  # arrival of each content chunk
    done: bool = False
    error: str | None = None
    completion_tokens: int | None = None  # from usage; None: the stream carried none
    prompt_tokens: int | None = None
    avg_layers: float | None = None
    total_layers: int | None = None

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's count when it gave one, else content chunks seen."""
        return self.completion_tokens if self.completion_tokens is not None else len(self.stamps)


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": .., "p95": .., "p99": ..}`` (linear interpolation); None for no values."""
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(values, qs), strict=True)}


def chat_body(model: str, text: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _read_chunk(result: Result, chunk: dict, now: float) -> None:
    choices = chunk.get("choices") or []
    if choices and (choices[0].get("delta") or {}).get("content"):
        result.stamps.append(now)
    usage = chunk.get("usage")
    if usage:
        result.completion_tokens = usage.get("completion_tokens")
        result.prompt_tokens = usage.get("prompt_tokens")
        early = usage.get("early_exit") or {}
        result.avg_layers = early.get("avg_layers_used")
        result.total_layers = early.get("total_layers")


async def stream_chat(
    client: httpx.AsyncClient, model: str, prompt: Prompt, max_tokens: int, result: Result
) -> None:
    """Send one streaming chat request, filling ``result`` as chunks arrive."""
    body = chat_body(model, prompt.text, max_tokens)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return
                _read_chunk(result, chunk, time.perf_counter())
        result.done = True
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]


async def run_level(
    base_url: str,
    model: str,
    prompts: list[Prompt],
    concurrency: int,
    max_requests: int,
    seconds: float,
    max_tokens: int,
) -> dict:
    """One level: ``concurrency`` clients, at most ``max_requests`` requests and ``seconds``."""
    results: list[Result] = []
    issued = 0

    async def client_loop(client: httpx.AsyncClient, stop_at: float) -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < stop_at:
            prompt = prompts[issued % len(prompts)]
            issued += 1
            result = Result(prompt.kind, time.perf_counter())
            results.append(result)
            await stream_chat(client, model, prompt, max_tokens, result)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(seconds + 60, connect=10)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        loops = [
            asyncio.create_task(client_loop(client, start + seconds)) for _ in range(concurrency)
        ]
        _, pending = await asyncio.wait(loops, timeout=seconds)
        for task in pending:  # the time is over: cut what still streams
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = min(time.perf_counter(), start + seconds) - start
    return summarize(results, wall, concurrency)


def summarize(results: list[Result], wall: float, concurrency: int) -> dict:
    """The level's figures from its requests (see the module docstring for the definitions)."""
    completed = [r for r in results if r.done and r.error is None]
    errors = [r for r in results if r.error is not None]
    cut = [r for r in results if not r.done and r.error is None]
    served = completed + cut
    tokens = sum(r.tokens for r in served)
    ttft = [r.stamps[0] - r.start for r in served if r.stamps]
    itl = [b - a for r in served for a, b in zip(r.stamps, r.stamps[1:], strict=False)]
    tpot = [
        (r.stamps[-1] - r.stamps[0]) / (len(r.stamps) - 1) for r in completed if len(r.stamps) > 1
    ]
    with_layers = [r for r in completed if r.avg_layers is not None and r.tokens]
    layer_tokens = sum(r.tokens for r in with_layers)
    avg_layers = (
        sum(r.avg_layers * r.tokens for r in with_layers) / layer_tokens if layer_tokens else None
    )

    def mean(xs: list[float]) -> float | None:
        return float(np.mean(xs)) if xs else None

    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "requests": len(results),
        "completed": len(completed),
        "cut": len(cut),
        "errors": len(errors),
        "error_samples": sorted({r.error for r in errors if r.error})[:3],
        "output_tokens": tokens,
        "output_tok_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(completed) / wall if wall > 0 else None,
        "ttft_s": percentiles(ttft),
        "itl_s": percentiles(itl),
        "tpot_s_mean": mean(tpot),
        "completion_tokens_mean": mean([r.tokens for r in completed]),
        "prompt_tokens_mean": {
            kind: mean([r.prompt_tokens for r in completed if r.kind == kind and r.prompt_tokens])
            for kind in ("short", "long")
        },
        "usage_reported": all(r.completion_tokens is not None for r in completed),
        "avg_layers_per_token": avg_layers,
        "total_layers": next((r.total_layers for r in with_layers), None),
    }


async def warm_up(base_url: str, model: str, prompts: list[Prompt], concurrency: int) -> list[str]:
    """A few short generations (one long prompt, then a burst of up to 4); their errors.

    Their texts are marked as warm-up, so no measured request finds its own prompt cached.
    """
    marked = [Prompt(p.kind, f"(Warm-up.) {p.text}") for p in prompts]
    long = [p for p in marked if p.kind == "long"][:1]
    short = [p for p in marked if p.kind == "short"][:4]
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(300)) as client:
        for batch in ([*long, *short[:1]], short[: max(1, min(concurrency, 4))]):
            results = [Result(p.kind, time.perf_counter()) for p in batch]
            await asyncio.gather(
                *(stream_chat(client, model, p, 8, r) for p, r in zip(batch, results, strict=True))
            )
            errors += [r.error for r in results if r.error]
    return errors
