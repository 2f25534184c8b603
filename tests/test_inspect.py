"""`s1fast bench inspect`: ahead-of-time compilation for sm_90 / sm_80 without a GPU, resource and SASS reading.

Inspection compiles in a child process without TRITON_INTERPRET (conftest sets it, and interpreted
@triton.jit functions cannot be compiled), exactly as a user runs the command.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from s1fast.bench import perf_model as pm
from s1fast.bench.inspect import access_bits, format_table, main, sass_widths
from s1fast.kernels._common import interpreting
from s1fast.model.shapes import QWEN25_SHAPES

# A copy kernel compiled twice: 1024 bf16 elements over 4 warps give each thread 8 contiguous elements
# (128 bits), while 32 elements over 1 warp give each thread one (16 bits). If inspection lost the
# alignment specialisation or misread the SASS, the wide build would not show 128-bit accesses.
COPY_MODULE = textwrap.dedent('''
    import triton
    import triton.language as tl
    from s1fast.kernels._common import KernelSpec

    @triton.jit
    def copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)

    def kernel_specs(shape):
        sig = {"src_ptr": "*bf16", "dst_ptr": "*bf16", "n": "i32"}
        return [
            KernelSpec("copy_wide", copy_kernel, sig, {"BLOCK": 1024}, num_warps=4, config="BLOCK=1024"),
            KernelSpec("copy_narrow", copy_kernel, sig, {"BLOCK": 32}, num_warps=1, config="BLOCK=32"),
        ]
''')

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BOUND = ("rms_norm", "rope", "swiglu", "cross_entropy", "decode_attn")
KEYS = {"kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "widest_global_load_bits",
        "widest_global_store_bits"}


def _inspect(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Started in the repository root, where `-m` puts the root on sys.path (it shadowed the `kernels` package).
    return subprocess.run([sys.executable, "-m", "s1fast.cli", "bench", "inspect", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=900)


def test_access_widths_from_sass_modifiers():
    assert access_bits(".E.128") == 128
    assert access_bits(".E.64.CONSTANT") == 64
    assert access_bits(".E.U16") == 16
    assert access_bits(".E.S8") == 8
    assert access_bits(".E") == 32
    assert access_bits(".E.BYPASS.LTC128B.128") == 128  # LTC128B is a cache hint, not a width
    assert access_bits(".E.EF.LTC128B") == 32
    sass = """
        /*0100*/  @!P0 LDG.E.64 R2, desc[UR4][R4.64] ;
        /*0110*/  LDGSTS.E.BYPASS.LTC128B.128 [R7], desc[UR4][R2.64] ;
        /*0120*/  STG.E.U16 desc[UR4][R6.64], R2 ;
        /*0130*/  LDS.128 R8, [R3] ;
    """
    assert sass_widths(sass) == (128, 16)  # LDS (shared) is not a global access
    assert sass_widths("/*0000*/ EXIT ;") == (0, 0)


def test_copy_kernel_builds_dedup_and_widths(tmp_path):
    module = tmp_path / "copy_specs.py"
    module.write_text(COPY_MODULE)
    out = _inspect("--json", "--module", str(module), "--models", "0.5B,1.5B", "--arch", "sm_90,sm_80")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"builds"}  # no performance model for a module of one's own
    records = result["builds"]
    # two specs x two archs; identical across the two models, so each build lists both models once
    assert sorted((r["kernel"], r["arch"]) for r in records) == [
        ("copy_narrow", "sm_80"), ("copy_narrow", "sm_90"), ("copy_wide", "sm_80"), ("copy_wide", "sm_90")]
    for r in records:
        assert KEYS <= set(r)
        assert r["models"] == ["0.5B", "1.5B"]
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] == 0 and r["shared_bytes"] >= 0
        wide = r["kernel"] == "copy_wide"
        assert r["widest_global_load_bits"] == (128 if wide else 16), r
        assert r["widest_global_store_bits"] == (128 if wide else 16), r
    table = format_table(records).splitlines()
    assert "ld bits" in table[0] and len(table) == 2 + len(records)
    assert any("copy_wide" in line and "sm_90" in line and " 128 " in line for line in table)


@pytest.fixture(scope="module")
def inspected_15b() -> dict:
    """``s1fast bench inspect --json`` at the Qwen2.5-1.5B shapes on sm_90, the performance model included
    (one run shared by the tests below: it compiles every kernel and counts bytes under the interpreter)."""
    out = _inspect("--json", "--models", "1.5B", "--arch", "sm_90")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_memory_bound_kernels_on_sm90_do_not_spill_and_load_128_bits(inspected_15b):
    records = inspected_15b["builds"]
    assert all(KEYS <= set(r) and r["arch"] == "sm_90" for r in records)
    for family in MEMORY_BOUND:
        builds = [r for r in records if r["kernel"] == family or r["kernel"].startswith(family + "_")]
        assert builds, f"no kernel_specs builds for {family}: {[r['kernel'] for r in records]}"
        for r in builds:
            assert r["spill_bytes"] == 0, r
            assert r["widest_global_load_bits"] == 128, r


@pytest.mark.parametrize("args, message", [
    (["--models", "3B"], "model must be one of"),
    (["--arch", "sm_70"], "arch must be one of"),
])
def test_bad_arguments_are_named(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)  # validated before anything compiles
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and args[1] in err


# ------------------------------------------------------------------------------------ performance model
@pytest.mark.parametrize("family", pm.FAMILIES)
def test_model_bytes_ratios_within_stated_bounds(inspected_15b, family):
    """The CI guard on bytes: forward + backward of every kernel family at 4K-32K tokens moves at most its
    stated multiple of the minimum (a third sweep over the logits, a scaling pass, a per-program re-read of a
    large tensor would push it over). Lower bounds too: the counter must see what the kernels really do."""
    rows = [r for r in inspected_15b["model"] if r["family"] == family]
    assert [r["tokens"] for r in rows] == list(pm.MODEL_TOKENS)
    for r in rows:
        assert r["bytes_ratio"] <= pm.BYTES_BOUND[family], r
        assert 0 < r["predicted_pct_of_copy_bw"] <= 100 and r["predicted_us"] > 0
        for x in r["launches"]:
            assert x["grid"] > 0 and x["programs_per_sm"] >= 1
            assert set(x["occupancy_limiter"].split("/")) <= {"registers", "shared memory", "threads", "blocks"}
    kernels = [x["kernel"] for x in rows[0]["launches"]]
    if family == "cross_entropy":  # forward reads once; backward reads once and writes once: 1.5x, not less
        assert kernels == ["_cross_entropy_kernel", "_cross_entropy_bwd_kernel"]
        assert all(r["bytes_ratio"] >= 1.49 for r in rows)
    if family == "rms_norm":  # forward and backward; the dW partials are summed inside the backward launch
        assert kernels == ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"]
        hidden = QWEN25_SHAPES["1.5B"]["hidden"]
        for r in rows:
            bwd = r["launches"][1]
            assert bwd["grid"] == 2 * pm.GPU["sms"]  # persistent row programs: two per SM
            # the tail: one reducer per SM reads the 264 fp32 partial rows once and writes dW (bf16)
            assert bwd["tail_programs"] == pm.GPU["sms"]
            assert bwd["tail_bytes"] == 2 * pm.GPU["sms"] * hidden * 4 + hidden * 2
            assert r["predicted_pct_of_copy_bw"] >= 86.0  # the model's figure at 4K tokens: 86.2
    if family == "fused_linear_cross_entropy":
        # grad_output is 1: the in-place scaling of the hidden gradient reads only the scale, moves no data
        in_place = rows[0]["launches"][1]
        assert in_place["kernel"] == "_scale_kernel" and in_place["store_bytes"] == 0
        assert in_place["load_bytes"] <= 4 * in_place["grid"]


def test_model_decode_launches(inspected_15b):
    d = inspected_15b["decode"]
    # per layer at least: two norms, rope, attention, the MLP activation (Triton) and the four projections
    # the fused decode step (issue 12): 6 Triton launches (rope_kv_write, split + combine attention, swiglu, two
    # add_rms_norm) and 4 GEMMs per layer
    assert (d["triton_launches_per_layer"], d["torch_ops_per_layer"]) == (6, 4), d


@triton.jit
def _copy_kernel(src, dst, small, n, n_small, BLOCK: tl.constexpr, TWICE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src + offs, mask=mask, other=0.0)
    if TWICE:  # a second read of the same (large) tensor: counted again
        x += tl.load(src + offs, mask=mask, other=0.0)
    s = tl.load(small + tl.arange(0, 16), mask=tl.arange(0, 16) < n_small, other=0.0)  # every program: small
    tl.store(dst + offs, x + tl.sum(s, 0), mask=mask)


@pytest.mark.skipif(not interpreting(), reason="counting runs under Triton's interpreter (CPU CI)")
@pytest.mark.parametrize("n, twice", [(1000, False), (300_000, True)])
def test_counting_masked_bytes_re_reads_and_small_operands(n, twice):
    src, dst, small = torch.randn(n), torch.empty(n), torch.randn(10)
    with pm.counting() as launches:
        _copy_kernel[(triton.cdiv(n, 1024),)](src, dst, small, n, 10, BLOCK=1024, TWICE=twice)
    (launch,) = launches
    torch.testing.assert_close(dst, (2 * src if twice else src) + small.sum())  # the kernel really ran
    # masked elements are not counted; the 40-byte operand every program reads is counted once (L2-resident);
    # the 1.2 MB source read twice counts twice (an upper bound: its second read could hit L2 at best)
    assert launch["load_bytes"] == 4 * n * (2 if twice else 1) + 40
    assert launch["store_bytes"] == 4 * n
    assert launch["grid"] == triton.cdiv(n, 1024) and launch["constexprs"] == {"BLOCK": 1024, "TWICE": twice}


@pytest.mark.skipif(not interpreting(), reason="counting runs under Triton's interpreter (CPU CI)")
def test_scale_kernel_bytes_from_launch_arguments():
    """The elementwise scaling is computed from its arguments (not interpreted): nothing moves in place with
    grad_output 1, one read and one write otherwise, and a cast reads fp32 and writes bf16."""
    from s1fast.kernels._common import modelled_gpu, scaled

    x = torch.randn(10_000)
    cases = [(x.clone(), torch.tensor(1.0), None, 0), (x.clone(), torch.tensor(0.5), None, 8 * 10_000),
             (x.clone(), torch.tensor(1.0), torch.bfloat16, 6 * 10_000)]
    for t, go, dtype, expected in cases:
        with modelled_gpu(132), pm.counting() as launches:
            scaled(t, go, dtype)
        (launch,) = launches
        assert launch["kernel"] == "_scale_kernel" and launch["grid"] == 3  # ceil(10,000 / 4096) tiles
        assert launch["load_bytes"] + launch["store_bytes"] - 4 * launch["grid"] == expected


def test_occupancy_limits_and_prediction_formula():
    assert pm.occupancy(128, 9216, 8) == (2, "registers")  # 65,536 / (256 threads x 128)
    assert pm.occupancy(32, 100 * 1024, 4) == (2, "shared memory")  # 228 KiB / (100 KiB + 1 KiB)
    assert pm.occupancy(16, 0, 32) == (2, "threads")  # 2,048 / 1,024
    assert pm.occupancy(32, 0, 16) == (4, "registers/threads")  # 65,536 / (512 x 32) = 2,048 / 512
    assert pm.occupancy(8, 0, 1)[0] == 32  # at most 32 blocks
    gpu = dict(pm.GPU, copy_gbps=1000.0, launch_gap_us=2.0, sms=10)
    one = {"grid": 20, "programs_per_sm": 2, "load_bytes": 10**6, "store_bytes": 10**6}  # one full wave, 2 us
    assert pm.predict(10**6, [dict(one)], gpu)["predicted_pct_of_copy_bw"] == 50.0  # moves twice the minimum
    tail = dict(one, grid=30)  # 1.5 waves: the second wave half empty, 2 / (1.5 / 2) us
    assert pm.predict(2 * 10**6, [tail], gpu)["predicted_us"] == pytest.approx(2.667, abs=0.01)
    two = pm.predict(2 * 10**6, [dict(one), dict(one)], gpu)  # 2 + 2 us + one 2 us gap
    assert two["predicted_us"] == 6.0 and two["bytes_ratio"] == 2.0
    # a tail phase of 5 programs moving 0.2 of the 2 MB: 1.8 MB at full rate, 0.2 MB at half (5 / 10 SMs)
    tailed = pm.predict(10**6, [dict(one, tail_bytes=2 * 10**5, tail_programs=5)], gpu)
    assert tailed["predicted_us"] == pytest.approx(1.8 + 0.4)
