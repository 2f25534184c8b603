"""The bench suite: CLI end to end at tiny shapes, measured memory, profiling, and pytest-benchmark
microbenchmarks (`pytest --benchmark-only tests/test_bench.py` times them; a normal run calls each once)."""

import json
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_close

from s1fast import kernels as K
from s1fast.bench import cli
from s1fast.bench import kernels as kbench
from s1fast.bench.common import memory_profile, time_ms
from s1fast.env import release
from s1fast.kernels import force_backend
from s1fast.model.shapes import QWEN25_SHAPES

# A tiny Qwen-like shape so the Triton kernels run through the interpreter in seconds.
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000, tied=True)
UNIT_SUFFIXES = ("_ms", "_gbps", "_mib", "_tflops", "_pct_of_copy_bw", "_pct_of_matmul", "_vs_eager")


@pytest.fixture
def tiny_shapes(monkeypatch):
    monkeypatch.setitem(QWEN25_SHAPES, "tiny", TINY)
    grid = {"rms_norm": [("tiny", 8), ("tiny", 32)], "rope": [("tiny", 8)], "swiglu": [("tiny", 8)],
            "cross_entropy": [("tiny", 8)], "fused_linear_cross_entropy": [("tiny", 8)]}
    monkeypatch.setattr(kbench, "shapes", lambda device, quick, headline=False: grid)
    return grid


def test_memory_profile_measures_cpu_allocations():
    def work():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 19)  # 2 MiB: 6 MiB live
        del a
        c = torch.empty(1 << 18)  # 1 MiB: 3 MiB live
        return b, c

    mem = memory_profile(work, device="cpu")
    assert mem["peak_mib"] == pytest.approx(6.0, abs=0.01)
    assert mem["largest_alloc_mib"] == pytest.approx(4.0, abs=0.01)


def test_bench_kernels_cli_end_to_end(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["kernels", "--quick", "--device", "cpu", "--peers", "eager,liger,hf", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    assert env["device_type"] == "cpu" and release(env["torch"]) == release(torch.__version__)
    assert env["git_commit"] != "unknown"
    ceilings = results["ceilings"]
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"] > 0 and ceilings["matmul_dtype"] == "float32"
    rows = results["suites"]["kernels"]["rows"]
    expected = {(k, m, t, impl) for k, grid in tiny_shapes.items() for m, t in grid
                for impl in ("s1fast", "eager", "liger", "hf")}
    assert {(r["kernel"], r["model"], r["tokens"], r["impl"]) for r in rows} == expected
    for r in rows:
        if r["impl"] == "liger":
            assert r["skipped"] == "Liger-Kernel runs on CUDA only"
            continue
        if r["impl"] == "hf" and r["kernel"] not in ("rms_norm", "rope"):
            assert "same PyTorch ops" in r["skipped"]
            continue
        assert "skipped" not in r, r
        # conftest sets TRITON_INTERPRET=1: our rows ran the Triton kernels through the interpreter
        assert r["backend"] == ("triton-interpreter" if r["impl"] == "s1fast" else "torch")
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_mem_mib"] > 0
        assert r["bwd_ms"] > 0
        for key, value in r.items():
            if isinstance(value, float):
                assert key.endswith(UNIT_SUFFIXES) or key in ("peak_mem_ratio_vs_eager",), key
        if r["kernel"] == "fused_linear_cross_entropy":
            assert r["fwd_bwd_tflops"] > 0 and "fwd_bwd_gbps" not in r
            assert r["largest_alloc_mib"] > 0 and r["full_logits_fp32_mib"] == pytest.approx(8 * 1000 * 4 / 2**20)
        else:
            assert r["fwd_bwd_gbps"] > 0 and r["fwd_bwd_pct_of_copy_bw"] > 0
    eager_rms = next(r for r in rows if r["kernel"] == "rms_norm" and r["impl"] == "eager" and r["tokens"] == 8)
    # bytes that must move, forward+backward: x, y read/written once forward, dy, x read and dx written backward
    assert eager_rms["fwd_bwd_moved_mib"] == pytest.approx((5 * 8 * 64 * 4 + 3 * 64 * 4) / 2**20)
    assert eager_rms["fwd_bwd_speedup_vs_eager"] == 1.0
    report = (out / "results.md").read_text()
    assert "## kernels" in report and "| kernel | model | tokens |" in report
    for kernel in tiny_shapes:
        assert (out / f"kernels_{kernel}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "copy_gbps" in printed and "Triton kernels through TRITON_INTERPRET=1" in printed


def test_time_ms_setup_runs_outside_the_timed_region():
    calls = []

    def setup():
        time.sleep(0.02)
        return len(calls)

    ms = time_ms(lambda state: calls.append(state) or time.sleep(0.002), device="cpu", quick=True, setup=setup)
    assert 1.5 < ms < 12  # the 2 ms call, not the 20 ms setup
    assert calls == list(range(len(calls))) and len(calls) >= 4  # each call got its own fresh setup


def test_backward_is_timed_alone_and_never_negative():
    """A forward that is slow for its first 20 calls (a stand-in for clocks, caches, noise drifting between
    measurements) and a 3 ms backward: fwd_bwd_ms - fwd_ms would be about 3 - 20 < 0; the backward timed
    on its own is 3 ms."""
    calls = [0]

    class Slow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            calls[0] += 1
            time.sleep(0.02 if calls[0] <= 20 else 0.0)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            time.sleep(0.003)
            return grad

    x = torch.randn(8, requires_grad=True)
    case = kbench.Case("rms_norm", "tiny", 8, [x], [], None, {})
    row = kbench._measure(case, "s1fast", lambda t: Slow.apply(t).sum(), "cpu", True, {})
    assert row["fwd_ms"] > 15 and row["fwd_bwd_ms"] - row["fwd_ms"] < 0  # what the old difference reported
    assert 2.5 < row["bwd_ms"] < 15


def test_bench_refuses_a_file_as_out_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "device_ceilings", lambda *a, **k: pytest.fail("the benchmark ran"))
    target = tmp_path / "results.txt"
    target.write_text("not a directory")
    for out, message in ((target, "is a file; give a directory"), (target / "sub", "cannot create the directory")):
        with pytest.raises(SystemExit) as e:
            cli.main(["kernels", "--quick", "--device", "cpu", "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"s1fast bench: error: --out {str(out)!r}" in err and message in err, err
    assert target.read_text() == "not a directory"


def test_missing_and_failing_suites_are_reported_not_fatal(tiny_shapes, tmp_path, monkeypatch):
    class Broken:
        @staticmethod
        def run(*, device, quick, peers, headline):
            yield {"case": "measured before the error"}
            raise RuntimeError("boom")

    real_load = cli._load
    monkeypatch.setattr(cli, "SUITES", ("not_a_suite", "broken", "kernels"))
    monkeypatch.setattr(cli, "_load", lambda s: Broken if s == "broken" else real_load(s))
    monkeypatch.setattr(kbench, "shapes", lambda device, quick, headline=False: {"swiglu": [("tiny", 8)]})
    out = tmp_path / "out"
    assert cli.main(["all", "--quick", "--device", "cpu", "--peers", "eager", "--out", str(out)]) == 1
    suites = json.loads((out / "results.json").read_text())["suites"]
    assert suites["not_a_suite"] == {"skipped": "bench/not_a_suite.py is not written yet"}
    assert suites["broken"] == {"rows": [{"case": "measured before the error"}], "error": "RuntimeError: boom"}
    assert {r["impl"] for r in suites["kernels"]["rows"]} == {"s1fast", "eager"}


def test_rows_are_written_as_they_are_measured(tmp_path, monkeypatch):
    """results.json and results.md are rewritten after every row a suite yields, with the suite marked unfinished
    until it ends: a run stopped midway (the GPU kit's caps) keeps what it measured."""
    out = tmp_path / "out"
    on_disk = []

    class Slow:
        @staticmethod
        def run(*, device, quick, peers, headline):
            on_disk.append(json.loads((out / "results.json").read_text())["suites"]["slow"])
            for tokens in (8, 16):
                yield {"impl": "x", "tokens": tokens, "median_ms": 1.0}
                on_disk.append(json.loads((out / "results.json").read_text())["suites"]["slow"])
                assert "unfinished: " in (out / "results.md").read_text()

    monkeypatch.setattr(cli, "SUITES", ("slow",))
    monkeypatch.setattr(cli, "_load", lambda suite: Slow)
    assert cli.main(["all", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert [s["unfinished"] for s in on_disk] == [cli.UNFINISHED] * 3
    assert [[r["tokens"] for r in s["rows"]] for s in on_disk] == [[], [8], [8, 16]]
    final = json.loads((out / "results.json").read_text())["suites"]["slow"]
    assert "unfinished" not in final and final["wall_s"] > 0 and len(final["rows"]) == 2


def test_profile_writes_trace_and_top_ops(tiny_shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kbench, "shapes", lambda device, quick, headline=False: {"rms_norm": [("tiny", 8)]})
    out = tmp_path / "out"
    assert cli.main(["kernels", "--quick", "--device", "cpu", "--peers", "eager", "--profile", "--out", str(out)]) == 0
    trace = json.loads((out / "trace_kernels.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"kernels/rms_norm/s1fast/forward", "kernels/rms_norm/eager/backward"} <= names
    profile = json.loads((out / "results.json").read_text())["suites"]["kernels"]["profile"]
    shares = [o["share_pct"] for o in profile["top_ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0 + 1e-6
    regions = {r["name"]: r for r in profile["regions"]}
    assert (
        regions["kernels/rms_norm/eager/forward"]["calls"] > 1
        and regions["kernels/rms_norm/eager/forward"]["total_ms"] > 0
    )
    assert "== profile: kernels" in capsys.readouterr().out


def test_cuda_profile_shares_count_each_kernel_once():
    """On CUDA a CPU op's self device time repeats the time of the kernels it launched, which appear as events of
    their own: shares are taken over the device events only (a CPU op in the sum would halve every share)."""
    from torch.autograd import DeviceType

    from s1fast.bench.profiling import summarise

    def event(key, device_type, self_us, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_us,
                               device_time_total=self_us, is_user_annotation=annotation, count=1)

    events = [event("aten::mm", DeviceType.CPU, 1000), event("gemm_kernel", DeviceType.CUDA, 1000),
              event("_rms_norm_fwd_kernel", DeviceType.CUDA, 3000),
              event("kernels/rms_norm/s1fast/forward", DeviceType.CUDA, 3000, annotation=True)]
    summary = summarise(SimpleNamespace(key_averages=lambda: events), device="cuda")
    assert [(o["name"], o["share_pct"]) for o in summary["top_ops"]] == [("_rms_norm_fwd_kernel", 75.0),
                                                                         ("gemm_kernel", 25.0)]
    assert [r["name"] for r in summary["regions"]] == ["kernels/rms_norm/s1fast/forward"]


@pytest.mark.parametrize("argv, message", [
    (["kernels", "--peers", "eager,vllm"], "unknown peers ['vllm']"),
    (["kernels", "--device", "tpu"], "--device must be cuda[:N] or cpu"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# ---- pytest-benchmark microbenchmarks (CPU sizes: Qwen2.5-0.5B widths, the kernels' PyTorch paths) ----

def _cpu_case(kernel: str):
    torch.manual_seed(0)
    s = QWEN25_SHAPES["0.5B"]
    if kernel == "rms_norm":
        return (torch.randn(512, s["hidden"]), 1 + 0.1 * torch.randn(s["hidden"])), K.rms_norm, K.rms_norm_reference
    if kernel == "swiglu":
        return (torch.randn(256, s["intermediate"]), torch.randn(256, s["intermediate"])), K.swiglu, K.swiglu_reference
    if kernel == "rope":
        q, k = torch.randn(1, s["heads"], 256, s["head_dim"]), torch.randn(1, s["kv_heads"], 256, s["head_dim"])
        angles = torch.randn(1, 256, s["head_dim"] // 2)
        emb = torch.cat((angles, angles), -1)
        return (q, k, emb.cos(), emb.sin()), K.apply_rope, K.apply_rope_reference
    if kernel == "cross_entropy":
        labels = torch.randint(0, s["vocab"], (16,))
        return (torch.randn(16, s["vocab"]), labels), K.cross_entropy, K.cross_entropy_reference
    # a 32K vocabulary keeps the lm_head (and its gradient) small enough for a microbenchmark
    labels = torch.randint(0, 32768, (64,))
    return ((torch.randn(64, s["hidden"]), 0.02 * torch.randn(32768, s["hidden"]), labels),
            K.fused_linear_cross_entropy, K.fused_linear_cross_entropy_reference)


def _fwd_bwd(fn, inputs: list, leaves: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of ``fn(*inputs)`` and the gradients of ``leaves`` for an all-ones upstream gradient."""
    out = fn(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("impl", ["s1fast", "eager"])
@pytest.mark.parametrize("kernel", kbench.KERNELS)
def test_microbenchmark_cpu_fwd_bwd(kernel, impl, benchmark, request):
    """Times forward + backward of a kernel's CPU path in fp32 ("s1fast": the public function under the torch
    backend; for rms_norm, swiglu and rope that is the ``*_reference`` itself, the "eager" case) and checks its
    outputs and gradients against the float64 reference on the same inputs."""
    inputs, ours, reference = _cpu_case(kernel)
    n_leaves = 2 if kernel == "rope" else sum(t.is_floating_point() for t in inputs)  # not rope's cos and sin
    leaves = [t.requires_grad_(True) for t in inputs[:n_leaves]]
    fn = ours if impl == "s1fast" else reference

    benchmark.group = kernel
    timed = request.config.getoption("benchmark_only")  # a normal test run calls the function once
    with force_backend("torch"):
        outs, grads = benchmark.pedantic(_fwd_bwd, (fn, inputs, leaves), rounds=10 if timed else 1,
                                         warmup_rounds=1 if timed else 0)
    inputs64 = [t.detach().double() if t.is_floating_point() else t for t in inputs]
    leaves64 = [t.requires_grad_(True) for t in inputs64[:n_leaves]]
    want_outs, want_grads = _fwd_bwd(reference, inputs64, leaves64)
    assert len(outs) == len(want_outs) and len(grads) == len(want_grads) == n_leaves
    for got, want in zip(outs + grads, want_outs + want_grads):
        # fp32 against float64: rounding of fp32 sums over <= 32K terms, ~1e-6 relative; 1e-5 leaves a margin
        assert_close(got, want, 1e-5)
