"""Cross-entropy over ``[N, V]`` logits, with the gradient written by one more sweep (or in the forward).

Per row ``i`` with label ``y``, smoothing ``eps``, z-loss weight ``z``, ``V`` classes::

    lse_i  = log sum_j exp(x_ij)                                   (online softmax in fp32)
    loss_i = (1 - eps) * (lse_i - x_iy) + eps * (lse_i - mean_j x_ij) + z * lse_i**2
    dloss_i/dx_ij = p_ij * (1 + 2 z lse_i) - eps / V - (1 - eps) * [j == y],   p_ij = exp(x_ij - lse_i)

``eps`` spreads ``eps / V`` over every class, as ``torch.nn.functional.cross_entropy``'s ``label_smoothing``.
Rows whose label is ``ignore_index`` have loss 0 and gradient 0.

Optional per-row statistics from the same read (``stats``; no gradient, 0 on ignored rows): the entropy of the
row's softmax ``H_i = lse_i - sum_j p_ij x_ij`` (``sum_j exp(x_ij - m) x_ij`` is carried beside the online sum, with
the same rescaling) and ``top1_i = [argmax_j x_ij == y]`` (first maximum wins a tie, as ``torch.argmax``: the label
logit must reach the row maximum and beat every logit before it). ``reduction``: "mean" = sum over rows /
max(#non-ignored, 1), "sum", "none" (per-row). Loss in fp32 (float64 inputs: float64). Plan: the forward
kernel reads each row once and stores the loss and the row's log-sum-exp; the backward kernel reads the row
once more and writes ``scale * dloss/dx``, ``scale`` (grad_output, times 1 / count for "mean") read from device
memory: no pass over ``[N, V]`` only to scale, no host sync, nothing ``[N, V]``-sized held between the two.
"""

from __future__ import annotations

import os

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
    use_triton,
)

_FN = "cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")
_INT_DTYPES = (torch.int64, torch.int32)


def _config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of V logits; shared by the launcher and ``kernel_specs``.

    8192-wide blocks with 16 warps: each thread holds 16 elements per block (two 128-bit loads in bf16,
    four in fp32), few loop iterations (19 for V = 151,936, 2.4% masked tail). Small V shrinks both.
    """
    block = min(8192, triton.next_power_of_2(max(V, 1)))
    return block, max(1, min(16, block // 512))


# ----------------------------------------------------------------------------------------------- kernels
# Bytes per non-ignored row (``s`` = element size; the minimum is one read and one write, ``2 V s``): forward
# ``V s``, backward ``2 V s``: ``3 V s`` = 1.5x the minimum, plus per-row scalars (label twice, lse written and
# read: < 0.01% at V = 151,936). Ignored rows: the backward writes zeros (``V s``), nothing is read.
# ``s1fast bench inspect`` counts these bytes under the interpreter and CI bounds them.
#
# Toward one read (``2 V s``, 1.0x): the second read exists because a 297 KiB bf16 row (V = 151,936) does not
# fit one SM's registers / 228 KiB of shared memory. Splitting each row over a thread-block cluster (sm_90: up
# to 16 CTAs whose shared memory is addressable across the cluster) keeps the row on chip between the reduction
# (max / sum-exp exchanged over distributed shared memory) and the gradient write, as QuACK does; the gradient
# must then be written in the forward, so grad_output has to be folded into its consumer (the GEMMs of the fused
# linear cross-entropy take it for free; a plain ``cross_entropy`` would scale in a kernel that returns at once
# when grad_output is 1, see ``kernels._common.scaled``). Needs Triton cluster support (or CuTe DSL) and is not
# done yet.
@triton.jit
def _zero_row(grad_ptr, V, BLOCK_V: tl.constexpr):
    """Write a row of zeros (an ignored row's gradient): V stores, no loads."""
    offs = tl.arange(0, BLOCK_V)
    zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        tl.store(grad_ptr + start + offs, zeros, mask=start + offs < V)


@triton.jit
def _grad_row(logits_ptr, grad_ptr, label, lse, scale, V, label_smoothing, z_loss, BLOCK_V: tl.constexpr):
    """One sweep over a row: read x, write scale * dloss/dx from the row's lse. An out-of-range label gives a
    NaN row."""
    offs = tl.arange(0, BLOCK_V)
    poison = tl.where((label >= 0) & (label < V), 0.0, float("nan"))
    p_coef = (1.0 + 2.0 * z_loss * lse) * scale
    smooth = label_smoothing / V * scale - poison
    hit = (1.0 - label_smoothing) * scale
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * p_coef - smooth
        g = tl.where(cols == label, g - hit, g)
        tl.store(grad_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_scale(scale_ptr, row, PER_ROW_SCALE: tl.constexpr):
    if PER_ROW_SCALE:
        return tl.load(scale_ptr + row).to(tl.float32)
    return tl.load(scale_ptr).to(tl.float32)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, grad_ptr, labels_ptr, loss_ptr, lse_ptr, scale_ptr, entropy_ptr, top1_ptr,
    stride_logits, stride_grad, V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr, PER_ROW_SCALE: tl.constexpr, STORE_LSE: tl.constexpr,
    STORE_STATS: tl.constexpr,
):
    """One program per row: loss_ptr[row] = loss (lse_ptr[row] = lse if STORE_LSE; entropy_ptr[row] and
    top1_ptr[row] if STORE_STATS) and, if WRITE_GRAD, a second sweep writing the grad row = scale * dloss/dlogits
    (the fused linear cross-entropy's in-place chunk)."""
    row = tl.program_id(0).to(tl.int64)  # 64-bit: rows x V passes 2^31 at 32K tokens x 151,936
    logits_ptr += row * stride_logits
    grad_ptr += row * stride_grad
    label = tl.load(labels_ptr + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if STORE_LSE:
            tl.store(lse_ptr + row, 0.0)
        if STORE_STATS:
            tl.store(entropy_ptr + row, 0.0)
            tl.store(top1_ptr + row, 0.0)
        if WRITE_GRAD:
            _zero_row(grad_ptr, V, BLOCK_V)
    else:
        # Sweep 1: running max m, sum of exp(x - m), sum of x (for label smoothing), all fp32 scalars; with
        # STORE_STATS also sum of exp(x - m) * x (entropy) and the max of the logits before the label (top-1).
        m = -float("inf")
        d = 0.0
        sum_x = 0.0
        xd = 0.0
        m_before = -float("inf")
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(logits_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)  # no -inf - -inf = NaN while all x are -inf
            e = tl.exp(x - m_sub)
            rescale = tl.exp(m - m_sub)
            d = d * rescale + tl.sum(e, 0)
            sum_x += tl.sum(tl.where(mask, x, 0.0), 0)
            if STORE_STATS:
                xd = xd * rescale + tl.sum(e * tl.where(x > -float("inf"), x, 0.0), 0)  # not 0 * -inf
                m_before = tl.maximum(m_before, tl.max(tl.where(cols < label, x, -float("inf")), 0))
            m = m_new
        lse = m + tl.log(d)
        in_range = (label >= 0) & (label < V)
        x_label = tl.load(logits_ptr + label, mask=in_range, other=0.0).to(tl.float32)
        poison = tl.where(in_range, 0.0, float("nan"))  # out-of-range label: NaN loss and gradient row
        # -inf logits make sum_x -inf: no smoothing term at all when eps == 0 (0 * inf would be NaN)
        smooth_term = tl.where(label_smoothing != 0.0, label_smoothing * (lse - sum_x / V), 0.0)
        loss = (1.0 - label_smoothing) * (lse - x_label) + smooth_term + z_loss * lse * lse
        tl.store(loss_ptr + row, loss + poison)
        if STORE_LSE:
            tl.store(lse_ptr + row, lse)
        if STORE_STATS:
            tl.store(entropy_ptr + row, lse - xd / d + poison)
            top1 = (x_label >= m) & (x_label > m_before) & in_range
            tl.store(top1_ptr + row, top1.to(tl.float32))
        if WRITE_GRAD:
            # Sweep 2: re-read the row and write the scaled gradient once.
            scale = _row_scale(scale_ptr, row, PER_ROW_SCALE)
            _grad_row(logits_ptr, grad_ptr, label, lse, scale, V, label_smoothing, z_loss, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, lse_ptr, scale_ptr,
    stride_logits, stride_grad, V, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr, PER_ROW_SCALE: tl.constexpr,
):
    """One program per row, one sweep: grad row = scale * dloss/dlogits from the forward's saved lse, where
    ``scale`` (device memory) already holds grad_output: no separate scaling pass, no host sync."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        _zero_row(grad_ptr + row * stride_grad, V, BLOCK_V)
    else:
        lse = tl.load(lse_ptr + row)
        scale = _row_scale(scale_ptr, row, PER_ROW_SCALE)
        _grad_row(logits_ptr + row * stride_logits, grad_ptr + row * stride_grad, label, lse, scale, V,
                  label_smoothing, z_loss, BLOCK_V)


# ------------------------------------------------------------------------------ launch arguments, launchers
def _fwd_args(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss, lse, stats=None) -> list:
    """The forward kernel's runtime arguments in order (shared by the launcher and ``kernel_specs``). The
    pointers a launch does not use (no ``grad``, ``lse``, ``scale`` or ``stats``) point at ``logits`` / ``loss``."""
    grad = grad if grad is not None else logits
    entropy, top1 = stats if stats is not None else (loss, loss)
    return [logits, grad, labels, loss, lse if lse is not None else loss, scale if scale is not None else loss,
            entropy, top1, logits.stride(0), grad.stride(0), logits.shape[1], ignore_index, float(label_smoothing),
            float(z_loss)]


def _fwd_constexprs(V: int, grad, scale, lse, stats=None) -> dict:
    return dict(BLOCK_V=_config(V)[0], WRITE_GRAD=grad is not None,
                PER_ROW_SCALE=scale is not None and scale.dim() == 1, STORE_LSE=lse is not None,
                STORE_STATS=stats is not None)


def _bwd_args(logits, labels, lse, grad, scale, ignore_index, label_smoothing, z_loss) -> list:
    return [logits, grad, labels, lse, scale, logits.stride(0), grad.stride(0), logits.shape[1], ignore_index,
            float(label_smoothing), float(z_loss)]


def _bwd_constexprs(V: int, scale) -> dict:
    return dict(BLOCK_V=_config(V)[0], PER_ROW_SCALE=scale.dim() == 1)


def _launch_fwd(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss, lse=None, stats=None):
    N, V = logits.shape
    if N:
        _cross_entropy_kernel[(N,)](
            *_fwd_args(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss, lse, stats),
            **_fwd_constexprs(V, grad, scale, lse, stats), num_warps=_config(V)[1],
        )


def _launch_bwd(logits, labels, lse, grad, scale, ignore_index, label_smoothing, z_loss):
    N, V = logits.shape
    if N:
        _cross_entropy_bwd_kernel[(N,)](
            *_bwd_args(logits, labels, lse, grad, scale, ignore_index, label_smoothing, z_loss),
            **_bwd_constexprs(V, scale), num_warps=_config(V)[1],
        )


# The same per-row contract in plain PyTorch: the path of CPU tensors outside the interpreter and of float64.
def _upcast(logits):
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _rows_torch(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss, lse=None, stats=None):
    """The kernel's contract in plain PyTorch (fp32 math, float64 for float64 input); ``grad`` may be
    ``logits``."""
    V = logits.shape[1]
    x = _upcast(logits)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < V)
    safe = torch.where(valid & in_range, labels, 0).long().unsqueeze(1)
    row_lse = torch.logsumexp(x, 1)
    poison = torch.where(valid & ~in_range, float("nan"), 0.0).to(x.dtype)
    rows = (1 - label_smoothing) * (row_lse - x.gather(1, safe).squeeze(1)) + z_loss * row_lse * row_lse
    if label_smoothing:  # not 0 * (lse - mean), which is NaN when a logit is -inf
        rows = rows + label_smoothing * (row_lse - x.mean(1))
    loss.copy_(torch.where(valid, rows, 0.0) + poison)
    if lse is not None:
        lse.copy_(torch.where(valid, row_lse, 0.0))
    if stats is not None:
        p = torch.sub(x, row_lse.unsqueeze(1)).exp_()  # in place: one [rows, V] temporary fewer than p * where(...)
        entropy = row_lse - p.mul_(x.clamp(min=torch.finfo(x.dtype).min)).sum(1)  # not 0 * -inf; no mask temporary
        stats[0].copy_(torch.where(valid, entropy, 0.0) + poison)
        stats[1].copy_(valid & in_range & (x.argmax(1) == labels))
    if grad is not None:
        _grad_torch(x, labels, row_lse, grad, scale, ignore_index, label_smoothing, z_loss)


def _grad_torch(x, labels, lse, grad, scale, ignore_index, label_smoothing, z_loss):
    """``grad = scale * dloss/dx`` from the rows' ``lse`` (x already upcast; ``grad`` may share x's memory)."""
    V = x.shape[1]
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < V)
    safe = torch.where(valid & in_range, labels, 0).long().unsqueeze(1)
    poison = torch.where(valid & ~in_range, float("nan"), 0.0).to(x.dtype)
    scale = torch.where(valid, scale.to(x.dtype), 0.0)
    lse = torch.where(valid, lse.to(x.dtype), 0.0)
    # softmax written straight into grad when the dtypes allow (x is no longer read after this point)
    g = grad if grad.dtype == x.dtype else torch.empty_like(x)
    torch.sub(x, lse.unsqueeze(1), out=g).exp_()
    g.mul_(((1 + 2 * z_loss * lse) * scale).unsqueeze(1))
    g.sub_((label_smoothing / V * scale - poison).unsqueeze(1))
    g.scatter_add_(1, safe, (-(1 - label_smoothing) * scale).unsqueeze(1))
    g.masked_fill_(~valid.unsqueeze(1), 0.0)  # ignored rows: exactly 0 whatever their logits (+-inf included)
    if g is not grad:
        grad.copy_(g)


# The fused variant (``cross_entropy_rows`` with ``grad``; what the fused linear cross-entropy runs in place over a
# logits chunk it owns, with the scale known in the forward) writes the gradient in the forward: sweep 1 reads the
# row, sweep 2 reads it again and writes the gradient (``3 V s``).
def cross_entropy_rows(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss, lse=None, stats=None):
    """Per-row loss into ``loss`` (fp32 [N]) and, if ``grad`` is given, ``scale * dloss/dlogits`` into it.

    ``scale`` is a 0-d or [N] fp32 tensor on the logits' device (None when ``grad`` is None). ``grad`` may be
    ``logits`` itself (in-place, each element is read before it is overwritten by the same program). ``lse``
    (fp32 [N], optional) receives each row's log-sum-exp (0 for ignored rows) for ``cross_entropy_grad_rows``.
    ``stats`` (optional pair of fp32 [N]) receives each row's softmax entropy and top-1 hit (1.0 / 0.0), see the
    module docstring. Triton or PyTorch per ``use_triton``; float64 always runs PyTorch. Inputs are assumed
    validated (see ``check_labels``).
    """
    if logits.dtype in FLOAT_DTYPES and use_triton(logits):
        _launch_fwd(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss, lse, stats)
    else:
        _rows_torch(logits, labels, loss, grad, scale, ignore_index, label_smoothing, z_loss, lse, stats)


def cross_entropy_grad_rows(logits, labels, lse, grad, scale, ignore_index, label_smoothing, z_loss):
    """``grad = scale * dloss/dlogits`` in one read of ``logits`` given the rows' ``lse`` from
    ``cross_entropy_rows``; ``scale`` (0-d or [N] fp32, on the device) carries grad_output."""
    if logits.dtype in FLOAT_DTYPES and use_triton(logits):
        _launch_bwd(logits, labels, lse, grad, scale, ignore_index, label_smoothing, z_loss)
    else:
        _grad_torch(_upcast(logits), labels, lse, grad, scale, ignore_index, label_smoothing, z_loss)


# -------------------------------------------------------------------------------------------- autograd
def mean_scale(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 / max(#labels != ignore_index, 1) as a 0-d fp32 device tensor (no host sync)."""
    return (labels != ignore_index).sum().clamp(min=1).to(torch.float32).reciprocal()


class _CrossEntropyFunction(torch.autograd.Function):
    """Forward: loss and per-row lse in one read of the logits. Backward: one more read and one write (the
    gradient, with grad_output read from device memory inside the kernel)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, label_smoothing, z_loss, grad_enabled):
        N = logits.shape[0]
        acc = torch.promote_types(logits.dtype, torch.float32)
        loss = torch.empty(N, dtype=acc, device=logits.device)
        scale = mean_scale(labels, ignore_index).to(acc) if reduction == "mean" else None
        # needs_input_grad stays True under torch.no_grad(): the caller's grad mode decides (no wasted lse)
        lse = torch.empty(N, dtype=acc, device=logits.device) if ctx.needs_input_grad[0] and grad_enabled else None
        cross_entropy_rows(logits, labels, loss, None, None, ignore_index, label_smoothing, z_loss, lse)
        ctx.options = (reduction, ignore_index, label_smoothing, z_loss)
        if lse is not None:
            ctx.save_for_backward(logits, labels, lse, scale)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        logits, labels, lse, scale = ctx.saved_tensors
        reduction, ignore_index, label_smoothing, z_loss = ctx.options
        go = grad_output.to(lse.dtype)
        # a 0-d product (one tiny launch) or the [N] grad_output itself: the kernel reads it, no pass over [N, V]
        scale = go * scale if reduction == "mean" else go.contiguous()
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        cross_entropy_grad_rows(logits, labels, lse, grad, scale, ignore_index, label_smoothing, z_loss)
        return grad, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------- checks
def check_options(fn: str, reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"{fn}: z_loss must be >= 0, got {z_loss}")


def check_labels(fn: str, labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """Eager label range check: always on CPU, on CUDA only with ``S1FAST_CHECK_LABELS=1`` (it syncs).

    Labels outside ``[0, V)`` that are not ``ignore_index``: on CPU tensors a ``ValueError`` names the first bad
    position and value (checking is free there). On CUDA there is no host sync: that row's loss and gradient
    come out NaN (so the mean loss is NaN). Skipped while torch.compile traces (the data-dependent branch would
    break the graph); the compiled kernel still writes NaN for an out-of-range label."""
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


def _check(logits, labels, ignore_index, reduction, label_smoothing, z_loss) -> None:
    check_tensor(_FN, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(_FN, "labels", labels, ndim=1, dtypes=_INT_DTYPES)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{_FN}: labels must have shape ({logits.shape[0]},) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    check_same_device(_FN, logits=logits, labels=labels)
    check_options(_FN, reduction, label_smoothing, z_loss)
    check_labels(_FN, labels, logits.shape[1], ignore_index)


# --------------------------------------------------------------------------------------------- public
# Where this differs from ``torch.nn.functional.cross_entropy`` (and so from transformers' loss): when every label
# is ``ignore_index``, "mean" gives 0.0 with zero gradients, where PyTorch gives NaN (0 / 0). On purpose: one
# fully masked micro-batch must not turn a whole gradient-accumulation step into NaN. ``-inf`` logits (masked
# vocabulary entries) behave as in PyTorch: without smoothing the loss stays finite (the smoothing term, which
# would be ``0 * inf``, is left out when ``eps == 0``); with smoothing the loss is ``+inf`` (``mean_j x_ij`` is
# ``-inf``) and the gradient is finite, as PyTorch's.
def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [N, V] against integer ``labels`` [N] (the module docstring has the math).

    Returns an fp32 scalar ("mean", "sum") or fp32 [N] ("none"); float64 logits give float64. Unlike
    ``torch.nn.functional.cross_entropy``, "mean" over labels that are all ``ignore_index`` is 0.0, not NaN.
    """
    _check(logits, labels, ignore_index, reduction, label_smoothing, z_loss)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    with on_device(logits):
        return _CrossEntropyFunction.apply(logits, labels.contiguous(), int(ignore_index), reduction,
                                           float(label_smoothing), float(z_loss), torch.is_grad_enabled())


# ------------------------------------------------------------------------------------------- reference
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


# ------------------------------------------------------------------------------------------ inspection
def _spec(shape: dict, name: str, backward: bool, write_grad: bool = False) -> KernelSpec:
    """One kernel as launched on ``[rows, shape["vocab"]]`` logits of ``shape["dtype"]`` with int64 labels and
    a 0-d scale (the training losses); arguments from the launchers' own ``_*_args`` on meta tensors."""
    V = shape["vocab"]
    logits = torch.empty(1, V, dtype=spec_dtype(shape), device="meta")
    labels = torch.empty(1, dtype=torch.int64, device="meta")
    rows = torch.empty(1, dtype=torch.float32, device="meta")  # loss, lse
    scale = torch.empty((), dtype=torch.float32, device="meta")
    block, warps = _config(V)
    if backward:
        fn, args = _cross_entropy_bwd_kernel, _bwd_args(logits, labels, rows, logits, scale, -100, 0.0, 0.0)
        constexprs = _bwd_constexprs(V, scale)
    else:
        grad, scale, lse = (logits, scale, None) if write_grad else (None, None, rows)
        fn, args = _cross_entropy_kernel, _fwd_args(logits, labels, rows, grad, scale, -100, 0.0, 0.0, lse)
        constexprs = _fwd_constexprs(V, grad, scale, lse)
    return launch_spec(name, fn, args, constexprs, warps, config=f"BLOCK_V={block} warps={warps}")


def kernel_specs(shape: dict) -> list[KernelSpec]:
    """``cross_entropy``'s two kernels as launched for ``shape`` (keys ``vocab``, ``dtype``; one program per
    token row) in training: the forward storing loss and lse, the backward writing the scaled gradient."""
    return [_spec(shape, "cross_entropy_fwd", False), _spec(shape, "cross_entropy_bwd", True)]


def fused_kernel_spec(shape: dict) -> KernelSpec:
    """The forward kernel with the gradient sweep (``cross_entropy_rows`` with ``grad``), as the fused linear
    cross-entropy launches it on each chunk with its scalar mean/sum scale."""
    return _spec(shape, "cross_entropy_fused", False, write_grad=True)
