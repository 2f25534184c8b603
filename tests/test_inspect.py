"""`s1fast bench inspect`: ahead-of-time compilation for sm_90 / sm_80 without a GPU, resource and SASS reading.

Inspection compiles in a child process without TRITON_INTERPRET (conftest sets it, and interpreted
@triton.jit functions cannot be compiled), exactly as a user runs the command.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from s1fast.bench.inspect import access_bits, format_table, main, sass_widths

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

MEMORY_BOUND = ("rms_norm", "rope", "swiglu", "cross_entropy", "decode_attn")
KEYS = {"kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "widest_global_load_bits",
        "widest_global_store_bits"}


def _inspect(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "s1fast.cli", "bench", "inspect", *args],
                          capture_output=True, text=True, env=env, timeout=300)


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
    records = json.loads(out.stdout)
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


def test_memory_bound_kernels_on_sm90_do_not_spill_and_load_128_bits():
    out = _inspect("--json", "--models", "1.5B", "--arch", "sm_90")
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
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
