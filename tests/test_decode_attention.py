"""decode_attention: the split-over-sequence Triton kernel (through the interpreter on CPU) against a float64
reference, which is itself checked against torch SDPA with a mask.

Tolerances are elementwise bounds. For one output element ``out = sum_t p_t v_t`` (``p`` the softmax weights
over the row's keys, computed in float64 from the same rounded inputs), let ``PV = sum_t p_t |v_t|`` and
``u32 = 2^-24``. fp32 kernel arithmetic: a score is a D-term dot product (relative error <= D u32 of
``sum |q k|``, times ``|scale|``), the exponent ``s log2(e) - m`` and exp2 add a few u32 relative to ``|s|``,
``l`` and ``acc`` are sums of at most N terms (N u32) and the split combine adds a few more; so
``|err| <= (D + N + 16) u32 (4 + 2 max|s|) PV`` with the constants rounded up. bf16/fp16 inputs on a GPU: the
weights are rounded to the value dtype for ``P @ V`` (<= u_in relative each, so <= u_in PV in total) and the
output is cast (u_out |out|: 2^-8 for bf16 round-to-nearest, 2^-7 under Triton's interpreter, whose
fp32 -> bf16 cast truncates). A wrong mask, a lost split or a head mapped to the wrong kv head errs by O(|v|)
and fails these bounds by orders of magnitude.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_spec_matches_kernel

from s1fast.kernels import decode_attention, decode_attention_reference, force_backend, interpreting
from s1fast.model.shapes import QWEN25_SHAPES

da = importlib.import_module("s1fast.kernels.decode_attention")  # the module (the package exports the function)
U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _u_out(dtype: torch.dtype) -> float:
    return 2 * UNIT_ROUNDOFF[dtype] if interpreting() else UNIT_ROUNDOFF[dtype]


def make(B, Hq, Hkv, S, D, dtype, seed=0):
    """Fresh random q [B, Hq, D] and a decoder-style cache slice [B, Hkv, S, D] of a wider allocation (row and
    head strides are the allocation's, so the kernel reads strided views in place)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, Hq, D, generator=g).to(dtype).transpose(1, 2)[:, :, 0]  # as the decoder passes it
    k = torch.randn(2, B + 1, Hkv, S + 7, D, generator=g).to(dtype)[1, :B, :, :S]
    v = torch.randn(2, B + 1, Hkv, S + 7, D, generator=g).to(dtype)[0, :B, :, :S]
    return q, k, v


def weights(q, k, lengths, scale=None):
    """float64 softmax weights p [B, Hq, S] and scores s (masked positions: p = 0, s = 0)."""
    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("bhd,bhsd->bhs", q.double(), kk) * scale
    hidden = torch.arange(S)[None, None, :] >= lengths.clamp(0, S)[:, None, None]
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), -1).nan_to_num(0.0)
    return p, s.masked_fill(hidden, 0.0)


def bound(q, k, v, lengths, ref, dtype, scale=None):
    """Elementwise error bound of the kernel against the float64 result (module docstring)."""
    D, Hq, Hkv = q.shape[2], q.shape[1], k.shape[1]
    p, s = weights(q, k, lengths, scale)
    pv = torch.einsum("bhs,bhsd->bhd", p, v.double().abs().repeat_interleave(Hq // Hkv, dim=1))
    n = int(lengths.max())
    smax = s.abs().amax(-1, keepdim=True)
    fp32 = (D + n + 16) * U32 * (4 + 2 * smax) * pv
    return fp32 + UNIT_ROUNDOFF[dtype] * pv + _u_out(dtype) * ref.abs()


def check(out, ref, tol, what):
    assert out.shape == ref.shape and torch.isfinite(out).all(), what
    err = (out.double() - ref).abs()
    worst = (err - tol).argmax()
    assert (err <= tol).all(), f"{what}: err {err.flatten()[worst]:.3g} > bound {tol.flatten()[worst]:.3g}"


def boundary_lengths(B, Hkv, S, D, dtype):
    """Per-row lengths: 1, short, exactly one and two split chunks, the whole bound (cycled over B rows)."""
    cfg = da._config(B, Hkv, S, D, dtype)
    assert cfg["splits"] > 2, cfg  # the shapes below really split
    picks = [1, 5, cfg["chunk"], 2 * cfg["chunk"], S]
    return torch.tensor([picks[i % len(picks)] for i in range(B)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (6, 1), (14, 2)])
@pytest.mark.parametrize("D", [64, 128])
def test_matches_fp64_reference(dtype, Hq, Hkv, D):
    B, S = 5, 200
    q, k, v = make(B, Hq, Hkv, S, D, dtype, seed=Hq + D)
    lengths = boundary_lengths(B, Hkv, S, D, dtype)
    with force_backend("triton"):
        out = decode_attention(q, k, v, lengths)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths)
    assert out.dtype == dtype
    check(out, ref, bound(q, k, v, lengths, ref, dtype), f"{dtype} G={Hq // Hkv} D={D}")


def test_reference_is_sdpa_with_mask():
    """The float64 reference equals torch SDPA (boolean mask, GQA) to float64 rounding, and the kernel's
    fp32 result matches SDPA too."""
    B, Hq, Hkv, S, D = 4, 12, 2, 150, 64
    q, k, v = make(B, Hq, Hkv, S, D, torch.float32, seed=3)
    lengths = torch.tensor([150, 1, 77, 128])
    mask = torch.arange(S)[None, :] < lengths[:, None]
    sdpa = F.scaled_dot_product_attention(
        q.double()[:, :, None], k.double(), v.double(), attn_mask=mask[:, None, None, :], enable_gqa=True
    )[:, :, 0]
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths)
    torch.testing.assert_close(ref, sdpa, rtol=1e-12, atol=1e-12)
    with force_backend("triton"):
        out = decode_attention(q, k, v, lengths)
    check(out, sdpa, bound(q, k, v, lengths, sdpa, torch.float32), "kernel vs sdpa")


def test_float16_custom_scale_and_int32_lengths():
    B, Hq, Hkv, S, D = 3, 7, 1, 300, 128
    q, k, v = make(B, Hq, Hkv, S, D, torch.float16, seed=5)
    lengths = torch.tensor([300, 65, 2], dtype=torch.int32)
    with force_backend("triton"):
        out = decode_attention(q, k, v, lengths, scale=0.2)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths, scale=0.2)
    check(out, ref, bound(q, k, v, lengths, ref, torch.float16, scale=0.2), "fp16 scale=0.2")


def test_tail_never_read_and_every_output_written(monkeypatch):
    """NaN in every cache position at or past a row's length (and in the allocation past the bound) never
    reaches the output: the tail is not read. Outputs and partials start as NaN: every output element is
    written and no unwritten partial is read. Rows with no keys give zeros; lengths past the bound read the
    whole bound."""
    B, Hq, Hkv, S, D = 4, 6, 2, 130, 64
    q, _, _ = make(B, Hq, Hkv, S, D, torch.float32, seed=7)
    full_k, full_v = torch.randn(2, B, Hkv, S + 7, D)  # the allocation; the kernel sees [:, :, :S]
    k, v = full_k[:, :, :S], full_v[:, :, :S]
    lengths = torch.tensor([0, 3, 64, 1000])
    clean_k, clean_v = k.clone(), v.clone()
    for b in range(B):
        full_k[b, :, min(int(lengths[b]), S) :] = float("nan")
        full_v[b, :, min(int(lengths[b]), S) :] = float("nan")
    original = da._buffers
    monkeypatch.setattr(da, "_buffers", lambda *a: tuple(t.fill_(float("nan")) for t in original(*a)))
    with force_backend("triton"):
        out = decode_attention(q, k, v, lengths)
    ref = decode_attention_reference(q.double(), clean_k.double(), clean_v.double(), lengths)
    assert (out[0] == 0).all()
    check(out, ref, bound(q, clean_k, clean_v, lengths, ref, torch.float32), "poisoned tail")


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_paged_cache_reads_only_mapped_pages(page_size):
    """A paged cache: each row's positions scattered over shuffled pages (a non-contiguous table, a view of a
    wider one, int32), every page no row maps and every slot at or past a row's length NaN. The kernel's
    result equals the float64 reference on the dense keys within the fp32 bound: only the mapped slots below
    each row's length are read. The torch backend (the reference) agrees."""
    B, Hq, Hkv, D = 3, 4, 2, 32
    lengths = torch.tensor([1, 70, 129])
    width = -(-int(lengths.max()) // page_size) + 1  # one unused column per row
    q, k, v = make(B, Hq, Hkv, width * page_size, D, torch.float32, seed=page_size)
    g = torch.Generator().manual_seed(page_size)
    pages = 2 * B * width + 3
    order = torch.randperm(pages, generator=g)
    table = torch.full((B, width + 2), -1, dtype=torch.int32)
    k_pages, v_pages = (torch.full((pages, Hkv, page_size, D), float("nan")) for _ in range(2))
    for b in range(B):
        for c in range(-(-int(lengths[b]) // page_size)):  # the pages holding positions < lengths[b]
            page = int(order[b * width + c])
            table[b, c] = page
            keep = slice(c * page_size, min((c + 1) * page_size, int(lengths[b])))
            k_pages[page, :, : keep.stop - keep.start] = k[b, :, keep]
            v_pages[page, :, : keep.stop - keep.start] = v[b, :, keep]
    table = table[:, :width]  # a view with the table's row stride
    assert not table.is_contiguous() and (table >= 0).sum() < B * width
    table = table.clamp(min=0)  # unmapped entries: page 0, which may hold NaN; they are never read
    with force_backend("triton"):
        out = decode_attention(q, k_pages, v_pages, lengths, page_table=table)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths)
    check(out, ref, bound(q, k, v, lengths, ref, torch.float32), f"paged, page_size={page_size}")
    clean_k = torch.nan_to_num(k_pages)  # the reference gathers every table entry: no NaN for it
    with force_backend("torch"):
        torch_out = decode_attention(q, clean_k, torch.nan_to_num(v_pages), lengths, page_table=table)
    torch.testing.assert_close(torch_out.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"page_table must be \[B, pages per row\] = \[3, W\]"):
        decode_attention(q, k_pages, v_pages, lengths, page_table=table[:2])


def test_float64_and_torch_backend_run_the_reference():
    q, k, v = make(2, 4, 2, 40, 32, torch.float64, seed=9)
    lengths = torch.tensor([40, 9])
    with force_backend("triton"):
        assert torch.equal(decode_attention(q, k, v, lengths), decode_attention_reference(q, k, v, lengths))
    q32, k32, v32 = q.float(), k.float(), v.float()
    with force_backend("torch"):
        out = decode_attention(q32, k32, v32, lengths)
    assert torch.equal(out, decode_attention_reference(q32, k32, v32, lengths))


def _bad(**changes):
    q, k, v = make(2, 4, 2, 32, 64, torch.float32)
    args = dict(q=q, k_cache=k, v_cache=v, lengths=torch.tensor([32, 5]))
    return {name: change(args) if callable(change) else change for name, change in {**args, **changes}.items()}


BAD_INPUTS = [
    (dict(q=lambda a: a["q"][:, :, None]), ValueError, r"q must have 3 dims"),
    (dict(k_cache=lambda a: a["k_cache"][0]), ValueError, r"k_cache must have 4 dims"),
    (dict(q=lambda a: a["q"].half()), TypeError, r"q, k_cache and v_cache must have one dtype"),
    (dict(q=lambda a: a["q"].int()), TypeError, r"q must have dtype in"),
    (dict(lengths=lambda a: a["lengths"].float()), TypeError, r"lengths must have dtype in \(int32, int64\)"),
    (dict(lengths=torch.tensor([3])), ValueError, r"lengths must be \[B\] = \[2\]"),
    (
        dict(k_cache=lambda a: a["k_cache"][:, :1].expand(2, 3, 32, 64)),
        ValueError,
        r"k_cache must be \[B, Hkv, S, D\] .* with Hkv dividing Hq=4",
    ),
    (dict(v_cache=lambda a: a["v_cache"][:, :, :16]), ValueError, r"v_cache must have k_cache's shape"),
    (
        dict(
            q=lambda a: a["q"][..., :48],
            k_cache=lambda a: a["k_cache"][..., :48],
            v_cache=lambda a: a["v_cache"][..., :48],
        ),
        ValueError,
        r"head_dim .* power of two in \[16, 256\], got 48",
    ),
    (
        dict(lengths=lambda a: a["lengths"].to("meta")),
        ValueError,
        r"all tensors must be on one device, .*lengths on meta",
    ),
    (dict(scale=0.0), ValueError, r"scale must be None or a finite number > 0"),
    (dict(lengths=[32, 5]), TypeError, r"lengths must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("changes", "error", "message"), BAD_INPUTS)
def test_bad_inputs(backend, changes, error, message):
    with force_backend(backend), pytest.raises(error, match=r"^decode_attention: " + message):
        decode_attention(**_bad(**changes))


@pytest.mark.parametrize("model", sorted(QWEN25_SHAPES))
def test_kernel_specs_match_kernels(model):
    shape = {**QWEN25_SHAPES[model], "tokens": 8192, "dtype": torch.bfloat16}
    specs = da.kernel_specs(shape)
    assert [s.name for s in specs] == ["decode_attn_split", "decode_attn_combine"]
    assert specs[0].fn is da._decode_split_kernel and specs[1].fn is da._decode_combine_kernel
    cfg = da._config(1, shape["kv_heads"], 8192, shape["head_dim"], torch.bfloat16)
    G = shape["heads"] // shape["kv_heads"]
    for spec in specs:
        runtime, _ = assert_spec_matches_kernel(spec)
        pointers = {spec.signature[n] for n in runtime if n.endswith("_ptr") and n not in ("len_ptr", "pt_ptr")}
        assert pointers <= {"*bf16", "*fp32"}
        assert spec.signature["len_ptr"] == "*i64"
    assert specs[0].constexprs == dict(
        HQ=shape["heads"], G=G, D=shape["head_dim"], BLOCK_G=max(16, G), BLOCK_N=cfg["BLOCK_N"], DOT_FP32=False, PAGE=0
    )
    assert (specs[0].num_warps, specs[0].num_stages) == (cfg["num_warps"], cfg["num_stages"])
    assert specs[1].constexprs == dict(HQ=shape["heads"], D=shape["head_dim"], BLOCK_S=cfg["BLOCK_S"])
    # batch 1 with few kv heads at 8K: the sequence is split so pass 1 has ~256 programs, not Hkv
    assert cfg["splits"] * shape["kv_heads"] >= 128 and cfg["chunk"] % cfg["BLOCK_N"] == 0
    # a cache row past 2^31 elements: its stride is passed as a 64-bit integer
    big = da.kernel_specs({**shape, "tokens": 2**31 // (shape["kv_heads"] * shape["head_dim"]) + 64})
    assert big[0].signature["s_kb"] == "i64" and big[0].signature["s_kn"] == "i32"


def test_config_fixed_by_bound():
    """The grid depends on shapes and the bound only (what a CUDA graph per length bucket needs), chunks
    are whole tiles, and the splits cover the bound."""
    for rows, kv, bound_, D, dtype in [(1, 2, 8192, 128, torch.bfloat16), (16, 2, 8192, 128, torch.bfloat16),
                                       (1, 8, 100, 64, torch.float32), (3, 4, 1, 256, torch.float16)]:
        cfg = da._config(rows, kv, bound_, D, dtype)
        assert cfg == da._config(rows, kv, bound_, D, dtype)
        assert (
            cfg["chunk"] % cfg["BLOCK_N"] == 0
            and (cfg["splits"] - 1) * cfg["chunk"] < bound_ <= cfg["splits"] * cfg["chunk"]
        )
        assert cfg["BLOCK_N"] * D * torch.empty((), dtype=dtype).element_size() <= 16384


@pytest.mark.gpu
def test_cuda_graph_replay_and_64bit_offsets():
    """On a GPU: a launch captured in a CUDA graph follows new lengths on replay; a cache whose rows span more
    than 2^31 elements is read at the right places (checked on the last rows)."""
    B, Hq, Hkv, S, D = 3, 12, 2, 4096, 128
    q, k, v = (t.cuda() for t in make(B, Hq, Hkv, S, D, torch.bfloat16, seed=11))
    lengths = torch.tensor([1, 100, 4096], device="cuda")
    decode_attention(q, k, v, lengths)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, lengths)
    for new in ([4096, 64, 2], [7, 3000, 128]):
        lengths.copy_(torch.tensor(new))
        graph.replay()
        ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths)
        check(
            out.cpu(),
            ref.cpu(),
            bound(q.cpu(), k.cpu(), v.cpu(), lengths.cpu(), ref.cpu(), torch.bfloat16),
            f"graph {new}",
        )
    rows = 2**31 // (Hkv * 1024 * D) + 2  # [rows, Hkv, 1024, D] > 2^31 elements
    kb = torch.randn(rows, Hkv, 1024, D, device="cuda", dtype=torch.bfloat16)
    qb = torch.randn(rows, Hq, D, device="cuda", dtype=torch.bfloat16)
    lb = torch.full((rows,), 1000, device="cuda")
    out = decode_attention(qb, kb, kb, lb)[-2:]
    tail = slice(rows - 2, rows)
    ref = decode_attention_reference(qb[tail].double(), kb[tail].double(), kb[tail].double(), lb[tail])
    check(
        out.cpu(),
        ref.cpu(),
        bound(qb[tail].cpu(), kb[tail].cpu(), kb[tail].cpu(), lb[tail].cpu(), ref.cpu(), torch.bfloat16),
        "64-bit rows",
    )
