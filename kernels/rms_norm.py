r"""RMSNorm with Qwen2RMSNorm's numerics: fused Triton forward and backward, plus the PyTorch reference.

Forward, per row :math:`x \in \mathbb{R}^N` (the norm runs over the last dim; leading dims are rows)::

    r   = 1 / sqrt(mean_j(x_j^2) + eps)          fp32 statistics (x upcast first), r saved for backward
    y   = x * r                                   fp32
    yc  = cast(y, x.dtype)                        the normalised value cast back to the input dtype
    out = w * yc                                  in torch's promoted dtype of (w.dtype, x.dtype)

exactly as ``Qwen2RMSNorm`` computes it (so fp32 weights with bf16 activations give an fp32 output, as in
transformers).

Backward, with ``g = dL/dout`` and the cast's derivative taken as identity (as autograd does)::

    dL/dw_j = sum over rows of g_j * yc_j
    h_j     = g_j * w_j                                  the gradient reaching y
    dL/dx_j = r * (h_j - y_j * mean_k(h_k * y_k))

The last line: ``dy_k/dx_j = r * delta_kj - x_k * r^3 * x_j / N = r * (delta_kj - y_k * y_j / N)``, so
``dL/dx_j = sum_k h_k * dy_k/dx_j = r * h_j - r * y_j * (sum_k h_k * y_k) / N``.

Kernels (memory-bound; computed in fp32 from the loaded values, rounded only where Qwen2RMSNorm rounds
and on store):

- forward: one program per tile of ``ROWS`` rows x ``BLOCK`` (>= N, power of two) columns, so each row is
  one contiguous vectorised (128-bit) access and narrow rows (q/k norm over head_dim 64/128) still give
  every program a full tile. Writes ``out`` and the fp32 ``rstd`` per row.
- backward: a fixed number of programs (two per SM: at 8 warps the sm_90 builds use 100-128 registers, so
  two is what the register file holds) walks the row tiles grid-stride, recomputes ``y`` from ``x`` and
  ``rstd``, writes ``dx`` and keeps its share of ``dw`` in fp32 registers. The loads of the next tile are
  issued before the current tile is computed (register double buffering), so each program always has a
  tile of ``x`` and ``dout`` in flight: 2 x 16 KiB per SM for bf16, where loads at the top of each
  iteration left the SM idle on memory while it reduced. The per-program ``dw`` partials (fp32
  ``[programs, N]``) are summed and cast to the weight's dtype by one small kernel (was ``sum(0)`` plus a
  cast: two launches): deterministic, no atomics, spread over ``N / 64`` programs. A single-launch variant
  (the last program to finish, found with an atomic ticket, sums the partials) would save the launch but
  leave one SM reading all ``programs x N x 4`` bytes (1.6 MB at N = 1536) at the end, longer than the
  launch it saves; atomically added partials would be non-deterministic.

A row is one register tile, so widths run up to ``MAX_WIDTH``; up to 8192 (every Qwen hidden size and
head_dim) the sm_90 builds use no local memory, wider rows spill in the backward (correct, slower).
Row offsets are 64-bit (``rows x N`` can pass 2**31), there are no host syncs, and block sizes come from
``_config`` (no autotuning), which the launchers and ``kernel_specs`` share.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import nn

from s1fast.kernels._common import FLOAT_DTYPES, TRITON_DTYPES, KernelSpec, as_rows
from s1fast.kernels._common import check_same_device, check_tensor, on_device, persistent_programs, spec_dtype, use_triton

MAX_WIDTH = 65536
"""Widest row the Triton kernels take (a row is one register tile)."""

_TILE = 4096  # elements per program tile: ~16 per thread at the chosen warps, i.e. 2 x 128-bit loads in bf16
_MAX_ROWS = 32  # rows per tile for narrow rows (a 64 x 64 fp32 tile makes sm_90 ptxas spill in the backward)
_BWD_PROGRAMS_PER_SM = 2  # resident backward programs per SM; each adds one fp32 dw row to reduce
_CPU_BWD_PROGRAMS = 4  # interpreter (tests): few programs, so the grid-stride loop runs several tiles
_REDUCE_PARTIALS, _REDUCE_COLS = 64, 64  # dW reduction tile: 64 partial rows x 64 columns (256 B per row segment)

def _config(width: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for rows of ``width`` elements: one row = one power-of-two BLOCK."""
    block = triton.next_power_of_2(width)
    rows = min(_MAX_ROWS, max(1, _TILE // block))
    num_warps = min(16, max(1, rows * block // 512))
    return block, rows, num_warps


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, OUT, RSTD,
    stride_x, stride_out, n_rows, n_cols, eps,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    y_cast = y.to(X.dtype.element_ty).to(tl.float32)
    out = w[None, :] * y_cast
    tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _load_tile(DOUT, X, RSTD, tile, stride_dout, stride_x, n_rows, cols, col_mask, ROWS: tl.constexpr):
    """One tile's rows (as loaded: input dtype), gradient rows and rstd; tiles past the end load nothing."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    g = tl.load(DOUT + rows64[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    return x, g, rstd


@triton.jit
def _rms_norm_bwd_kernel(
    DOUT, X, W, RSTD, DX, DW_PARTIAL,
    stride_dout, stride_x, stride_dx, n_rows, n_cols,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """Grid-stride over row tiles with the next tile's loads issued before the current tile is computed
    (register double buffering: two tiles' loads in flight per program, no barrier between them)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    x, g, rstd = _load_tile(DOUT, X, RSTD, pid, stride_dout, stride_x, n_rows, cols, col_mask, ROWS)
    for tile in range(pid, tl.cdiv(n_rows, ROWS), step):
        x_next, g_next, rstd_next = _load_tile(DOUT, X, RSTD, tile + step, stride_dout, stride_x, n_rows, cols,
                                               col_mask, ROWS)
        rows = tile * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        xf = x.to(tl.float32)
        gf = g.to(tl.float32)
        y = xf * rstd[:, None]
        dw += tl.sum(gf * y.to(X.dtype.element_ty).to(tl.float32), axis=0)
        dy = gf * w[None, :]
        dot = tl.sum(dy * y, axis=1) / n_cols
        dx = rstd[:, None] * (dy - y * dot[:, None])
        tl.store(DX + rows.to(tl.int64)[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        x, g, rstd = x_next, g_next, rstd_next
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


@triton.jit
def _dw_reduce_kernel(PARTIAL, DW, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """DW[c] = sum_p PARTIAL[p, c], cast to DW's dtype: the partial sum and the cast in one launch, in a
    fixed order (deterministic, no atomics). One program per BLOCK_C columns."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts < n_partials)[:, None] & col_mask[None, :]
        acc += tl.sum(tl.load(PARTIAL + parts.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0), 0)
    tl.store(DW + cols, acc.to(DW.dtype.element_ty), mask=col_mask)


def _forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows:
        block, rows, num_warps = _config(n_cols)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            x2, weight, out, rstd,
            x2.stride(0), out.stride(0), n_rows, n_cols, eps,
            BLOCK=block, ROWS=rows, num_warps=num_warps,
        )
    return out, rstd


def _backward(
    dout2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if not n_rows:
        return dx, torch.zeros_like(weight)
    block, rows, num_warps = _config(n_cols)
    programs = persistent_programs(triton.cdiv(n_rows, rows), x2.device, _BWD_PROGRAMS_PER_SM, _CPU_BWD_PROGRAMS)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
    _rms_norm_bwd_kernel[(programs,)](
        dout2, x2, weight, rstd, dx, dw_partial,
        dout2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
        BLOCK=block, ROWS=rows, num_warps=num_warps,
    )
    dw = torch.empty_like(weight)
    _dw_reduce_kernel[(triton.cdiv(n_cols, _REDUCE_COLS),)](
        dw_partial, dw, programs, n_cols, BLOCK_P=_REDUCE_PARTIALS, BLOCK_C=_REDUCE_COLS, num_warps=4,
    )
    return dx, dw


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = as_rows(x, x.shape[-1])
        weight = weight.contiguous()
        out, rstd = _forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(as_rows(dout, x2.shape[1]), x2, weight, rstd)
        return dx.view(ctx.x_shape), dw, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Qwen2RMSNorm in plain PyTorch: fp32 statistics, normalised value cast back to x's dtype, times weight."""
    xf = x.to(torch.float32) if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def check_eps(fn: str, eps: object) -> None:
    """``eps`` must be a finite real number >= 0 (a negative one can make ``mean(x^2) + eps`` negative: NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim, times ``weight`` (shape ``[x.shape[-1]]``); Qwen2RMSNorm numerics.

    Triton kernels on CUDA (and under ``TRITON_INTERPRET=1``); float64 inputs and other CPU tensors take
    ``rms_norm_reference``. Differentiable in ``x`` and ``weight``. ``eps``: a finite number >= 0.
    """
    fn = "rms_norm"
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
    if torch.float64 in (x.dtype, weight.dtype) or not use_triton(x):
        return rms_norm_reference(x, weight, eps)
    if not 1 <= x.shape[-1] <= MAX_WIDTH:
        raise ValueError(f"{fn}: the Triton kernel takes a last dim from 1 to {MAX_WIDTH}, got {x.shape[-1]}")
    with on_device(x):
        return _RMSNormFunction.apply(x, weight, float(eps))


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


def kernel_specs(shape: dict) -> list[KernelSpec]:
    """The forward and backward kernels as the launchers run them on ``[shape["tokens"], shape["hidden"]]``
    activations of ``shape["dtype"]`` with a weight of the same dtype."""
    width, t = shape["hidden"], TRITON_DTYPES[spec_dtype(shape)]
    block, rows, num_warps = _config(width)
    constexprs = {"BLOCK": block, "ROWS": rows}
    config = f"BLOCK={block} ROWS={rows} warps={num_warps}"
    fwd = {"X": f"*{t}", "W": f"*{t}", "OUT": f"*{t}", "RSTD": "*fp32",
           "stride_x": "i32", "stride_out": "i32", "n_rows": "i32", "n_cols": "i32", "eps": "fp32"}
    bwd = {"DOUT": f"*{t}", "X": f"*{t}", "W": f"*{t}", "RSTD": "*fp32", "DX": f"*{t}", "DW_PARTIAL": "*fp32",
           "stride_dout": "i32", "stride_x": "i32", "stride_dx": "i32", "n_rows": "i32", "n_cols": "i32"}
    reduce = {"PARTIAL": "*fp32", "DW": f"*{t}", "n_partials": "i32", "n_cols": "i32"}
    return [
        KernelSpec("rms_norm_fwd", _rms_norm_fwd_kernel, fwd, dict(constexprs), num_warps, config=config),
        KernelSpec("rms_norm_bwd", _rms_norm_bwd_kernel, bwd, dict(constexprs), num_warps, config=config),
        KernelSpec("rms_norm_bwd_dw", _dw_reduce_kernel, reduce, {"BLOCK_P": _REDUCE_PARTIALS, "BLOCK_C": _REDUCE_COLS},
                   4, config=f"BLOCK_P={_REDUCE_PARTIALS} BLOCK_C={_REDUCE_COLS} warps=4"),
    ]
