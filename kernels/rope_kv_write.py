r"""RoPE of q and k fused with the write of k and v into the paged KV cache: one launch per decoder layer.

The input is the fused q/k/v projection (biases included), ``qkv [rows, T, (Hq + 2 Hkv) * D]``: for each token
the ``Hq`` query heads, then the ``Hkv`` key heads, then the ``Hkv`` value heads, ``D`` elements each. Token
``(r, t)`` sits at position ``p = positions[r, t]``; ``c = cos[p]``, ``s = sin[p]`` are rows of the rotary
tables ``[P, D]`` (Qwen2RotaryEmbedding's output at positions ``0..P-1``). With ``PAGE`` positions per page::

    q_h -> q_out[r, t, h]                   = rope(norm_q(q_h))
    k_j -> k_cache[layer, page, j, slot]    = rope(norm_k(k_j))
    v_j -> v_cache[layer, page, j, slot]    = v_j
    page = table[r, p // PAGE]   (the trash page 0 when p // PAGE is past the table's width),   slot = p % PAGE

``rope`` is ``s1fast.kernels.rope``'s rotate_half rotation (``y1 = c1 x1 - s1 x2``, ``y2 = c2 x2 + s2 x1``),
computed in fp32 and rounded to the activation dtype once. ``norm`` (Qwen3's ``q_norm`` / ``k_norm``, optional)
is ``rms_norm`` over each head's ``D`` elements with its rounding: the normalised value is cast to the
activation dtype, times the weight, and the product is cast again (what ``rms_norm`` returns and ``apply_rope``
then reads). So the result equals ``rms_norm`` (Qwen3) then ``apply_rope`` then ``KVCache.write``: three to five
launches become one. Inference only: no backward.

Plan: one program per token; it reads its position, its page-table entry and its cos/sin row once, then walks
its heads (q, k and v heads as one index, tiled ``[BLOCK_H, D/2]`` per half as ``apply_rope`` does) and stores
each head where it belongs. Offsets are 64-bit (a cache layer easily exceeds 2^31 elements); the rows of ``qkv``,
``positions`` and ``table`` may be strided; every last dim is unit-stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from s1fast.kernels._common import (
    FLOAT_DTYPES,
    KernelSpec,
    check_same_device,
    check_tensor,
    launch_spec,
    on_device,
    spec_dtype,
    unit_last,
    use_triton,
)
from s1fast.kernels.rms_norm import check_eps, rms_norm_reference
from s1fast.kernels.rope import _config as _rope_config
from s1fast.kernels.rope import apply_rope_reference

_FN = "rope_kv_write"
_ACCEPTED = FLOAT_DTYPES + (torch.float64,)
_INDEX_DTYPES = (torch.int32, torch.int64)
_TRASH = 0  # the page of unfilled table entries (``s1fast.decode.kv_cache``; kernels do not import decode)


def _config(heads: int, head_dim: int) -> tuple[dict, int]:
    """Constexprs and num_warps for ``heads = Hq + 2 Hkv`` heads: ``apply_rope``'s tiling (one program per
    token, ``[BLOCK_H, D/2]`` half-tiles of about 8 elements per thread)."""
    return _rope_config(heads, head_dim)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["T", "width"])
def _rope_kv_write_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, table_ptr, qn_ptr, kn_ptr, q_out_ptr, k_ptr, v_ptr,
    T, width, eps,
    s_xr, s_xt, s_pr, s_pt, s_tr, s_cos, s_sin, s_or, s_ot, s_oh,
    s_kp, s_kh, s_ks, s_vp, s_vh, s_vs,
    HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr,
):
    pid = tl.program_id(0)
    r = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    pos = tl.load(pos_ptr + r * s_pr + t * s_pt).to(tl.int64)
    index = pos // PAGE
    page = tl.load(table_ptr + r * s_tr + tl.minimum(index, width - 1)).to(tl.int64)
    page = tl.where(index < width, page, 0)
    slot = pos % PAGE

    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    c1 = tl.load(cos_ptr + pos * s_cos + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * s_cos + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * s_sin + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * s_sin + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    if NORM:
        wq1 = tl.load(qn_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        wq2 = tl.load(qn_ptr + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        wk1 = tl.load(kn_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        wk2 = tl.load(kn_ptr + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]

    dtype = q_out_ptr.dtype.element_ty
    x_row = qkv_ptr + r * s_xr + t * s_xt
    q_row = q_out_ptr + r * s_or + t * s_ot
    k_slot = k_ptr + page * s_kp + slot * s_ks
    v_slot = v_ptr + page * s_vp + slot * s_vs
    for h0 in range(0, HQ + 2 * HK, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        is_q = (h < HQ)[:, None]
        is_v = (h >= HQ + HK)[:, None]
        h64 = h.to(tl.int64)[:, None]
        mask = (h < HQ + 2 * HK)[:, None] & d_ok[None, :]
        src = x_row + h64 * (2 * HALF) + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        if NORM:  # per-head RMSNorm of q and k with rms_norm's two roundings; v passes through
            rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
            n1 = tl.where(is_q, wq1, wk1) * (x1 * rstd).to(dtype).to(tl.float32)
            n2 = tl.where(is_q, wq2, wk2) * (x2 * rstd).to(dtype).to(tl.float32)
            x1 = tl.where(is_v, x1, n1.to(dtype).to(tl.float32))
            x2 = tl.where(is_v, x2, n2.to(dtype).to(tl.float32))
        y1 = tl.where(is_v, x1, x1 * c1 - x2 * s1).to(dtype)
        y2 = tl.where(is_v, x2, x2 * c2 + x1 * s2).to(dtype)
        # one store per destination (not one through a pointer chosen per row): each stays a contiguous vector
        q_dst = q_row + h64 * s_oh + d[None, :]
        k_dst = k_slot + (h64 - HQ) * s_kh + d[None, :]
        v_dst = v_slot + (h64 - HQ - HK) * s_vh + d[None, :]
        is_k = ~(is_q | is_v)
        tl.store(q_dst, y1, mask=mask & is_q)
        tl.store(q_dst + HALF, y2, mask=mask & is_q)
        tl.store(k_dst, y1, mask=mask & is_k)
        tl.store(k_dst + HALF, y2, mask=mask & is_k)
        tl.store(v_dst, y1, mask=mask & is_v)
        tl.store(v_dst + HALF, y2, mask=mask & is_v)


# ------------------------------------------------------------------------------ launch arguments, launchers
def _kv_args(qkv, cos, sin, positions, table, q_norm, k_norm, q_out, k_layer, v_layer, eps: float) -> list:
    """The kernel's runtime arguments in order (shared by the launcher and ``kernel_specs``); ``k_layer`` /
    ``v_layer``: one layer of the caches, ``[pages + 1, Hkv, PAGE, D]``. Without norms, ``cos`` stands in for
    their weights (``NORM=False``: never read)."""
    q_norm, k_norm = (cos, cos) if q_norm is None else (q_norm, k_norm)
    return [
        qkv, cos, sin, positions, table, q_norm, k_norm, q_out, k_layer, v_layer,
        qkv.shape[1], table.shape[1], eps,
        *qkv.stride()[:2], *positions.stride(), table.stride(0), cos.stride(0), sin.stride(0), *q_out.stride()[:3],
        *k_layer.stride()[:3], *v_layer.stride()[:3],
    ]


def _launch(qkv, cos, sin, positions, table, k_layer, v_layer, q_norm, k_norm, eps: float) -> torch.Tensor:
    n, T, _ = qkv.shape
    _, Hkv, page_size, D = k_layer.shape
    Hq = qkv.shape[2] // D - 2 * Hkv
    q_out = torch.empty(n, T, Hq, D, dtype=qkv.dtype, device=qkv.device)
    if n * T:
        constexprs, num_warps = _config(Hq + 2 * Hkv, D)
        _rope_kv_write_kernel[(n * T,)](
            *_kv_args(qkv, cos, sin, positions, table, q_norm, k_norm, q_out, k_layer, v_layer, eps),
            HQ=Hq, HK=Hkv, HALF=D // 2, PAGE=page_size, NORM=q_norm is not None, **constexprs,
            num_warps=num_warps, num_stages=1,
        )
    return q_out


# ---------------------------------------------------------------------------------------------- checks
def _check(qkv, cos, sin, positions, table, k_cache, v_cache, layer, q_norm, k_norm, eps) -> None:
    check_tensor(_FN, "qkv", qkv, ndim=3, dtypes=_ACCEPTED)
    check_tensor(_FN, "cos", cos, ndim=2, dtypes=_ACCEPTED)
    check_tensor(_FN, "sin", sin, ndim=2, dtypes=(cos.dtype,))
    check_tensor(_FN, "positions", positions, ndim=2, dtypes=_INDEX_DTYPES)
    check_tensor(_FN, "table", table, ndim=2, dtypes=_INDEX_DTYPES)
    check_tensor(_FN, "k_cache", k_cache, ndim=5, dtypes=(qkv.dtype,))
    check_tensor(_FN, "v_cache", v_cache, ndim=5, dtypes=(qkv.dtype,))
    check_same_device(_FN, qkv=qkv, cos=cos, sin=sin, positions=positions, table=table, k_cache=k_cache,
                      v_cache=v_cache, q_norm=q_norm, k_norm=k_norm)
    check_eps(_FN, eps)
    n, T, width = qkv.shape
    L, _, Hkv, _, D = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{_FN}: v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if D % 2 or width % D or width // D <= 2 * Hkv:
        raise ValueError(
            f"{_FN}: qkv's last dim must be (heads + 2 * kv_heads) * head_dim with heads >= 1, head_dim even, from "
            f"k_cache [layers, pages + 1, kv_heads={Hkv}, page_size, head_dim={D}]; got qkv {tuple(qkv.shape)}"
        )
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
        raise ValueError(f"{_FN}: layer must be an int in [0, {L}) (k_cache's first dim), got {layer!r}")
    if positions.shape != (n, T):
        raise ValueError(f"{_FN}: positions must be [rows, T] = [{n}, {T}] to match qkv, got {tuple(positions.shape)}")
    if table.shape[0] != n or table.shape[1] < 1:
        raise ValueError(f"{_FN}: table must be [rows, width >= 1] with rows = {n}, got {tuple(table.shape)}")
    if cos.shape[1] != D or sin.shape != cos.shape:
        raise ValueError(f"{_FN}: cos and sin must be [positions, head_dim = {D}], got cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError(f"{_FN}: give both q_norm and k_norm (Qwen3) or neither")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None:
            check_tensor(_FN, name, w, ndim=1, dtypes=(qkv.dtype,))
            if w.shape[0] != D:
                raise ValueError(f"{_FN}: {name} must have shape ({D},) (head_dim), got {tuple(w.shape)}")
    if torch.is_grad_enabled():
        for name, t in (("qkv", qkv), ("cos", cos), ("sin", sin), ("q_norm", q_norm), ("k_norm", k_norm)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{_FN}: inference only (no backward), but {name} requires grad; call it under "
                                 "torch.no_grad() or torch.inference_mode()")


# --------------------------------------------------------------------------------------------- public
def rope_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rotate q and k of the fused projection ``qkv [rows, T, (Hq + 2 Hkv) * D]`` at ``positions [rows, T]``, write
    k and v into layer ``layer`` of the paged caches, return the rotated q ``[rows, T, Hq, D]`` (a new tensor).

    ``cos``, ``sin``: rotary tables ``[P, D]`` indexed by position (every position must be below P);
    ``table``: the page table ``[rows, width]`` (int32/int64) of these rows; ``k_cache``, ``v_cache``:
    ``[layers, pages + 1, Hkv, page_size, D]`` in qkv's dtype (``s1fast.decode.kv_cache``'s layout: position p of
    row r is slot ``p % page_size`` of page ``table[r, p // page_size]``, positions past the table go to the trash
    page 0). ``q_norm``, ``k_norm``: Qwen3's per-head RMSNorm weights ``[D]`` (both or neither), applied before
    the rotation with ``eps``. Nothing else in the caches changes. One Triton launch on CUDA and under
    ``TRITON_INTERPRET=1``; float64 and plain CPU tensors take ``rope_kv_write_reference``. Inference only: an
    input that requires grad while grad mode is on is refused.
    """
    _check(qkv, cos, sin, positions, table, k_cache, v_cache, layer, q_norm, k_norm, eps)
    args = (qkv, cos, sin, positions, table, k_cache, v_cache, layer, q_norm, k_norm, eps)
    if torch.float64 in (qkv.dtype, cos.dtype) or not use_triton(qkv):
        return rope_kv_write_reference(*args)
    if not (k_cache[layer].stride(-1) == v_cache[layer].stride(-1) == 1):
        raise ValueError(f"{_FN}: k_cache and v_cache must have a unit-stride last dim (head_dim)")
    qkv, cos, sin, positions, table = map(unit_last, (qkv, cos, sin, positions, table))
    norms = (None, None) if q_norm is None else (q_norm.contiguous(), k_norm.contiguous())
    with on_device(qkv):
        return _launch(qkv, cos, sin, positions, table, k_cache[layer], v_cache[layer], *norms, float(eps))


# ------------------------------------------------------------------------------------------- reference
def rope_kv_write_reference(qkv, cos, sin, positions, table, k_cache, v_cache, layer, q_norm=None, k_norm=None,
                            eps: float = 1e-6) -> torch.Tensor:
    """The same in plain PyTorch, from the unfused pieces: ``rms_norm_reference`` per head (Qwen3),
    ``apply_rope_reference``, and an indexed write into the pages, as the decoder does without the kernel."""
    n, T, width = qkv.shape
    Hkv, page_size, D = k_cache.shape[2:]
    Hq = width // D - 2 * Hkv
    q, k, v = qkv.view(n, T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=2)
    if q_norm is not None:
        q, k = rms_norm_reference(q, q_norm, eps), rms_norm_reference(k, k_norm, eps)
    pos = positions.long()
    q, k = apply_rope_reference(q.transpose(1, 2), k.transpose(1, 2), cos[pos], sin[pos])
    index = pos // page_size
    page = table.long().gather(1, index.clamp(max=table.shape[1] - 1)).masked_fill(index >= table.shape[1], _TRASH)
    k_cache[layer][page, :, pos % page_size] = k.transpose(1, 2)
    v_cache[layer][page, :, pos % page_size] = v
    return q.transpose(1, 2)


# ------------------------------------------------------------------------------------------ inspection
def kernel_specs(shape: dict) -> list[KernelSpec]:
    """The launch of a decode step at ``shape`` (a ``QWEN25_SHAPES`` entry plus ``dtype``): one token for each of
    ``tokens`` rows, a 16-position page table of 4096 pages, with and without Qwen3's q/k norms; arguments from
    the launcher's own ``_kv_args`` on meta tensors."""
    dtype = spec_dtype(shape)
    hq, hk, d, n = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["tokens"]
    page_size, pages = 16, 4096
    meta = dict(device="meta", dtype=dtype)
    qkv = torch.empty(n, 1, (hq + 2 * hk) * d, **meta)
    cos = torch.empty(32768, d, **meta)
    positions = torch.empty(n, 1, dtype=torch.int64, device="meta")
    table = torch.empty(n, 2048, dtype=torch.int32, device="meta")
    cache = torch.empty(pages + 1, hk, page_size, d, **meta)
    q_out = torch.empty(n, 1, hq, d, **meta)
    norm = torch.empty(d, **meta)
    blocks, num_warps = _config(hq + 2 * hk, d)
    constexprs = {"HQ": hq, "HK": hk, "HALF": d // 2, "PAGE": page_size, **blocks}
    config = f"HQ={hq} HK={hk} BLOCK_H={blocks['BLOCK_H']} BLOCK_HALF={blocks['BLOCK_HALF']} warps={num_warps}"
    return [launch_spec(f"rope_kv_write{'_qk_norm' if w is not None else ''}", _rope_kv_write_kernel,
                        _kv_args(qkv, cos, cos, positions, table, w, w, q_out, cache, cache, 1e-6),
                        {**constexprs, "NORM": w is not None}, num_warps, 1, config)
            for w in (None, norm)]
