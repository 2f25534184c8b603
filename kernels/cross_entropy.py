"""Cross-entropy over ``[N, V]`` logits with the gradient produced in the forward pass.

Math (per row ``i`` with label ``y``, smoothing ``eps``, z-loss weight ``z``, ``V`` classes)::

    lse_i  = log sum_j exp(x_ij)                                   (online softmax in fp32)
    loss_i = (1 - eps) * (lse_i - x_iy) + eps * (lse_i - mean_j x_ij) + z * lse_i**2
    dloss_i/dx_ij = p_ij * (1 + 2 z lse_i) - eps / V - (1 - eps) * [j == y],   p_ij = exp(x_ij - lse_i)

``eps`` spreads ``eps / V`` over every class, exactly as ``torch.nn.functional.cross_entropy``'s
``label_smoothing`` does. Rows whose label is ``ignore_index`` have loss 0 and gradient 0. ``reduction``:
"mean" = sum over rows / max(#non-ignored, 1), "sum", "none" (per-row fp32). The loss is accumulated and
returned in fp32 (float64 inputs: float64).

Where this differs from ``torch.nn.functional.cross_entropy`` (and so from transformers' loss): when every
label is ``ignore_index``, "mean" gives 0.0 with zero gradients, where PyTorch gives NaN (0 / 0). On
purpose: one fully masked micro-batch must not turn a whole gradient-accumulation step into NaN.
``-inf`` logits (masked vocabulary entries) behave as in PyTorch: without smoothing the loss stays finite
(the smoothing term, which would be ``0 * inf``, is left out when ``eps == 0``); with smoothing the loss is
``+inf`` (``mean_j x_ij`` is ``-inf``) and the gradient is finite, as PyTorch's.

Fused forward/backward: the forward already knows the reduction's scale (1 / count for "mean", computed on
the device, no host sync), so the kernel writes ``scale * dloss/dx`` while it computes the loss; backward
only multiplies the stored gradient by ``grad_output`` in place (per row for "none").

Bytes moved by the Triton kernel per non-ignored row (``s`` = element size): sweep 1 reads the row
(online max / sum-exp / sum), sweep 2 reads it again and writes the gradient: ``3 V s`` at worst, and the
second read usually hits L2 (a 151,936-wide bf16 row is 297 KiB, read back right after sweep 1), so DRAM
sees close to the minimum ``2 V s`` (one read, one write). The second read cannot be avoided: a whole row
does not fit in registers/shared memory of one SM. Ignored rows only write zeros (``V s``). Backward's
scaling reads and writes the gradient once more (``2 V s``). The kernel is used with ``grad is logits`` by
the fused linear cross-entropy (gradient written in place over a logits chunk it owns).

Labels outside ``[0, V)`` that are not ``ignore_index``: on CPU tensors a ``ValueError`` names the first
bad position and value (checking is free there). On CUDA there is no host sync: that row's loss and
gradient come out NaN (so the mean loss is NaN); set ``S1FAST_CHECK_LABELS=1`` for the eager (syncing)
check on CUDA too.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from s1fast.kernels._common import FLOAT_DTYPES, TRITON_DTYPES, KernelSpec
from s1fast.kernels._common import check_same_device, check_tensor, on_device, spec_dtype, use_triton

_REDUCTIONS = ("mean", "sum", "none")
_INT_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------------------------- kernel
@triton.jit
def _cross_entropy_kernel(
    logits_ptr, grad_ptr, labels_ptr, loss_ptr, scale_ptr,
    stride_logits, stride_grad, V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr, PER_ROW_SCALE: tl.constexpr,
):
    """One program per row: loss_ptr[row] = loss, grad row = scale * dloss/dlogits (see module docstring)."""
    row = tl.program_id(0).to(tl.int64)  # 64-bit: rows x V passes 2^31 at 32K tokens x 151,936
    logits_ptr += row * stride_logits
    grad_ptr += row * stride_grad
    label = tl.load(labels_ptr + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                tl.store(grad_ptr + start + offs, zeros, mask=start + offs < V)
    else:
        # Sweep 1: running max m, sum of exp(x - m), sum of x (for label smoothing), all fp32 scalars.
        m = -float("inf")
        d = 0.0
        sum_x = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(logits_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)  # no -inf - -inf = NaN while all x are -inf
            d = d * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub), 0)
            sum_x += tl.sum(tl.where(mask, x, 0.0), 0)
            m = m_new
        lse = m + tl.log(d)
        in_range = (label >= 0) & (label < V)
        x_label = tl.load(logits_ptr + label, mask=in_range, other=0.0).to(tl.float32)
        poison = tl.where(in_range, 0.0, float("nan"))  # out-of-range label: NaN loss and gradient row
        # -inf logits make sum_x -inf: no smoothing term at all when eps == 0 (0 * inf would be NaN)
        smooth_term = tl.where(label_smoothing != 0.0, label_smoothing * (lse - sum_x / V), 0.0)
        loss = (1.0 - label_smoothing) * (lse - x_label) + smooth_term + z_loss * lse * lse
        tl.store(loss_ptr + row, loss + poison)
        if WRITE_GRAD:
            if PER_ROW_SCALE:
                scale = tl.load(scale_ptr + row).to(tl.float32)
            else:
                scale = tl.load(scale_ptr).to(tl.float32)
            p_coef = (1.0 + 2.0 * z_loss * lse) * scale
            smooth = label_smoothing / V * scale - poison
            hit = (1.0 - label_smoothing) * scale
            # Sweep 2: re-read the row (mostly from L2) and write the scaled gradient once.
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                x = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * p_coef - smooth
                g = tl.where(cols == label, g - hit, g)
                tl.store(grad_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of V logits; shared by the launcher and ``kernel_specs``.

    8192-wide blocks with 16 warps: each thread holds 16 elements per block (two 128-bit loads in bf16,
    four in fp32), few loop iterations (19 for V = 151,936, 2.4% masked tail). Small V shrinks both.
    """
    block = min(8192, triton.next_power_of_2(max(V, 1)))
    return block, max(1, min(16, block // 512))


def _launch(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss):
    N, V = logits.shape
    if N == 0:
        return
    block, warps = _config(V)
    grad_arg = grad if grad is not None else logits  # unused pointer when WRITE_GRAD is False
    _cross_entropy_kernel[(N,)](
        logits, grad_arg, labels, loss, scale,
        logits.stride(0), grad_arg.stride(0), V, ignore_index, float(label_smoothing), float(z_loss),
        BLOCK_V=block, WRITE_GRAD=grad is not None, PER_ROW_SCALE=scale.dim() == 1, num_warps=warps,
    )


def _rows_torch(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss):
    """The kernel's contract in plain PyTorch (fp32 math, float64 for float64 input); ``grad`` may be ``logits``."""
    V = logits.shape[1]
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < V)
    safe = torch.where(valid & in_range, labels, 0).long().unsqueeze(1)
    lse = torch.logsumexp(x, 1)
    poison = torch.where(valid & ~in_range, float("nan"), 0.0).to(x.dtype)
    rows = (1 - label_smoothing) * (lse - x.gather(1, safe).squeeze(1)) + z_loss * lse * lse
    if label_smoothing:  # not 0 * (lse - mean), which is NaN when a logit is -inf
        rows = rows + label_smoothing * (lse - x.mean(1))
    loss.copy_(torch.where(valid, rows, 0.0) + poison)
    if grad is not None:
        scale = torch.where(valid, scale.to(x.dtype), 0.0)
        # softmax written straight into grad when the dtypes allow (x is no longer read after this point)
        g = grad if grad.dtype == x.dtype else torch.empty_like(x)
        torch.sub(x, lse.unsqueeze(1), out=g).exp_()
        g.mul_(((1 + 2 * z_loss * lse) * scale).unsqueeze(1)).sub_((label_smoothing / V * scale - poison).unsqueeze(1))
        g.scatter_add_(1, safe, (-(1 - label_smoothing) * scale).unsqueeze(1))
        if g is not grad:
            grad.copy_(g)


def cross_entropy_rows(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss):
    """Per-row loss into ``loss`` (fp32 [N]) and, if ``grad`` is given, ``scale * dloss/dlogits`` into it.

    ``scale`` is a 0-d or [N] fp32 tensor on the logits' device. ``grad`` may be ``logits`` itself (in-place,
    each element is read before it is overwritten by the same program). Triton or PyTorch per ``use_triton``;
    float64 always runs PyTorch. Inputs are assumed validated (see ``check_labels``).
    """
    if logits.dtype in FLOAT_DTYPES and use_triton(logits):
        _launch(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss)
    else:
        _rows_torch(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss)


# ----------------------------------------------------------------------------------------- validation
def check_options(fn: str, reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"{fn}: z_loss must be >= 0, got {z_loss}")


def check_labels(fn: str, labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """Eager label range check: always on CPU, on CUDA only with ``S1FAST_CHECK_LABELS=1`` (it syncs).

    Skipped while torch.compile traces (the data-dependent branch would break the graph); the compiled
    kernel still writes NaN for an out-of-range label."""
    if torch.compiler.is_compiling():
        return
    if labels.is_cuda and os.environ.get("S1FAST_CHECK_LABELS", "0") in ("", "0"):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{fn}: labels[{pos}] = {int(labels[pos])} is outside [0, {V}) (V = {V}) and is not "
            f"ignore_index ({ignore_index})"
        )


def mean_scale(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 / max(#labels != ignore_index, 1) as a 0-d fp32 device tensor (no host sync)."""
    return (labels != ignore_index).sum().clamp(min=1).to(torch.float32).reciprocal()


# ------------------------------------------------------------------------------------------- autograd
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, label_smoothing, z_loss, grad_enabled):
        N = logits.shape[0]
        acc = torch.promote_types(logits.dtype, torch.float32)
        loss = torch.empty(N, dtype=acc, device=logits.device)
        scale = mean_scale(labels, ignore_index) if reduction == "mean" else torch.ones((), device=logits.device)
        # needs_input_grad stays True under torch.no_grad(): the caller's grad mode decides (no wasted gradient)
        want = ctx.needs_input_grad[0] and grad_enabled
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if want else None
        cross_entropy_rows(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss)
        ctx.reduction = reduction
        if grad is not None:
            ctx.save_for_backward(grad)  # a second backward then fails loudly: backward scales it in place
        if reduction == "none":
            return loss
        total = loss.sum()
        return total * scale.to(acc) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        go = grad_output.unsqueeze(1) if ctx.reduction == "none" else grad_output
        return grad.mul_(go), None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [N, V] against integer ``labels`` [N]; see the module docstring.

    Returns an fp32 scalar ("mean", "sum") or fp32 [N] ("none"); float64 logits give float64. Unlike
    ``torch.nn.functional.cross_entropy``, "mean" over labels that are all ``ignore_index`` is 0.0, not NaN.
    """
    fn = "cross_entropy"
    check_tensor(fn, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(fn, "labels", labels, ndim=1, dtypes=_INT_DTYPES)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy: labels must have shape ({logits.shape[0]},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    check_same_device(fn, logits=logits, labels=labels)
    check_options(fn, reduction, label_smoothing, z_loss)
    check_labels(fn, labels, logits.shape[1], ignore_index)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    with on_device(logits):
        return _CrossEntropy.apply(logits, labels.contiguous(), int(ignore_index), reduction,
                                   float(label_smoothing), float(z_loss), torch.is_grad_enabled())


def cross_entropy_reference(logits, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """Unfused reference: ``F.cross_entropy`` in fp32 (float64 stays float64) plus the z-loss term."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = torch.nn.functional.cross_entropy(
        x, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid = labels != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, -1).pow(2) * valid
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total


# ----------------------------------------------------------------------------------------- inspection
def kernel_specs(shape: dict) -> list[KernelSpec]:
    """The cross-entropy kernel as launched for ``shape`` (keys ``vocab``, ``dtype``; one program per token
    row) in training: gradient written with the scalar mean/sum scale ("none" backward: ``PER_ROW_SCALE``)."""
    V = shape["vocab"]
    t = TRITON_DTYPES[spec_dtype(shape)]
    block, warps = _config(V)
    signature = {
        "logits_ptr": f"*{t}", "grad_ptr": f"*{t}", "labels_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
        "stride_logits": "i32", "stride_grad": "i32", "V": "i32", "ignore_index": "i32",
        "label_smoothing": "fp32", "z_loss": "fp32",
    }
    return [KernelSpec(
        name="cross_entropy", fn=_cross_entropy_kernel, signature=signature,
        constexprs={"BLOCK_V": block, "WRITE_GRAD": True, "PER_ROW_SCALE": False}, num_warps=warps,
        config=f"BLOCK_V={block} warps={warps}",
    )]
