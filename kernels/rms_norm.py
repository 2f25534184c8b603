r"""RMSNorm with Qwen2RMSNorm's numerics: fused Triton forward and backward, plus the PyTorch reference.

Per row ``x`` of ``N`` elements (the norm runs over the last dim; leading dims are rows), ``g = dL/dout``::

    r   = 1 / sqrt(mean_j(x_j^2) + eps)       fp32 (x upcast first); saved for backward
    y   = x * r,   yc = cast(y, x.dtype)      the normalised value rounded to the input dtype, as Qwen2 does
    out = w * yc                              in torch's promoted dtype of (w.dtype, x.dtype)
    dL/dw_j = sum over rows of g_j * yc_j,    h_j = g_j * w_j
    dL/dx_j = r * (h_j - y_j * mean_k(h_k * y_k))

The last line: ``dy_k/dx_j = r * (delta_kj - y_k * y_j / N)``, summed against ``h_k`` (the cast's derivative
is taken as identity, as autograd does). Plan: a forward kernel over row tiles; one persistent backward launch whose
row programs write ``dx`` and per-program fp32 ``dw`` partials, and whose reducer programs sum the partials and cast.
All memory-bound, computed in fp32 from the loaded values, rounded only where Qwen2RMSNorm rounds and on store;
64-bit row offsets, no host syncs, block sizes from ``_config`` (no autotuning).

``add_rms_norm`` (inference, no backward) is the forward with the residual add of a decoder layer folded in
(vLLM's ``fused_add_rms_norm``): ``s = cast(x + residual, x.dtype)`` is written as the new residual stream and
normalised as above, one launch instead of two. It is the same forward kernel (``RESIDUAL``, a constexpr), so
both share one config and one set of numerics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import nn

from s1fast.kernels._common import (
    FLOAT_DTYPES,
    KernelSpec,
    as_rows,
    check_same_device,
    check_tensor,
    launch_spec,
    on_device,
    persistent_programs,
    spec_dtype,
    use_triton,
)

_FN = "rms_norm"
_ADD_FN = "add_rms_norm"

MAX_WIDTH = 65536
"""Widest row the Triton kernels take: a row is one register tile. Up to 8192 (every Qwen hidden size and
head_dim) the sm_90 builds use no local memory; wider rows spill in the backward (correct, slower)."""

# Elements per program tile (see ``_config`` for the warps over it).
_TILE = 4096
# Rows per tile for narrow rows (q/k norm over head_dim 64/128 still fills a tile); capped because a 64 x 64
# fp32 tile makes sm_90 ptxas spill in the backward.
_MAX_ROWS = 32
# Resident backward programs per SM: at 8 warps the sm_90 builds use 100-128 registers, so two is what the
# register file holds. Each adds one fp32 dw row to reduce.
_BWD_PROGRAMS_PER_SM = 2
# Interpreter (tests): few programs, so the grid-stride loop runs several tiles.
_CPU_BWD_PROGRAMS = 4
# dW reduction tile: 512 partial rows x 16 columns, 32 fp32 per thread at 8 warps: one load round trip reads a
# reducer's whole share at 264 partials (an H100's row programs). A share is 12 (1.5B) or 28 (7B) columns.
_REDUCE_PARTIALS, _REDUCE_COLS = 512, 16
# Backward row programs per reducer: one reducer per SM on a GPU, so the partials (1.6-3.8 MB, just written, in
# L2) are read by the whole machine; at most half the row programs, fewer than the resident slots (deadlock-free).
_ROW_PROGRAMS_PER_REDUCER = 2


def _config(width: int) -> tuple[int, int, int, int]:
    """(BLOCK, ROWS, forward warps, backward warps) for rows of ``width`` elements: one row = one power-of-two
    BLOCK, so each row is one contiguous vectorised (128-bit) access; shared by the launchers and ``kernel_specs``.

    Forward: 8 elements per thread (one 128-bit bf16 access); at 16 warps the sm_90 builds use <= 32 registers,
    so 4 programs fill an SM's 2,048 threads and 4K-32K tokens make 3.9-31 waves of 528 programs (was 8 warps:
    35 registers, 6 per SM, 2.6 waves at 4K with the last 41% empty). Backward: 16 elements per thread; its
    double-buffered tiles at 16 warps take 86 registers (one program per SM), at 8 warps 100-124 (two)."""
    block = triton.next_power_of_2(width)
    rows = min(_MAX_ROWS, max(1, _TILE // block))
    return block, rows, min(16, max(1, rows * block // 256)), min(16, max(1, rows * block // 512))


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, rstd_ptr,
    stride_x, stride_res, stride_out, stride_sum, n_rows, n_cols, eps,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, RESIDUAL: tl.constexpr,
):
    """One program per tile of ROWS rows x BLOCK (>= N) columns: writes ``out`` and the fp32 ``rstd`` per row.
    With ``RESIDUAL`` the row normalised is ``x + residual`` rounded to x's dtype, also written to ``sum``."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if RESIDUAL:
        res = tl.load(res_ptr + rows64[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows64[:, None] * stride_sum + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    y_cast = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    out = w[None, :] * y_cast
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _load_tile(dout_ptr, x_ptr, rstd_ptr, tile, stride_dout, stride_x, n_rows, cols, col_mask, ROWS: tl.constexpr):
    """One tile's rows (as loaded: input dtype), gradient rows and rstd; tiles past the end load nothing."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    g = tl.load(dout_ptr + rows64[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    return x, g, rstd


# The backward walks the row tiles grid-stride with a fixed number of row programs, recomputes ``y`` from ``x``
# and ``rstd``, writes ``dx`` and keeps its share of ``dw`` in fp32 registers. The loads of the next tile are
# issued before the current tile is computed (register double buffering), so each program always has a tile of
# ``x`` and ``dout`` in flight. The dw partials (fp32 [row programs, N]) are summed in the same launch by reducer
# programs with the highest ids (one per two row programs): each waits until every row program has released its
# partial (one counter), then sums its share of the columns in a fixed order (deterministic, no float atomics)
# and casts. Deadlock-free whatever the scheduling: row programs never wait, and reducers are fewer than the
# resident slots, so a slot always frees for a row program still to start (and Triton's interpreter, which runs
# programs in id order, runs every row program first). The last reducer to finish resets the counter pair, so
# the next launch finds zeros without a memset launch. This replaces a separate reduction kernel (a launch gap,
# 2 us in the model: more than the reduction); one "last program sums everything" would leave one SM reading all
# ``programs x N x 4`` bytes at the end; atomically added partials would be non-deterministic.
@triton.jit
def _bwd_rows(
    dout_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, sync_ptr,
    stride_dout, stride_x, stride_dx, n_rows, n_cols, n_row_programs,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """A row program: ``dx`` of its tiles, then its fp32 dw partial row, then one release on the counter."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    x, g, rstd = _load_tile(dout_ptr, x_ptr, rstd_ptr, pid, stride_dout, stride_x, n_rows, cols, col_mask, ROWS)
    for tile in range(pid, tl.cdiv(n_rows, ROWS), n_row_programs):
        x_next, g_next, rstd_next = _load_tile(dout_ptr, x_ptr, rstd_ptr, tile + n_row_programs, stride_dout,
                                               stride_x, n_rows, cols, col_mask, ROWS)
        rows = tile * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        xf = x.to(tl.float32)
        gf = g.to(tl.float32)
        y = xf * rstd[:, None]
        dw += tl.sum(gf * y.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
        dy = gf * w[None, :]
        dot = tl.sum(dy * y, axis=1) / n_cols
        dx = rstd[:, None] * (dy - y * dot[:, None])
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        x, g, rstd = x_next, g_next, rstd_next
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)
    tl.debug_barrier()  # every thread's share of the partial is stored before the release below
    tl.atomic_add(sync_ptr, 1, sem="release")


@triton.jit
def _bwd_reduce(dw_partial_ptr, dw_ptr, sync_ptr, n_cols, n_row_programs, BLOCK_P: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """A reducer: once all ``n_row_programs`` partials are released, dw[c] = sum_p partial[p, c] over its own
    span of columns (an equal share, a multiple of 4: 16-byte aligned), in a fixed order, cast to dw's dtype;
    the last reducer to finish resets the counters."""
    reducer = tl.program_id(0) - n_row_programs
    n_reducers = tl.num_programs(0) - n_row_programs
    released = tl.atomic_add(sync_ptr, 0, sem="acquire")
    while released < n_row_programs:
        released = tl.atomic_add(sync_ptr, 0, sem="acquire")
    tl.debug_barrier()
    span = tl.cdiv(tl.cdiv(n_cols, n_reducers), 4) * 4
    end = tl.minimum(n_cols, (reducer + 1) * span)
    for first in range(reducer * span, end, BLOCK_C):
        cols = first + tl.arange(0, BLOCK_C)
        col_mask = cols < end
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, n_row_programs, BLOCK_P):
            parts = start + tl.arange(0, BLOCK_P)
            mask = (parts < n_row_programs)[:, None] & col_mask[None, :]
            acc += tl.sum(tl.load(dw_partial_ptr + parts.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask,
                                  other=0.0, cache_modifier=".cg"), 0)
        tl.store(dw_ptr + cols, acc.to(dw_ptr.dtype.element_ty), mask=col_mask)
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == n_reducers - 1:  # every reducer is past its wait
        tl.atomic_xchg(sync_ptr, 0)
        tl.atomic_xchg(sync_ptr + 1, 0)


@triton.jit
def _rms_norm_bwd_kernel(
    dout_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, dw_ptr, sync_ptr,
    stride_dout, stride_x, stride_dx, n_rows, n_cols, n_row_programs,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Programs below ``n_row_programs`` are row programs (``_bwd_rows``), the rest reducers (``_bwd_reduce``)."""
    if tl.program_id(0) < n_row_programs:
        _bwd_rows(dout_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, sync_ptr, stride_dout, stride_x,
                  stride_dx, n_rows, n_cols, n_row_programs, BLOCK, ROWS)
    else:
        _bwd_reduce(dw_partial_ptr, dw_ptr, sync_ptr, n_cols, n_row_programs, BLOCK_P, BLOCK_C)


# ------------------------------------------------------------------------------ launch arguments, launchers
def _fwd_args(x2, weight, out, rstd, eps: float, res2=None, sum2=None) -> list:
    """The forward kernel's runtime arguments in order (shared by the launchers and ``kernel_specs``); without a
    residual, ``x2`` and ``out`` stand in for ``res2`` and ``sum2`` (``RESIDUAL=False``: never touched)."""
    res2, sum2 = (x2, out) if res2 is None else (res2, sum2)
    return [x2, res2, weight, out, sum2, rstd, x2.stride(0), res2.stride(0), out.stride(0), sum2.stride(0),
            *x2.shape, eps]


def _bwd_args(dout2, x2, weight, rstd, dx, dw_partial, dw, sync) -> list:
    return [dout2, x2, weight, rstd, dx, dw_partial, dw, sync, dout2.stride(0), x2.stride(0), dx.stride(0),
            *x2.shape, dw_partial.shape[0]]


def _fwd_buffers(x2: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``out`` (promoted dtype, as Qwen2RMSNorm) and fp32 ``rstd``."""
    out = torch.empty(x2.shape, dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    return out, torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device)


def _bwd_programs(x2: torch.Tensor) -> tuple[int, int]:
    """(row programs, reducers) of the backward launch: one reducer per ``_ROW_PROGRAMS_PER_REDUCER`` row
    programs (always fewer than the resident slots)."""
    rows = _config(x2.shape[1])[1]
    programs = persistent_programs(triton.cdiv(x2.shape[0], rows), x2.device, _BWD_PROGRAMS_PER_SM, _CPU_BWD_PROGRAMS)
    return programs, max(1, programs // _ROW_PROGRAMS_PER_REDUCER)


_SYNC: dict[tuple, torch.Tensor] = {}
"""(device, stream) -> the backward's two int32 counters, zero between launches (its last reducer resets them):
allocated once, so no launch zeroes them; one pair per stream, as launches on one stream never overlap."""


def _sync_counters(device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream)
    if key not in _SYNC:
        _SYNC[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return _SYNC[key]


def _launch_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float, res2: torch.Tensor | None = None):
    """(out, rstd, sum): the norm of ``x2``, or with ``res2`` of ``sum = x2 + res2`` (x2's dtype; else None)."""
    out, rstd = _fwd_buffers(x2, weight)
    sum2 = None if res2 is None else torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    if x2.shape[0]:
        block, rows, num_warps, _ = _config(x2.shape[1])
        _rms_norm_fwd_kernel[(triton.cdiv(x2.shape[0], rows),)](
            *_fwd_args(x2, weight, out, rstd, eps, res2, sum2), BLOCK=block, ROWS=rows, RESIDUAL=res2 is not None,
            num_warps=num_warps,
        )
    return out, rstd, sum2


def _launch_bwd(
    dout2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if not n_rows:
        return dx, torch.zeros_like(weight)
    block, rows, _, num_warps = _config(n_cols)
    programs, reducers = _bwd_programs(x2)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
    dw = torch.empty_like(weight)
    _rms_norm_bwd_kernel[(programs + reducers,)](
        *_bwd_args(dout2, x2, weight, rstd, dx, dw_partial, dw, _sync_counters(x2.device)), BLOCK=block, ROWS=rows,
        BLOCK_P=_REDUCE_PARTIALS, BLOCK_C=_REDUCE_COLS, num_warps=num_warps,
    )
    return dx, dw


# -------------------------------------------------------------------------------------------- autograd
class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = as_rows(x, x.shape[-1])
        weight = weight.contiguous()
        out, rstd, _ = _launch_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _launch_bwd(as_rows(dout, x2.shape[1]), x2, weight, rstd)
        return dx.view(ctx.x_shape), dw, None


# ---------------------------------------------------------------------------------------------- checks
def check_eps(fn: str, eps: object) -> None:
    """``eps`` must be a finite real number >= 0 (a negative one can make ``mean(x^2) + eps`` negative: NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")


def _check(x, weight, eps, fn: str = _FN) -> None:
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(fn, "weight", weight, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_same_device(fn, x=x, weight=weight)
    check_eps(fn, eps)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least 1 dim (the normalised one), got a scalar")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{fn}: weight must have shape ({x.shape[-1]},) to match x's last dim, "
            f"got weight {tuple(weight.shape)} for x {tuple(x.shape)}"
        )


def _check_width(x, fn: str) -> None:
    if not 1 <= x.shape[-1] <= MAX_WIDTH:
        raise ValueError(f"{fn}: the Triton kernel takes a last dim from 1 to {MAX_WIDTH}, got {x.shape[-1]}")


def _check_add(x, residual, weight, eps) -> None:
    _check(x, weight, eps, _ADD_FN)
    check_tensor(_ADD_FN, "residual", residual, dtypes=(x.dtype,))
    check_same_device(_ADD_FN, x=x, residual=residual)
    if residual.shape != x.shape:
        raise ValueError(f"{_ADD_FN}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if torch.is_grad_enabled():
        for name, t in (("x", x), ("residual", residual), ("weight", weight)):
            if t.requires_grad:
                raise ValueError(f"{_ADD_FN}: inference only (no backward), but {name} requires grad; call it under "
                                 "torch.no_grad() or torch.inference_mode()")


# --------------------------------------------------------------------------------------------- public
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim, times ``weight`` (shape ``[x.shape[-1]]``); Qwen2RMSNorm numerics.

    Triton kernels on CUDA (and under ``TRITON_INTERPRET=1``); float64 inputs and other CPU tensors take
    ``rms_norm_reference``. Differentiable in ``x`` and ``weight``. ``eps``: a finite number >= 0.
    """
    _check(x, weight, eps)
    if torch.float64 in (x.dtype, weight.dtype) or not use_triton(x):
        return rms_norm_reference(x, weight, eps)
    _check_width(x, _FN)
    with on_device(x):
        return _RMSNormFunction.apply(x, weight, float(eps))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s, weight, eps), s)`` with ``s = x + residual`` rounded to x's dtype, in one launch.

    vLLM's ``fused_add_rms_norm``: ``s`` is the new residual stream, exactly ``residual + x`` in PyTorch, and the
    norm is Qwen2RMSNorm's of it. ``residual``: x's shape and dtype. Inference only: no backward, and an input
    that requires grad while grad mode is on is refused (run under ``torch.no_grad()``). Outputs are new tensors.
    Dispatch as ``rms_norm``: float64 and plain CPU tensors take ``add_rms_norm_reference``.
    """
    _check_add(x, residual, weight, eps)
    if torch.float64 in (x.dtype, weight.dtype) or not use_triton(x):
        return add_rms_norm_reference(x, residual, weight, eps)
    _check_width(x, _ADD_FN)
    width = x.shape[-1]
    with on_device(x):
        out, _, summed = _launch_fwd(as_rows(x, width), weight.contiguous(), float(eps), as_rows(residual, width))
    return out.view(x.shape), summed.view(x.shape)


class RMSNorm(nn.Module):
    """Drop-in for ``Qwen2RMSNorm`` (same ``weight`` / ``variance_epsilon`` attributes) on the fused kernels."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        check_eps("RMSNorm", eps)
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


# ------------------------------------------------------------------------------------------- reference
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Qwen2RMSNorm in plain PyTorch: fp32 statistics, normalised value cast back to x's dtype, times weight."""
    xf = x.to(torch.float32) if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` in x's dtype, then Qwen2RMSNorm of it: (normalised, sum), as a Qwen2 decoder layer does."""
    summed = residual + x
    return rms_norm_reference(summed, weight, eps), summed


# ------------------------------------------------------------------------------------------ inspection
def kernel_specs(shape: dict) -> list[KernelSpec]:
    """The forward (plain and with the residual add of ``add_rms_norm``) and backward kernels as the launchers
    run them on ``[shape["tokens"], shape["hidden"]]`` activations of ``shape["dtype"]`` with a weight of the same
    dtype; arguments from the launchers' own ``_*_args`` on meta tensors."""
    dtype = spec_dtype(shape)
    x2 = torch.empty(shape["tokens"], shape["hidden"], dtype=dtype, device="meta")
    weight = torch.empty(shape["hidden"], dtype=dtype, device="meta")
    out, rstd = _fwd_buffers(x2, weight)
    dw_partial = torch.empty(_bwd_programs(x2)[0], shape["hidden"], dtype=torch.float32, device="meta")
    sync = torch.empty(2, dtype=torch.int32, device="meta")
    block, rows, fwd_warps, bwd_warps = _config(shape["hidden"])
    constexprs = {"BLOCK": block, "ROWS": rows}
    config = f"BLOCK={block} ROWS={rows} warps={fwd_warps}"
    reduce = {"BLOCK_P": _REDUCE_PARTIALS, "BLOCK_C": _REDUCE_COLS}
    bwd_config = f"BLOCK={block} ROWS={rows} BLOCK_P={_REDUCE_PARTIALS} BLOCK_C={_REDUCE_COLS} warps={bwd_warps}"
    return [
        launch_spec("rms_norm_fwd", _rms_norm_fwd_kernel, _fwd_args(x2, weight, out, rstd, 1e-6),
                    {**constexprs, "RESIDUAL": False}, fwd_warps, config=config),
        launch_spec("rms_norm_add_fwd", _rms_norm_fwd_kernel, _fwd_args(x2, weight, out, rstd, 1e-6, x2, x2),
                    {**constexprs, "RESIDUAL": True}, fwd_warps, config=config),
        launch_spec("rms_norm_bwd", _rms_norm_bwd_kernel,
                    _bwd_args(out, x2, weight, rstd, x2, dw_partial, weight, sync), {**constexprs, **reduce},
                    bwd_warps, config=bwd_config),
    ]
