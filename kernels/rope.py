r"""Rotary position embeddings (RoPE) for q and k in one Triton launch, forward and backward.

transformers' ``apply_rotary_pos_emb`` (``unsqueeze_dim=1``, the "rotate_half" convention). Split the head
dimension in halves, ``x = [x1, x2]``, ``cos = [c1, c2]``, ``sin = [s1, s2]`` (for Qwen ``c1 == c2`` and
``s1 == s2``; the general case is what ``apply_rotary_pos_emb`` computes, and so do we)::

    forward   y1 = c1 * x1 - s1 * x2,    y2 = c2 * x2 + s2 * x1       (y = x * cos + rotate_half(x) * sin)
    backward  dx1 = c1 * dy1 + s2 * dy2,  dx2 = c2 * dy2 - s1 * dy1

The map is linear, ``y = R x`` with ``R = [[diag(c1), -diag(s1)], [diag(s2), diag(c2)]]``, so the backward is
``dx = R^T dy``: the forward with ``(s1, s2)`` replaced by ``(-s2, -s1)`` (for Qwen's cos/sin, the rotation by the
opposite angle). It needs only cos and sin, so q and k are not saved; cos and sin get no gradient (transformers
computes them under ``no_grad``). Each token's angle comes from its own cos/sin row, so packed sequences
(positions restarting at 0 inside one row) need nothing special. Plan: one kernel, one program per token.
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

_FN = "apply_rope"
_ACCEPTED = FLOAT_DTYPES + (torch.float64,)

# Elements of one half-tile ([BLOCK_H, D/2]) at most: with the warps of ``_config`` each thread holds about 8
# elements per half-tile, one 128-bit load of bf16.
_HALF_TILE = 2048


def _config(heads: int, head_dim: int) -> tuple[dict, int]:
    """Constexprs and num_warps for ``heads = Hq + Hkv`` rows of ``head_dim``; used by launcher and specs.

    The head block is the largest power of two whose half-tile fits ``_HALF_TILE`` and that pads the head
    count by at most 25% (padded rows cost lanes, not memory traffic), e.g. 14 + 2 -> 16, 12 + 2 -> 16 (one
    pass), 28 + 4 -> 32, 40 + 8 -> 3 passes of 16.
    """
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(heads), max(1, _HALF_TILE // block_half))
    while block_h > 1 and triton.cdiv(heads, block_h) * block_h * 4 > heads * 5:
        block_h //= 2
    num_warps = min(8, max(1, block_h * block_half // 256))
    return {"BLOCK_H": block_h, "BLOCK_HALF": block_half}, num_warps


# ----------------------------------------------------------------------------------------------- kernels
# One program per token ``(b, t)`` rotates every head of q and of k for that token. The heads of q and k are one
# index ``h in [0, Hq + Hkv)`` (q rows first, then k rows), tiled ``[BLOCK_H, D/2]`` for each half, so small GQA
# key-head counts share vector-wide tiles with the query heads. cos/sin are read once per token and reused for
# every head; loads are vectorised along D (unit stride); offsets are 64-bit; batch, head and token strides are
# arbitrary, so Qwen's ``view(B, T, H, D).transpose(1, 2)`` layout is read in place. q, k, cos, sin are loaded
# and the rotation computed in fp32; the result is cast to q's dtype. transformers instead multiplies in the
# dtype of ``cos`` (Qwen2RotaryEmbedding casts cos/sin to the activation dtype), rounding each product, so in
# bf16 the two may differ by about one bf16 ulp.
@triton.jit(do_not_specialize=["T"])
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    T,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
    s_qob, s_qoh, s_qot, s_kob, s_koh, s_kot,
    s_cb, s_ct, s_sb, s_st,
    HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF

    cos_row = cos_ptr + b * s_cb + t * s_ct
    sin_row = sin_ptr + b * s_sb + t * s_st
    c1 = tl.load(cos_row + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_row + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_row + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:  # R^T: (s1, s2) -> (-s2, -s1)
        s1, s2 = -s2, -s1

    q_in = q_ptr + b * s_qb + t * s_qt
    k_in = k_ptr + b * s_kb + t * s_kt
    q_out = q_out_ptr + b * s_qob + t * s_qot
    k_out = k_out_ptr + b * s_kob + t * s_kot
    for h0 in range(0, HQ + HK, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        is_q = (h < HQ)[:, None]
        hq = h.to(tl.int64)[:, None]
        hk = (h - HQ).to(tl.int64)[:, None]
        mask = (h < HQ + HK)[:, None] & d_ok[None, :]
        src = tl.where(is_q, q_in + hq * s_qh + d[None, :], k_in + hk * s_kh + d[None, :])
        dst = tl.where(is_q, q_out + hq * s_qoh + d[None, :], k_out + hk * s_koh + d[None, :])
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
        tl.store(dst, y1.to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, y2.to(q_out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ launch arguments, launchers
def _rope_args(q, k, cos, sin, q_out, k_out) -> list:
    """The kernel's runtime arguments in order (shared by the launcher and ``kernel_specs``)."""
    B, _, T, D = q.shape
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)  # batch-1 cos/sin: batch stride 0
    return [
        q, k, cos, sin, q_out, k_out, T,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
        *cos.stride()[:2], *sin.stride()[:2],
    ]


def _launch_rope(q, k, cos, sin, q_out, k_out, *, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Write rot(q) into q_out and rot(k) into k_out (all last dims unit-stride); R^T when ``backward``."""
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    if B * T == 0 or Hq + Hk == 0:
        return q_out, k_out
    constexprs, num_warps = _config(Hq + Hk, D)
    _rope_kernel[(B * T,)](
        *_rope_args(q, k, cos, sin, q_out, k_out),
        HQ=Hq, HK=Hk, HALF=D // 2, BACKWARD=backward, **constexprs, num_warps=num_warps, num_stages=1,
    )
    return q_out, k_out


# Outputs are new tensors (q and k are never written) made with ``torch.empty_like`` of the tensor they are
# computed from (q and k forward, the incoming gradients backward): same shape and, for a dense input
# (contiguous or transposed), the same strides, so the transposed layout stays transposed (PyTorch's rule for
# elementwise ops; the PyTorch path follows PyTorch's own choice). A tensor whose last dimension is not
# unit-stride (e.g. an expanded gradient) is copied first.
def _rotate(a: torch.Tensor, b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    a, b, cos, sin = map(unit_last, (a, b, cos, sin))
    return _launch_rope(a, b, cos, sin, torch.empty_like(a), torch.empty_like(b), backward=backward)


# -------------------------------------------------------------------------------------------- autograd
class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(grad_q, grad_k, cos, sin, backward=True)
        return dq, dk, None, None


# ---------------------------------------------------------------------------------------------- checks
def _check(q, k, cos, sin) -> None:
    check_tensor(_FN, "q", q, ndim=4, dtypes=_ACCEPTED)
    check_tensor(_FN, "k", k, ndim=4, dtypes=_ACCEPTED)
    check_tensor(_FN, "cos", cos, ndim=3, dtypes=_ACCEPTED)
    check_tensor(_FN, "sin", sin, ndim=3, dtypes=_ACCEPTED)
    check_same_device(_FN, q=q, k=k, cos=cos, sin=sin)
    B, _, T, D = q.shape
    if k.dtype != q.dtype:
        raise TypeError(f"{_FN}: q and k must have one dtype, got q {q.dtype} and k {k.dtype}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"{_FN}: cos and sin must have one dtype, got cos {cos.dtype} and sin {sin.dtype}")
    if D % 2:
        raise ValueError(f"{_FN}: head_dim (last dim of q) must be even, got q shape {tuple(q.shape)}")
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(
            f"{_FN}: k must be [B, Hkv, T, D] = [{B}, Hkv, {T}, {D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        raise ValueError(f"{_FN}: cos must be [B or 1, T, D] = [{B} or 1, {T}, {D}], got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"{_FN}: sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(f"{_FN}: cos and sin must not require grad (no gradient is computed for them); detach them")


# --------------------------------------------------------------------------------------------- public
def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[B, Hq, T, D]`` and k ``[B, Hkv, T, D]`` by cos/sin ``[B or 1, T, D]``; returns new (q, k).

    Exactly ``apply_rotary_pos_emb(q, k, cos, sin)`` of transformers, computed in fp32 and returned in q's
    dtype, differentiable in q and k. On CUDA (or under ``TRITON_INTERPRET=1``) one Triton launch does
    both; outputs keep the input's layout (see ``_rotate``). fp64 runs ``apply_rope_reference``.
    """
    _check(q, k, cos, sin)
    if torch.float64 in (q.dtype, cos.dtype) or not use_triton(q):
        return apply_rope_reference(q, k, cos, sin)
    with on_device(q):
        return _RoPEFunction.apply(q, k, cos, sin)


# ------------------------------------------------------------------------------------------- reference
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch RoPE with the kernel's numerics: computed in fp32 (fp64 for fp64 q), cast to q's dtype.

    Same layouts and formula as ``apply_rope``; the CPU path, and with fp64
    inputs the exact reference. Differentiable in every argument by autograd.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    c, s = cos.unsqueeze(1).to(compute), sin.unsqueeze(1).to(compute)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xc = x.to(compute)
        return (xc * c + _rotate_half(xc) * s).to(q.dtype)

    return rotate(q), rotate(k)


# ------------------------------------------------------------------------------------------ inspection
def kernel_specs(shape: dict) -> list[KernelSpec]:
    """The forward and backward launches at ``shape`` (a ``QWEN25_SHAPES`` entry plus ``tokens``, ``dtype``).

    Uses ``heads``, ``kv_heads``, ``head_dim``, ``tokens`` (one packed row, B = 1) and ``dtype`` (a torch
    dtype or its name, e.g. ``torch.bfloat16``, "bfloat16", "bf16"; cos/sin in that dtype, as
    Qwen2RotaryEmbedding returns them). q and k are in Qwen's ``view(B, T, H, D).transpose(1, 2)`` layout;
    arguments come from the launcher's own ``_rope_args`` on meta tensors. At Qwen shapes every pointer
    and every stride is a multiple of 16 bytes / elements (what Triton's JIT marks ``tt.divisibility=16``).
    """
    dtype = spec_dtype(shape)
    hq, hk, d, n = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["tokens"]
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(1, n, hq, d, **meta).transpose(1, 2)
    k = torch.empty(1, n, hk, d, **meta).transpose(1, 2)
    cos = torch.empty(1, n, d, **meta)
    args = _rope_args(q, k, cos, cos, torch.empty_like(q), torch.empty_like(k))
    blocks, num_warps = _config(hq + hk, d)
    constexprs = {"HQ": hq, "HK": hk, "HALF": d // 2, **blocks}
    config = f"HQ={hq} HK={hk} BLOCK_H={blocks['BLOCK_H']} BLOCK_HALF={blocks['BLOCK_HALF']} warps={num_warps}"
    return [launch_spec(f"rope_{'bwd' if backward else 'fwd'}", _rope_kernel, args,
                        {**constexprs, "BACKWARD": backward}, num_warps, 1, config)
            for backward in (False, True)]
