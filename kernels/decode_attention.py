"""Decode attention: one query token per row against a KV cache, split over the sequence (flash-decoding).

For a row ``b``, query head ``h`` with key/value head ``j = h // (Hq / Hkv)`` (GQA), ``n = lengths[b]`` and
``scale`` (default ``D ** -0.5``)::

    s_t = scale * <q_h, k_{j,t}>          t < n
    out = sum_t exp(s_t - m) v_{j,t} / sum_t exp(s_t - m),   m = max_t s_t

A row with ``n == 0`` has no keys; its output is defined as zeros. Plan: the positions ``[0, S)`` are cut into
``splits`` chunks of ``chunk`` positions. Pass 1 computes, for each chunk ``c`` with the online softmax,
``m_c = max s_t``, ``l_c = sum exp(s_t - m_c)``, ``a_c = sum exp(s_t - m_c) v_t`` over ``t`` in the chunk and
below ``n``; pass 2 combines the chunks that hold any ``t < n``::

    M = max_c m_c,   out = sum_c exp(m_c - M) a_c / sum_c exp(m_c - M) l_c

Scores are kept in base 2 (``s * log2(e)``, then ``exp2``), which changes nothing mathematically.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from s1fast.kernels._common import (
    FLOAT_DTYPES,
    KernelSpec,
    check_same_device,
    check_tensor,
    interpreting,
    launch_spec,
    on_device,
    spec_dtype,
    unit_last,
    use_triton,
)

_FN = "decode_attention"
_ACCEPTED = FLOAT_DTYPES + (torch.float64,)
_LENGTH_DTYPES = (torch.int32, torch.int64)
# Pass-1 programs the split aims at: two per SM of an H100's 132, with chunks of at least one tile (batch 1 of
# Qwen2.5-1.5B, 2 kv heads, at 8K splits each head 128 ways).
_TARGET_PROGRAMS = 256
# Keys per tile at most: 16 KiB (BLOCK_N = 64 positions of a 128-dim bf16 head); with 3 pipeline stages of keys
# and values that is 96 KiB of shared memory at most, which fits sm_80 and sm_90.
_TILE_BYTES = 16384
_LOG2E = 1.4426950408889634


def _config(rows: int, kv_heads: int, bound: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes, warps, stages and the split of ``[0, bound)`` for one launch (no autotuning).

    Shared by the launcher and ``kernel_specs``; depends only on shapes and dtype, so a CUDA graph captured
    for one bound replays the same grid. Pass 2 reads up to 64 chunks per step (``BLOCK_S``; 32 for 256-dim
    heads), so it loops ``splits / 64`` times.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    block_n = max(16, min(64, _TILE_BYTES // (head_dim * elem)))
    wanted = max(1, -(-_TARGET_PROGRAMS // max(1, rows * kv_heads)))
    chunk = max(1, -(-bound // wanted))
    chunk = -(-chunk // block_n) * block_n
    splits = max(1, -(-bound // chunk))
    block_s = min(64, 8192 // head_dim, triton.next_power_of_2(splits))
    return dict(BLOCK_N=block_n, chunk=chunk, splits=splits, BLOCK_S=block_s, num_warps=4, num_stages=3,
                DOT_FP32=dtype == torch.float32)


def _block_g(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


# ----------------------------------------------------------------------------------------------- kernels
# Pass 1: one program per ``(split, kv head, row)``; it loads the ``Hq / Hkv`` query heads of its kv group as one
# ``[BLOCK_G, D]`` tile (padded to at least 16 rows for ``tl.dot``), so every key and value is read once per
# group, and walks its chunk up to the row's length in ``[BLOCK_N, D]`` tiles (128-bit loads along D,
# software-pipelined), scores and ``P @ V`` on tensor cores with fp32 accumulation; positions at or past the
# row's length are never loaded. It writes ``m_c``, ``l_c`` (fp32 ``[B, Hq, splits]``) and ``a_c`` (fp32
# ``[B, Hq, splits, D]``) for chunks that start below the length. Offsets of rows, heads and tiles are 64-bit.
# The grid depends only on ``(B, Hkv, Hq, S)``; lengths are read on the device, so a launch for a fixed bound
# can be captured in a CUDA graph and replayed as the rows grow.
#
# Numerics: bf16/fp16 tiles go to the tensor cores as they are and the probabilities are rounded to the value
# dtype for ``P @ V`` (as flash-attention does: relative error <= 2^-8 per weight in bf16); fp32 inputs use exact
# fp32 dots (``input_precision="ieee"``, not TF32). Triton's interpreter computes bf16 dots wrongly, so under
# ``TRITON_INTERPRET=1`` every dot runs in fp32 (``DOT_FP32``).
@triton.jit(do_not_specialize=["S", "chunk", "splits"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, pt_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, S, chunk, splits,
    s_qb, s_qh, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, PAGE: tl.constexpr,
):
    split = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), S)
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    heads = (kvh * G + g).to(tl.int64)
    g_ok = g < G
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    first = start.to(tl.int64)
    k_ptrs = k_ptr + b * s_kb + kvh.to(tl.int64) * s_kh + first * s_kn + (n[:, None] * s_kn + d[None, :])
    v_ptrs = v_ptr + b * s_vb + kvh.to(tl.int64) * s_vh + first * s_vn + (n[:, None] * s_vn + d[None, :])
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n_ok = (n0 + n) < end
        if PAGE > 0:  # paged cache (s_kb, s_vb: page strides): position t is slot t % PAGE of page
            # table[b, t // PAGE]
            t = n0 + n
            page = tl.load(pt_ptr + b * s_pb + t // PAGE, mask=n_ok, other=0).to(tl.int64)
            k_ptrs = k_ptr + kvh.to(tl.int64) * s_kh + (page * s_kb + (t % PAGE) * s_kn)[:, None] + d[None, :]
            v_ptrs = v_ptr + kvh.to(tl.int64) * s_vh + (page * s_vb + (t % PAGE) * s_vn)[:, None] + d[None, :]
        k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        k_ptrs += BLOCK_N * s_kn  # pointers advance in 64 bits; the in-tile offsets stay small
        v_ptrs += BLOCK_N * s_vn
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    part = (b * HQ + heads) * splits + split  # [BLOCK_G] index into [B, Hq, splits]
    store = g_ok & (start + 0 * g < length)  # a [BLOCK_G] mask (the interpreter rejects scalar & vector)
    tl.store(m_ptr + part, m_i, mask=store)
    tl.store(l_ptr + part, l_i, mask=store)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=store[:, None])


# Pass 2: one program per ``(query head, row)`` merges the chunks below the row's length online and writes the
# output.
@triton.jit(do_not_specialize=["S", "chunk", "splits"])
def _decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, len_ptr, out_ptr,
    S, chunk, splits,
    s_ob, s_oh,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    length = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), S), 0)
    used = tl.cdiv(length, chunk)
    base = (b * HQ + h) * splits
    d = tl.arange(0, D)
    c = tl.arange(0, BLOCK_S)

    m_all = tl.full([], float("-inf"), tl.float32)
    l_all = tl.zeros([], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for c0 in range(0, used, BLOCK_S):  # every block holds at least one used chunk: m_new is finite
        ok = (c0 + c) < used
        m = tl.load(m_ptr + base + c0 + c, mask=ok, other=float("-inf"))
        l = tl.load(l_ptr + base + c0 + c, mask=ok, other=0.0)
        a = tl.load(acc_ptr + (base + c0 + c)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_all, tl.max(m, 0))
        alpha = tl.exp2(m_all - m_new)
        w = tl.exp2(m - m_new)
        l_all = l_all * alpha + tl.sum(w * l, 0)
        acc = acc * alpha + tl.sum(w[:, None] * a, 0)
        m_all = m_new

    out = acc / tl.where(l_all > 0, l_all, 1.0)  # no chunk used (length 0): acc is 0, so is the output
    tl.store(out_ptr + b * s_ob + h * s_oh + d, out.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------ launch arguments, launchers
def _split_args(q, k, v, lengths, page_table, m, l, acc, qk_scale, S, cfg) -> list:
    """Pass 1's runtime arguments in order (shared by the launcher and ``kernel_specs``); without a page table
    ``lengths`` stands in for its pointer (never read)."""
    table, s_pb = (lengths, 0) if page_table is None else (page_table, page_table.stride(0))
    return [q, k, v, lengths, table, m, l, acc, qk_scale, S, cfg["chunk"], cfg["splits"],
            *q.stride()[:2], *k.stride()[:3], *v.stride()[:3], s_pb]


def _combine_args(m, l, acc, lengths, out, S, cfg) -> list:
    """Pass 2's runtime arguments in order (shared by the launcher and ``kernel_specs``)."""
    return [m, l, acc, lengths, out, S, cfg["chunk"], cfg["splits"], *out.stride()[:2]]


def _buffers(B: int, Hq: int, D: int, splits: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """Uninitialised pass-1 partials (fp32 m, l ``[B, Hq, splits]``, acc ``[B, Hq, splits, D]``) and the output."""
    f32 = dict(dtype=torch.float32, device=device)
    m, l = torch.empty(B, Hq, splits, **f32), torch.empty(B, Hq, splits, **f32)
    acc = torch.empty(B, Hq, splits, D, **f32)
    return m, l, acc, torch.empty(B, Hq, D, dtype=dtype, device=device)


def _launch_decode(q, k, v, lengths, scale: float, page_table=None) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv, S = k.shape[1], _bound(k, page_table)
    cfg = _config(B, Hkv, max(S, 1), D, q.dtype)
    m, l, acc, out = _buffers(B, Hq, D, cfg["splits"], q.dtype, q.device)
    if B == 0 or Hq == 0:
        return out
    G = Hq // Hkv
    _decode_split_kernel[(cfg["splits"], Hkv, B)](
        *_split_args(q, k, v, lengths, page_table, m, l, acc, scale * _LOG2E, S, cfg),
        HQ=Hq, G=G, D=D, BLOCK_G=_block_g(G), BLOCK_N=cfg["BLOCK_N"], PAGE=0 if page_table is None else k.shape[2],
        DOT_FP32=cfg["DOT_FP32"] or interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _decode_combine_kernel[(Hq, B)](
        *_combine_args(m, l, acc, lengths, out, S, cfg), HQ=Hq, D=D, BLOCK_S=cfg["BLOCK_S"], num_warps=4,
        num_stages=1,
    )
    return out


def _bound(k_cache: torch.Tensor, page_table: torch.Tensor | None) -> int:
    """S, the positions a row can address: the cache's, or the page table's width times the page size."""
    return k_cache.shape[2] * (1 if page_table is None else page_table.shape[1])


# ---------------------------------------------------------------------------------------------- checks
def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernel takes heads of ``head_dim``: a power of two in [16, 256] (all Qwen2/2.5/3 heads)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def _check(q, k_cache, v_cache, lengths, scale, page_table) -> float:
    check_tensor(_FN, "q", q, ndim=3, dtypes=_ACCEPTED)
    check_tensor(_FN, "k_cache", k_cache, ndim=4, dtypes=_ACCEPTED)
    check_tensor(_FN, "v_cache", v_cache, ndim=4, dtypes=_ACCEPTED)
    check_tensor(_FN, "lengths", lengths, ndim=1, dtypes=_LENGTH_DTYPES)
    check_same_device(_FN, q=q, k_cache=k_cache, v_cache=v_cache, lengths=lengths)
    B, Hq, D = q.shape
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"{_FN}: q, k_cache and v_cache must have one dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    Hkv = k_cache.shape[1]
    if page_table is not None:
        check_tensor(_FN, "page_table", page_table, ndim=2, dtypes=_LENGTH_DTYPES)
        check_same_device(_FN, q=q, page_table=page_table)
        if page_table.shape[0] != B:
            raise ValueError(f"{_FN}: page_table must be [B, pages per row] = [{B}, W], "
                             f"got {tuple(page_table.shape)}")
        if k_cache.shape[3] != D or Hkv == 0 or Hq % Hkv:
            raise ValueError(f"{_FN}: a paged k_cache must be [pages, Hkv, page_size, D] = [N, Hkv, P, {D}] "
                             f"with Hkv dividing Hq={Hq}, got {tuple(k_cache.shape)}")
    elif k_cache.shape[0] != B or k_cache.shape[3] != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(
            f"{_FN}: k_cache must be [B, Hkv, S, D] = [{B}, Hkv, S, {D}] with Hkv dividing Hq={Hq}, "
            f"got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{_FN}: v_cache must have k_cache's shape {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    if lengths.shape[0] != B:
        raise ValueError(f"{_FN}: lengths must be [B] = [{B}], got {tuple(lengths.shape)}")
    if not supports_head_dim(D):
        raise ValueError(f"{_FN}: head_dim (last dim of q) must be a power of two in [16, 256], got {D}")
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{_FN}: scale must be None or a finite number > 0, got {scale!r}")
    return float(scale)


# --------------------------------------------------------------------------------------------- public
def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, scale: float | None = None,
    page_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per row over its first ``lengths[b]`` cached keys/values.

    ``q`` ``[B, Hq, D]``: the one new token of each row after rotary. ``k_cache`` / ``v_cache`` ``[B, Hkv, S, D]``
    (``Hkv`` divides ``Hq``), e.g. ``cache[layer, :rows, :, :bound]`` of the decoder's ``[layers, rows, kv_heads,
    seq, head_dim]`` cache: any strides, read in place when the last one is 1; ``S`` is a host-side upper bound
    of the used lengths (the decoder's length bucket): it sets the grid, never the work done. ``lengths``
    ``[B]`` int32/int64 on the same device (clamped to ``[0, S]``, never read by the host), ``scale`` default
    ``D ** -0.5``. Returns ``[B, Hq, D]`` in q's dtype; rows with no keys give zeros. On CUDA (or under
    ``TRITON_INTERPRET=1``) two Triton launches split over the sequence, CUDA-graph capturable; float64 runs
    ``decode_attention_reference``.

    Paged cache: with ``page_table`` ``[B, W]`` (int32/int64), ``k_cache`` / ``v_cache`` are pages ``[pages, Hkv,
    page_size, D]`` and position ``t`` of row ``b`` is slot ``t % page_size`` of page ``page_table[b, t //
    page_size]`` (``S = W * page_size``). Only the pages holding a row's first ``lengths[b]`` positions are read
    (page offsets are 64-bit); the table may be a view of a larger one, updated in place between graph replays.
    """
    scale = _check(q, k_cache, v_cache, lengths, scale, page_table)
    if q.dtype == torch.float64 or not use_triton(q):
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale, page_table)
    q, k_cache, v_cache, lengths = map(unit_last, (q, k_cache, v_cache, lengths))
    with on_device(q):
        return _launch_decode(q, k_cache, v_cache, lengths, scale, page_table)


# ------------------------------------------------------------------------------------------- reference
def _gather_pages(cache: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """Pages ``[pages, Hkv, P, D]`` read through ``page_table`` ``[B, W]``: a dense ``[B, Hkv, W * P, D]`` copy."""
    pages = cache[page_table.long()]  # [B, W, Hkv, P, D]
    B, W, Hkv, P, D = pages.shape
    return pages.transpose(1, 2).reshape(B, Hkv, W * P, D)


def decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, scale: float | None = None,
    page_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch decode attention (same arguments and result as ``decode_attention``), computed in fp32
    (fp64 for fp64 inputs) with an explicit softmax over the masked scores; rows with no keys give zeros. A
    paged cache is gathered into a dense one first."""
    if page_table is not None:
        k_cache, v_cache = _gather_pages(k_cache, page_table), _gather_pages(v_cache, page_table)
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(compute).reshape(B, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bjgd,bjsd->bjgs", qg, k_cache.to(compute)) * scale
    n = lengths.to(q.device).clamp(0, S)
    hidden = torch.arange(S, device=q.device)[None, :] >= n[:, None]  # [B, S]
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no keys: all -inf -> NaN -> 0
    out = torch.einsum("bjgs,bjsd->bjgd", probs, v_cache.to(compute))
    return out.reshape(B, Hq, D).to(q.dtype)


# ------------------------------------------------------------------------------------------ inspection
def kernel_specs(shape: dict) -> list[KernelSpec]:
    """Pass 1 and pass 2 at ``shape`` (a ``QWEN25_SHAPES`` entry plus ``tokens``, ``dtype``, optional ``batch``).

    ``tokens`` is the bound ``S`` of the used length (the inspected context), ``batch`` the rows (default
    1), ``dtype`` a torch dtype or its name. The cache is a ``[layers, batch, kv_heads, tokens, head_dim]``
    slice as the decoder passes it, lengths int64; arguments come from the launcher's own ``_split_args`` /
    ``_combine_args`` on meta tensors, config from ``_config``.
    """
    dtype = spec_dtype(shape)
    B, Hq, Hkv, D, S = shape.get("batch", 1), shape["heads"], shape["kv_heads"], shape["head_dim"], shape["tokens"]
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(B, 1, Hq, D, **meta).transpose(1, 2)[:, :, 0]  # the decoder's [n, H, 1, D] after rotary
    k = torch.empty(2, B, Hkv, S, D, **meta)[0]
    lengths = torch.empty(B, dtype=torch.int64, device="meta")
    cfg = _config(B, Hkv, S, D, dtype)
    m, l, acc, out = _buffers(B, Hq, D, cfg["splits"], dtype, "meta")
    G = Hq // Hkv
    split_const = dict(HQ=Hq, G=G, D=D, BLOCK_G=_block_g(G), BLOCK_N=cfg["BLOCK_N"], DOT_FP32=cfg["DOT_FP32"],
                       PAGE=0)
    combine_const = dict(HQ=Hq, D=D, BLOCK_S=cfg["BLOCK_S"])
    split_args = _split_args(q, k, k, lengths, None, m, l, acc, D**-0.5 * _LOG2E, S, cfg)
    specs = []
    for name, fn, args, constexprs, warps, stages in (
        ("decode_attn_split", _decode_split_kernel, split_args, split_const, cfg["num_warps"], cfg["num_stages"]),
        ("decode_attn_combine", _decode_combine_kernel, _combine_args(m, l, acc, lengths, out, S, cfg),
         combine_const, 4, 1),
    ):
        config = " ".join([f"S={S} splits={cfg['splits']} chunk={cfg['chunk']}",
                           *(f"{k}={v}" for k, v in constexprs.items()), f"warps={warps} stages={stages}"])
        specs.append(launch_spec(name, fn, args, constexprs, warps, stages, config))
    return specs
