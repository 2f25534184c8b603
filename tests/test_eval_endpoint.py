"""`s1fast eval --endpoint`: a sweep decoded by two `s1fast serve` subprocesses on loopback (over HTTP, through
the official ``openai`` client) gives the same point files as the local `s1fast eval --model` on the same model
directory, greedy, but for the timings; bad or unreachable endpoints are one line."""

import json
import os
from pathlib import Path

import pytest
import torch

from s1fast.eval import scaling
from s1fast.kernels._common import force_backend

httpx = pytest.importorskip("httpx")
pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import test_scaling  # noqa: E402
from test_scaling import _args, _refused, _save_model  # noqa: E402
from test_serve import free_port, start_serve  # noqa: E402

problems = test_scaling.problems  # the fixture: 5 of the example problems

TIMING = ("time_s", "tokens_per_s")
SWEEP = ["--budgets", "2", "none", "--waits", "0", "2", "6", "--max-new-tokens", "12"]  # 6 waits: 12 tokens of thinking


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model directory, [base URL, base URL], [log path, log path]): two ``s1fast serve`` of a 2-layer random Qwen2
    that tries to end thinking at every step (so forced waits, budget cuts and answers all occur), on the kernels'
    PyTorch path with one thread, as the local run below."""
    tmp = tmp_path_factory.mktemp("served")
    model = _save_model(tmp / "eager", eager_to_end=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    procs, urls, logs = [], [], []
    try:
        for i in range(2):
            logs.append(open(tmp / f"serve{i}.log", "w+"))
            proc, url = start_serve(model, "--device", "cpu", "--max-rows", "2", log=logs[-1], env=env)
            procs.append(proc)
            urls.append(url + "/v1")
        yield model, urls, [Path(log.name) for log in logs]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)


def _endpoint_args(urls, problems, out, *extra):
    return [*(a for u in urls for a in ("--endpoint", u)), "--problems", problems, "--out", str(out),
            "--max-answer-tokens", "3", "--no-progress", *extra]


def _points(out) -> dict:
    """Each point file, its timings left out."""
    files = sorted(os.listdir(out / "points"))
    return {name: {k: v for k, v in json.loads((out / "points" / name).read_text()).items() if k not in TIMING}
            for name in files}


def test_endpoints_give_the_local_run_s_point_files(served, problems, tmp_path):
    model, urls, logs = served
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with force_backend("torch"):
            assert scaling.main(_args(model, problems, tmp_path / "local", *SWEEP)) == 0
    finally:
        torch.set_num_threads(threads)
    # the servers' dtype is recorded as --dtype says (fp32: the local run's default on CPU)
    assert scaling.main(_endpoint_args(urls, problems, tmp_path / "remote", *SWEEP, "--dtype", "fp32")) == 0

    local, remote = _points(tmp_path / "local"), _points(tmp_path / "remote")
    assert list(local) == [f"budget-{b}_waits-{w}.json" for b in ("2", "none") for w in (0, 2, 6)]
    assert remote == local
    records = [r for p in local.values() for r in p["records"]]
    # every kind of row was compared: cut by the budget, forced waits, thinking ended with an answer decoded, and
    # thinking that never ended (--max-new-tokens first)
    assert any(r["budget_cut"] for r in records) and any(r["forced_waits"] == 2 for r in records)
    assert any(r["thinking_ended"] and not r["budget_cut"] and r["answer_tokens"] > 0 for r in records)
    assert any(not r["thinking_ended"] and r["forced_waits"] == 6 for r in records)
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("local", "remote")]
    assert results[1]["environment"] == {"endpoints": urls}
    assert [{k: v for k, v in p.items() if k not in TIMING} for p in results[1]["points"]] == \
        [{k: v for k, v in p.items() if k not in TIMING} for p in results[0]["points"]]
    assert results[1]["settings"] == results[0]["settings"]
    # both servers decoded: the client sends each request to the next endpoint in turn
    assert all("POST /v1/completions" in log.read_text() for log in logs)

    # a rerun resumes from the same files
    assert scaling.main(_endpoint_args(urls, problems, tmp_path / "remote", *SWEEP, "--dtype", "fp32")) == 0
    assert _points(tmp_path / "remote") == remote


def test_bad_or_unreachable_endpoints_are_one_line(served, problems, tmp_path, capsys):
    model, urls, _ = served
    down = f"http://127.0.0.1:{free_port()}/v1"
    cases = [
        (["--endpoint", "localhost:8000"], "--endpoint 'localhost:8000': expected an http(s) URL"),
        (["--endpoint", down, "--retries", "0"], f"--endpoint {down}: cannot list its models (APIConnectionError"),
        (["--endpoint", down, "--retries", "0", "--model-name", model], f"--endpoint: 1 tries failed; last: {down}"),
        (["--endpoint", urls[0], "--s1-compat"], "--s1-compat: s1fast serve forces budgets its own way"),
        (["--endpoint", urls[0], "--model", model], "give --model PATH (decode here) or --endpoint URL"),
        ([], "give --model PATH or --endpoint URL"),
        (["--endpoint", urls[0], "--concurrency", "0"], "--concurrency must be >= 1, got 0"),
    ]
    for extra, line in cases:
        argv = ["--problems", problems, "--out", str(tmp_path / "o"), "--no-progress", "--max-new-tokens", "4", *extra]
        err = _refused(argv, capsys)
        assert err.startswith(f"s1fast eval: error: {line}"), err
