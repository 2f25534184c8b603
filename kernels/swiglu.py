r"""SwiGLU, the gated activation of Qwen2MLP: fused Triton forward and backward, plus the PyTorch reference.

Elementwise over ``gate`` and ``up`` of one shape, ``s = sigmoid(gate)``, ``g = dL/dout``::

    out      = silu(gate) * up = gate * s * up
    dL/dup   = g * silu(gate)  = g * gate * s
    dL/dgate = g * up * silu'(gate) = g * up * s * (1 + gate * (1 - s))      (silu'(x) = s + x * s * (1 - s))

Plan: one memory-bound kernel each way over ``ROWS x BLOCK`` tiles of the ``[rows, width]`` view, computed in
fp32 and rounded once on store. Backward recomputes ``s`` from the saved ``gate``: only ``gate`` and ``up`` are
saved (the activation is never kept), and both gradients go to fresh tensors (nothing autograd may hold is
overwritten). Configuration from ``_config`` (no autotuning), shared by the launchers and ``kernel_specs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from s1fast.kernels._common import (
    FLOAT_DTYPES,
    KernelSpec,
    as_rows,
    check_same_device,
    check_tensor,
    launch_spec,
    on_device,
    spec_dtype,
    use_triton,
)

_FN = "swiglu"

# Columns per tile: a power of two along the row so loads are contiguous 128-bit vectors; wide rows
# (intermediate 4864 - 27648) span several column blocks on grid axis 1.
_MAX_BLOCK = 1024
# Elements per program: 16 per thread at 8 warps, i.e. 2 x 128-bit loads per tensor in bf16.
_TILE = 4096


def _config(width: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for rows of ``width`` elements."""
    block = min(triton.next_power_of_2(width), _MAX_BLOCK)
    rows = _TILE // block
    return block, rows, _TILE // 512


# ----------------------------------------------------------------------------------------------- kernels
# Rows may have any stride (``gate, up = gate_up.chunk(2, -1)`` runs without a copy), row offsets are 64-bit and
# the row tiles sit on grid axis 0 (no 65,535 limit on tokens).
@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, out_ptr,
    stride_gate, stride_up, stride_out, n_rows, n_cols,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    g = tl.load(gate_ptr + rows64 * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows64 * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + rows64 * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
    stride_dout, stride_gate, stride_up, stride_dgate, stride_dup, n_rows, n_cols,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    dout = tl.load(dout_ptr + rows64 * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows64 * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows64 * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dup = dout * g * s
    dgate = dout * u * s * (1.0 + g * (1.0 - s))
    tl.store(dgate_ptr + rows64 * stride_dgate + cols[None, :], dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows64 * stride_dup + cols[None, :], dup.to(dup_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ launch arguments, launchers
def _fwd_args(g2, u2, out) -> list:
    """The forward kernel's runtime arguments in order (shared by the launcher and ``kernel_specs``)."""
    return [g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), *g2.shape]


def _bwd_args(d2, g2, u2, dgate, dup) -> list:
    return [d2, g2, u2, dgate, dup, d2.stride(0), g2.stride(0), u2.stride(0), dgate.stride(0), dup.stride(0),
            *g2.shape]


def _launch_tiles(kernel, args: list, n_rows: int, n_cols: int) -> None:
    """Launch ``kernel`` (forward or backward: one tiling) over ``[n_rows, n_cols]``."""
    if n_rows * n_cols:
        block, rows, num_warps = _config(n_cols)
        grid = (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block))
        kernel[grid](*args, BLOCK=block, ROWS=rows, num_warps=num_warps)


def _launch_fwd(g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    out = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
    _launch_tiles(_swiglu_fwd_kernel, _fwd_args(g2, u2, out), *g2.shape)
    return out


def _launch_bwd(d2: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
    dup = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
    _launch_tiles(_swiglu_bwd_kernel, _bwd_args(d2, g2, u2, dgate, dup), *g2.shape)
    return dgate, dup


# -------------------------------------------------------------------------------------------- autograd
class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        width = gate.shape[-1]
        g2, u2 = as_rows(gate, width), as_rows(up, width)
        out = _launch_fwd(g2, u2)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        dgate, dup = _launch_bwd(as_rows(dout, g2.shape[1]), g2, u2)
        return dgate.view(ctx.shape), dup.view(ctx.shape)


# ---------------------------------------------------------------------------------------------- checks
def _check(gate, up) -> None:
    check_tensor(_FN, "gate", gate, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(_FN, "up", up, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_same_device(_FN, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(
            f"{_FN}: gate and up must have the same shape, got gate {tuple(gate.shape)} and up {tuple(up.shape)}"
        )
    if gate.dtype != up.dtype:
        raise TypeError(f"{_FN}: gate and up must have the same dtype, got gate {gate.dtype} and up {up.dtype}")
    if gate.dim() == 0:
        raise ValueError(f"{_FN}: gate and up must have at least 1 dim, got scalars")


# --------------------------------------------------------------------------------------------- public
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate`` and ``up`` of one shape and dtype; differentiable in both.

    Triton kernels on CUDA (and under ``TRITON_INTERPRET=1``); float64 inputs and other CPU tensors take
    ``swiglu_reference``. Output has the inputs' shape and dtype.
    """
    _check(gate, up)
    if gate.dtype == torch.float64 or not use_triton(gate):
        return swiglu_reference(gate, up)
    with on_device(gate):
        return _SwiGLUFunction.apply(gate, up)


# ------------------------------------------------------------------------------------------- reference
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in plain PyTorch (Qwen2MLP's ``act_fn(gate_proj(x)) * up_proj(x)``)."""
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------ inspection
def kernel_specs(shape: dict) -> list[KernelSpec]:
    """The forward and backward kernels as the launchers run them on ``[shape["tokens"],
    shape["intermediate"]]`` gate/up activations of ``shape["dtype"]``; arguments from the launchers' own
    ``_*_args`` on meta tensors."""
    t = torch.empty(shape["tokens"], shape["intermediate"], dtype=spec_dtype(shape), device="meta")
    block, rows, num_warps = _config(shape["intermediate"])
    constexprs = {"BLOCK": block, "ROWS": rows}
    config = f"BLOCK={block} ROWS={rows} warps={num_warps}"
    return [
        launch_spec("swiglu_fwd", _swiglu_fwd_kernel, _fwd_args(t, t, t), constexprs, num_warps, config=config),
        launch_spec("swiglu_bwd", _swiglu_bwd_kernel, _bwd_args(t, t, t, t, t), constexprs, num_warps,
                    config=config),
    ]
