"""``s1fast data distill``'s client against ``s1fast serve`` at 1, 4 and 16 requests in flight: requests/s and
generated tokens/s, so that the gain from ``--concurrency`` is seen.

The server is ``bench/serve.py``'s (in-process, uvicorn on a free loopback port, 16 rows of continuous batching, a
tiny random Qwen2 in fp32 on CPU, Qwen2.5-0.5B's shape in bf16 on GPU); the client is ``s1fast.client.Client``, the
one ``distill`` sends its requests with (the official ``openai`` client on threads). Each request is a chat question
with greedy decoding, ``new_tokens`` new tokens at most, a thinking budget of half of them."""

from __future__ import annotations

import time

import torch

from s1fast.bench.serve import build_server, plan, serving
from s1fast.client import Client
from s1fast.env import environment

SUMMARY_COLUMNS = ("case", "concurrency", "requests", "requests_per_s", "tokens_per_s", "seconds")
CONCURRENCY = (1, 4, 16)


def run(*, device: str, quick: bool, peers: list[str], headline: bool = False) -> list[dict]:
    """Bench-suite entry point (module docstring); ``peers`` has none here, ``headline`` sizes are the full run's
    (the GPU kit does not curate data)."""
    p = plan(device, quick)
    requests = 16 if quick else 48
    server = build_server(p, device)
    rows = [dict(case="environment", **environment(device), torch_threads=torch.get_num_threads())]
    settings = dict(max_tokens=p["new_tokens"], temperature=0.0, max_thinking_tokens=max(1, p["new_tokens"] // 2))
    jobs = {i: [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(requests)}
    with serving(server.app()) as url:
        for concurrency in CONCURRENCY:
            client = Client([f"{url}/v1"], model=server.model_name, concurrency=concurrency, retries=0)
            list(client.map({0: jobs[0]}, **settings))  # untimed
            t0 = time.perf_counter()
            replies = [r for _, r in client.map(jobs, **settings)]
            wall = time.perf_counter() - t0
            failed = [r.error for r in replies if r.error is not None]
            if failed:
                raise RuntimeError(f"bench data: {len(failed)} request(s) failed, first: {failed[0]}")
            rows.append(dict(case="distill", model=p["shape"], concurrency=concurrency, requests=requests,
                             new_tokens=p["new_tokens"], requests_per_s=requests / wall,
                             tokens_per_s=sum(r.tokens for r in replies) / wall, seconds=wall))
    return rows
