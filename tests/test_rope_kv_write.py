"""rope_kv_write: the Triton kernel (through the interpreter on CPU) and the PyTorch path against a float64
reference and transformers' own pieces, on shuffled page tables with rows at different positions.

Tolerances (relative to the largest reference magnitude, see ``helpers.assert_close``): fp32 1e-5, the kernel
computes in fp32 (a few roundings of 2^-24). bf16: every rounding to bf16 costs up to 2^-8 relative (2^-7 under
Triton's interpreter, whose fp32->bf16 cast truncates). Without norms q and k are rounded once after the rotation
(two terms of at most the head's magnitude): 2^-6; with Qwen3's norms twice more before it (the normalised value,
then the product with the weight, as ``rms_norm``): 2^-5. v is copied: exact in every dtype.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers
from helpers import assert_close, assert_spec_matches_kernel, generator, nan_empty
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from s1fast.kernels import force_backend, rope_kv_write, rope_kv_write_reference
from s1fast.model.shapes import QWEN25_SHAPES

kv_module = importlib.import_module("s1fast.kernels.rope_kv_write")  # the package attribute is the function

BACKENDS = ["triton", "torch"]
TOL = {(torch.float32, False): 1e-5, (torch.float32, True): 1e-5, (torch.bfloat16, False): 2**-6,
       (torch.bfloat16, True): 2**-5}
LAYERS, PAGES, PAGE = 2, 9, 4
HQ, HKV, D = 4, 2, 16


def rotary(positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [positions, D] from a real Qwen2RotaryEmbedding (theta 1e6), in ``dtype`` as Qwen returns."""
    config = transformers.Qwen2Config(hidden_size=2 * D, num_attention_heads=2, num_key_value_heads=1, head_dim=D,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cos, sin = Qwen2RotaryEmbedding(config)(torch.zeros(1, dtype=dtype), torch.arange(positions)[None])
    return cos[0], sin[0]


def make_case(dtype, T, norm, seed=None):
    """Fresh qkv, norms, a shuffled page table per row (rows own disjoint pages), rows starting at different
    positions, caches filled with random values (the ones no token maps to must come back unchanged)."""
    g = generator(seed)
    rows, width = 3, 3
    qkv = (torch.randn(rows, T, (HQ + 2 * HKV) * D, generator=g) * 2).to(dtype)
    pages = torch.randperm(PAGES, generator=g)[: rows * width] + 1  # never the trash page 0
    table = pages.view(rows, width).to(torch.int32)
    start = torch.randint(0, width * PAGE - T + 1, (rows, 1), generator=g)
    start[0] = torch.randint(0, PAGE, (1,), generator=g)  # row 0 near the start, row 1 at the table's end
    start[1] = width * PAGE - T
    positions = start + torch.arange(T)
    cache = [torch.randn(LAYERS, PAGES + 1, HKV, PAGE, D, generator=g).to(dtype) for _ in range(2)]
    norms = [(torch.rand(D, generator=g) + 0.5).to(dtype) for _ in range(2)] if norm else [None, None]
    return qkv, positions, table, cache, norms


def run(fn, qkv, positions, table, cache, norms, dtype, layer=1, positions_past=None):
    """``fn``'s q output and the caches it leaves (on copies), cos/sin in ``dtype``."""
    cos, sin = rotary(3 * PAGE + 2, dtype)
    k_cache, v_cache = (c.clone() for c in cache)
    with torch.no_grad():
        q = fn(qkv, cos, sin, positions, table, k_cache, v_cache, layer, *norms)
    return q, k_cache, v_cache


def slots(positions, table):
    """Boolean [PAGES + 1, HKV, PAGE, D] mask of the cache slots (of one layer) these tokens own."""
    page = table.long().gather(1, positions // PAGE)
    mask = torch.zeros(PAGES + 1, HKV, PAGE, D, dtype=torch.bool)
    mask[page, :, positions % PAGE] = True
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,norm", [(1, False), (3, False), (1, True)])
def test_matches_float64_and_leaves_other_slots(backend, dtype, T, norm, monkeypatch):
    qkv, positions, table, cache, norms = make_case(dtype, T, norm)
    with force_backend(backend), nan_empty(monkeypatch):  # q_out starts NaN: every element must be written
        q, k_cache, v_cache = run(rope_kv_write, qkv, positions, table, cache, norms, dtype)
    q64, k64, v64 = run(rope_kv_write_reference, qkv.double(), positions, table, [c.double() for c in cache],
                        [None if w is None else w.double() for w in norms], torch.float64)
    assert q.shape == (3, T, HQ, D) and q.dtype == dtype
    tol = TOL[dtype, norm]
    assert_close(q, q64, tol)
    mine = slots(positions, table)
    for got, ref, before in ((k_cache, k64, cache[0]), (v_cache, v64, cache[1])):
        assert torch.equal(got[0], before[0])  # the other layer
        assert torch.equal(got[1][~mine], before[1][~mine])  # every slot no token owns, the trash page included
        assert_close(got[1][mine], ref[1][mine], tol)
    assert torch.equal(v_cache[1][mine], v64[1][mine].to(dtype))  # v is copied


def test_positions_past_the_table_go_to_the_trash_page():
    """A token past the table's width (padding of a prefill chunk) writes page 0 only; index dtypes int64 / int32."""
    qkv, positions, table, cache, norms = make_case(torch.float32, 2, False)
    positions[2] = torch.tensor([3 * PAGE - 1, 3 * PAGE + 1])  # row 2: the last slot of its table, then past it
    with force_backend("triton"):
        q, k_cache, v_cache = run(rope_kv_write, qkv, positions.int(), table.long(), cache, norms, torch.float32)
    _, k64, v64 = run(rope_kv_write_reference, qkv.double(), positions, table, [c.double() for c in cache],
                      norms, torch.float64)
    trash = torch.zeros_like(k_cache, dtype=torch.bool)
    trash[1, 0, :, (3 * PAGE + 1) % PAGE] = True
    assert not torch.equal(k_cache[trash], cache[0][trash])
    for got, ref in ((k_cache, k64), (v_cache, v64)):
        assert_close(got, ref, 1e-5)  # everything, the trash slot included


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen3_norms_then_rope_match_transformers_in_float64(backend):
    """The float64 path is transformers' Qwen3RMSNorm per head, then apply_rotary_pos_emb; the fp32 kernel
    matches it."""
    qkv, positions, table, cache, norms = make_case(torch.float32, 2, True)
    with force_backend(backend):
        q, k_cache, _ = run(rope_kv_write, qkv, positions, table, cache, norms, torch.float32)
    cos, sin = rotary(3 * PAGE + 2, torch.float64)
    x = qkv.double().view(3, 2, HQ + 2 * HKV, D)
    q_norm, k_norm = Qwen3RMSNorm(D, eps=1e-6).double(), Qwen3RMSNorm(D, eps=1e-6).double()
    q_norm.weight.data.copy_(norms[0])
    k_norm.weight.data.copy_(norms[1])
    with torch.no_grad():
        q_ref = q_norm(x[:, :, :HQ]).transpose(1, 2)
        k_ref = k_norm(x[:, :, HQ : HQ + HKV]).transpose(1, 2)
        q_ref, k_ref = apply_rotary_pos_emb(q_ref, k_ref, cos[positions], sin[positions])
    assert_close(q, q_ref.transpose(1, 2), 1e-5)
    page = table.long().gather(1, positions // PAGE)
    assert_close(k_cache[1][page, :, positions % PAGE], k_ref.transpose(1, 2), 1e-5)


def test_bad_inputs_raise_clear_errors():
    qkv, positions, table, (k_cache, v_cache), _ = make_case(torch.float32, 1, False)
    cos, sin = rotary(16, torch.float32)
    good = dict(qkv=qkv, cos=cos, sin=sin, positions=positions, table=table, k_cache=k_cache, v_cache=v_cache,
                layer=0)
    cases = [
        (dict(qkv=qkv[..., :-1]), ValueError, r"qkv's last dim must be \(heads \+ 2 \* kv_heads\) \* head_dim"),
        (dict(layer=2), ValueError, r"layer must be an int in \[0, 2\)"),
        (dict(positions=positions[:2]), ValueError, r"positions must be \[rows, T\] = \[3, 1\]"),
        (dict(table=table[:2]), ValueError, r"table must be \[rows, width >= 1\] with rows = 3"),
        (dict(positions=positions.float()), TypeError, r"positions must have dtype in \(int32, int64\)"),
        (dict(k_cache=k_cache.bfloat16()), TypeError, r"k_cache must have dtype in \(float32\), got bfloat16"),
        (dict(v_cache=v_cache[:, :3]), ValueError, r"v_cache must have k_cache's shape"),
        (dict(cos=cos[:, :8]), ValueError, r"cos and sin must be \[positions, head_dim = 16\]"),
        (dict(q_norm=torch.ones(D)), ValueError, r"give both q_norm and k_norm \(Qwen3\) or neither"),
        (dict(q_norm=torch.ones(8), k_norm=torch.ones(8)), ValueError, r"q_norm must have shape \(16,\)"),
        (dict(qkv=qkv.clone().requires_grad_()), ValueError,
         r"inference only \(no backward\), but qkv requires grad; call it under torch.no_grad\(\)"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match="rope_kv_write: " + message):
            rope_kv_write(**{**good, **change})


def test_kernel_specs_describe_the_launched_kernel():
    for dims in QWEN25_SHAPES.values():
        specs = kv_module.kernel_specs(dict(dims, tokens=64, dtype=torch.bfloat16))
        assert [s.name for s in specs] == ["rope_kv_write", "rope_kv_write_qk_norm"]
        for spec, norm in zip(specs, (False, True)):
            assert_spec_matches_kernel(spec)
            assert spec.fn is kv_module._rope_kv_write_kernel and spec.constexprs["NORM"] is norm
            blocks, warps = kv_module._config(dims["heads"] + 2 * dims["kv_heads"], dims["head_dim"])
            assert spec.num_warps == warps and {k: spec.constexprs[k] for k in blocks} == blocks
            assert spec.signature["k_ptr"] == spec.signature["q_out_ptr"] == "*bf16"
            assert spec.signature["pos_ptr"] == "*i64" and spec.signature["table_ptr"] == "*i32"
