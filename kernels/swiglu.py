r"""SwiGLU, the gated activation of Qwen2MLP: fused Triton forward and backward, plus the PyTorch reference.

Forward, elementwise over ``gate`` and ``up`` of one shape (``s = sigmoid(gate)``)::

    out = silu(gate) * up = gate * s * up

Backward, with ``g = dL/dout``, recomputing ``s`` from the saved ``gate`` (the activation is never kept)::

    dL/dup   = g * silu(gate)      = g * gate * s
    dL/dgate = g * up * silu'(gate) = g * up * s * (1 + gate * (1 - s))

since ``silu'(x) = s + x * s * (1 - s)``. Only ``gate`` and ``up`` are saved; both gradients go to fresh
tensors (nothing autograd may hold is overwritten).

Kernels (memory-bound; computed in fp32, rounded once on store): each program takes a ``ROWS x BLOCK``
tile of the ``[rows, width]`` view, BLOCK a power of two along the row so loads are contiguous 128-bit
vectors. Rows may have any stride (``gate, up = gate_up.chunk(2, -1)`` runs without a copy), row offsets are
64-bit, the row tiles sit on grid axis 0 (no 65,535 limit on tokens) and the configuration comes from
``_config`` (no autotuning), shared by the launchers and ``kernel_specs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from s1fast.kernels._common import FLOAT_DTYPES, TRITON_DTYPES, KernelSpec, as_rows
from s1fast.kernels._common import check_same_device, check_tensor, on_device, spec_dtype, use_triton

_MAX_BLOCK = 1024  # columns per tile; wide rows (intermediate 4864 - 27648) span several column blocks
_TILE = 4096  # elements per program: 16 per thread at 8 warps, i.e. 2 x 128-bit loads per tensor in bf16


def _config(width: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for rows of ``width`` elements."""
    block = min(triton.next_power_of_2(width), _MAX_BLOCK)
    rows = _TILE // block
    return block, rows, _TILE // 512


@triton.jit
def _swiglu_fwd_kernel(
    GATE, UP, OUT,
    stride_gate, stride_up, stride_out, n_rows, n_cols,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    g = tl.load(GATE + rows64 * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + rows64 * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + rows64 * stride_out + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DOUT, GATE, UP, DGATE, DUP,
    stride_dout, stride_gate, stride_up, stride_dgate, stride_dup, n_rows, n_cols,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    dout = tl.load(DOUT + rows64 * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + rows64 * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + rows64 * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dup = dout * g * s
    dgate = dout * u * s * (1.0 + g * (1.0 - s))
    tl.store(DGATE + rows64 * stride_dgate + cols[None, :], dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + rows64 * stride_dup + cols[None, :], dup.to(DUP.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int, int]:
    block, rows, num_warps = _config(n_cols)
    return (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block)), block, rows, num_warps


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        width = gate.shape[-1]
        g2, u2 = as_rows(gate, width), as_rows(up, width)
        out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
        if out.numel():
            grid, block, rows, num_warps = _grid(*g2.shape)
            _swiglu_fwd_kernel[grid](
                g2, u2, out,
                g2.stride(0), u2.stride(0), out.stride(0), *g2.shape,
                BLOCK=block, ROWS=rows, num_warps=num_warps,
            )
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        d2 = as_rows(dout, g2.shape[1])
        dgate = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        dup = torch.empty(g2.shape, dtype=g2.dtype, device=g2.device)
        if dgate.numel():
            grid, block, rows, num_warps = _grid(*g2.shape)
            _swiglu_bwd_kernel[grid](
                d2, g2, u2, dgate, dup,
                d2.stride(0), g2.stride(0), u2.stride(0), dgate.stride(0), dup.stride(0), *g2.shape,
                BLOCK=block, ROWS=rows, num_warps=num_warps,
            )
        return dgate.view(ctx.shape), dup.view(ctx.shape)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in plain PyTorch (Qwen2MLP's ``act_fn(gate_proj(x)) * up_proj(x)``)."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate`` and ``up`` of one shape and dtype; differentiable in both.

    Triton kernels on CUDA (and under ``TRITON_INTERPRET=1``); float64 inputs and other CPU tensors take
    ``swiglu_reference``. Output has the inputs' shape and dtype.
    """
    fn = "swiglu"
    check_tensor(fn, "gate", gate, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(fn, "up", up, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_same_device(fn, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(
            f"{fn}: gate and up must have the same shape, got gate {tuple(gate.shape)} and up {tuple(up.shape)}"
        )
    if gate.dtype != up.dtype:
        raise TypeError(f"{fn}: gate and up must have the same dtype, got gate {gate.dtype} and up {up.dtype}")
    if gate.dim() == 0:
        raise ValueError(f"{fn}: gate and up must have at least 1 dim, got scalars")
    if gate.dtype == torch.float64 or not use_triton(gate):
        return swiglu_reference(gate, up)
    with on_device(gate):
        return _SwiGLUFunction.apply(gate, up)


def kernel_specs(shape: dict) -> list[KernelSpec]:
    """The forward and backward kernels as the launchers run them on ``[shape["tokens"],
    shape["intermediate"]]`` gate/up activations of ``shape["dtype"]``."""
    ptr = f"*{TRITON_DTYPES[spec_dtype(shape)]}"
    block, rows, num_warps = _config(shape["intermediate"])
    constexprs = {"BLOCK": block, "ROWS": rows}
    config = f"BLOCK={block} ROWS={rows} warps={num_warps}"
    fwd = {"GATE": ptr, "UP": ptr, "OUT": ptr,
           "stride_gate": "i32", "stride_up": "i32", "stride_out": "i32", "n_rows": "i32", "n_cols": "i32"}
    bwd = {"DOUT": ptr, "GATE": ptr, "UP": ptr, "DGATE": ptr, "DUP": ptr,
           "stride_dout": "i32", "stride_gate": "i32", "stride_up": "i32", "stride_dgate": "i32", "stride_dup": "i32",
           "n_rows": "i32", "n_cols": "i32"}
    return [
        KernelSpec("swiglu_fwd", _swiglu_fwd_kernel, fwd, dict(constexprs), num_warps, config=config),
        KernelSpec("swiglu_bwd", _swiglu_bwd_kernel, bwd, dict(constexprs), num_warps, config=config),
    ]
