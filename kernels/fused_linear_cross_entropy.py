"""Fused linear cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without the full ``[N, V]`` logits.

With ``x = h W^T + b`` and ``g = dloss/dx`` from the cross-entropy kernel (see ``cross_entropy``)::

    dloss/dh = g W          dloss/dW = g^T h  (accumulated in fp32)          dloss/db = sum_rows g

Plan: tokens go in chunks whose logits fit a memory budget. Per chunk: the logits GEMM in the input dtype, the
cross-entropy kernel writing ``scale * g`` in place over the chunk's logits, then ``grad_hidden[chunk] = g W``,
``grad_weight += g^T h`` (fp32 accumulator), ``grad_bias += sum g``. For "mean" / "sum" / ``num_items_in_batch``
the scale is known in the forward (1 / count computed on the device, 1, 1 / num_items_in_batch), so all
gradients are finished during the forward and backward only multiplies them by ``grad_output``. Nothing syncs
with the host. Extra memory beyond the inputs and their gradients: one chunk of logits, plus the fp32
weight-gradient accumulator when the weight is not fp32 (an fp32 weight's accumulator is its gradient). The
GEMMs are cuBLAS; the only Triton kernels are the cross-entropy's and ``kernels._common``'s scaling.

Per-token statistics without logits (``return_entropy``, ``return_token_accuracy``, ``return_z_loss``): the
cross-entropy kernel's sweep 1 also carries ``sum_j exp(x_j - m) x_j`` and the largest logit before the label, so
the softmax entropy ``H = lse - sum_j p_j x_j`` and ``top1 = [argmax_j x_j == y]`` cost per-row scalars, no extra
read; the z-loss part of the loss is ``z * lse**2`` from the stored lse. They carry no gradient.

``reduction="none"`` recomputes every chunk in backward (each row has its own grad_output). With
``uniform_grad=True`` the caller promises that grad_output is the same for every non-ignored row (the per-token
losses are only summed and scaled, as in SFT): the gradients of their sum are then finished in the forward as for
"sum", and backward multiplies them by that one value, read on the device. A grad_output that differs between
non-ignored rows gives NaN gradients (checked on the device, no host sync), never silently wrong ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch

from s1fast.kernels._common import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    on_device,
    scale_kernel_specs,
    scaled,
    spec_dtype,
    use_triton,
)
from s1fast.kernels.cross_entropy import (
    _INT_DTYPES,
    check_labels,
    check_options,
    cross_entropy_reference,
    cross_entropy_rows,
    fused_kernel_spec,
    mean_scale,
)

_FN = "fused_linear_cross_entropy"

DEFAULT_CHUNK_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}
"""Per-chunk memory budget by device type when ``chunk_budget_bytes`` is not given: 1 GiB on CUDA, 128 MiB on
CPU (the PyTorch path also counts its two fp32 row temporaries)."""

WEIGHT_GRAD_GEMM = {"path": None, "why": None}
"""How CUDA calls with bf16/fp16 operands accumulate the fp32 weight gradient: ``path`` "out_dtype" (one cuBLAS GEMM
writing fp32, no temporary) or "fallback" (a [V, H] product in the input dtype per chunk, added to the accumulator),
None before the first such call; ``why``: the error that made it fall back (also warned once). The benchmarks record
it next to the memory it explains."""


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, triton_path: bool, budget_bytes: int) -> int:
    """Rows per chunk so that one chunk's logits (+ the PyTorch path's fp32 temporaries) fit ``budget_bytes``,
    balanced so that the last chunk is not a sliver (fewest chunks, equal sizes)."""
    row_bytes = vocab * (dtype.itemsize + (0 if triton_path else 8))
    most = max(1, budget_bytes // row_bytes)
    n_chunks = max(1, -(-n_rows // most))
    return max(1, -(-n_rows // n_chunks))


# ------------------------------------------------------------------------------------------------ GEMMs
# On CUDA the bf16/fp16 weight-gradient GEMM writes into the fp32 accumulator directly
# (``torch.addmm(..., out_dtype=torch.float32)``); a torch whose addmm refuses that falls back to a per-chunk
# [V, H] product in the input dtype added to the accumulator. No memset: the first chunk's GEMM writes the
# accumulators with beta = 0.
def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc = a @ b`` (``first``: beta = 0, so ``acc`` needs no zero fill and its garbage, NaN included, is
    never read) or ``acc += a @ b``, with ``acc`` in fp32 (or float64) and ``a``, ``b`` possibly bf16/fp16, no
    [V, H] temp."""
    beta = 0 if first else 1
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif acc.is_cuda and WEIGHT_GRAD_GEMM["path"] != "fallback":
        try:  # cuBLAS with bf16 operands, fp32 accumulator and fp32 C
            _fp32_out_addmm(acc, a, b, beta)
            WEIGHT_GRAD_GEMM["path"] = "out_dtype"
        except torch.OutOfMemoryError:
            raise  # not a missing feature: keep the fast path for later calls
        except (RuntimeError, TypeError) as e:  # torch without addmm(out_dtype=) (TypeError) or one whose CUDA
            # addmm wants C in the operands' dtype (RuntimeError): its argument checks fail before any work, so
            # acc is untouched; fall back for good, and say so
            why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            WEIGHT_GRAD_GEMM.update(path="fallback", why=why)
            warnings.warn(f"{_FN}: torch {torch.__version__} refused the fp32-output weight-gradient GEMM ({why}); "
                          "falling back to one [V, H] product in the input dtype per chunk", stacklevel=2)
            _add_product(acc, a @ b, first)
    elif acc.is_cuda:
        _add_product(acc, a @ b, first)  # one [V, H] temporary in the input dtype per chunk
    else:  # CPU: fp32 GEMM on chunk-sized upcasts
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)


def _fp32_out_addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: int) -> None:
    """``acc = beta * acc + a @ b`` in place with bf16/fp16 ``a``, ``b`` and an fp32 ``acc`` (CUDA's out_dtype
    GEMM)."""
    torch.addmm(acc, a, b, out_dtype=acc.dtype, beta=beta, out=acc)


def _add_product(acc: torch.Tensor, product: torch.Tensor, first: bool) -> None:
    acc.copy_(product) if first else acc.add_(product)


# ---------------------------------------------------------------------------------------- chunk loop
def _chunk_loop(hidden, weight, bias, labels, scale, loss, grads, ignore_index, label_smoothing, z_loss, rows,
                extras=None):
    """One pass over the token chunks (shared by every path; only the per-chunk cross-entropy differs).

    Writes per-row losses into ``loss``. ``grads`` is ``None`` (loss only) or ``(grad_hidden, grad_weight,
    grad_bias)`` with ``None`` for gradients not wanted; ``scale`` (0-d or [N]) multiplies the gradients.
    ``extras`` (optional): ``(lse, entropy, top1)`` [N] rows to fill (see ``cross_entropy_rows``).
    """
    grad_h, grad_w, grad_b = grads if grads is not None else (None, None, None)
    want_grad = grads is not None and any(g is not None for g in grads)
    # one chunk buffer for the whole loop (fresh [rows, V] allocations per chunk cost page faults on CPU)
    buffer = hidden.new_empty(min(rows, hidden.shape[0]), weight.shape[0])
    for start in range(0, hidden.shape[0], rows):
        end = min(start + rows, hidden.shape[0])
        h = hidden[start:end]
        logits = buffer[: end - start]
        if bias is not None:
            torch.addmm(bias, h, weight.t(), out=logits)
        else:
            torch.mm(h, weight.t(), out=logits)
        chunk_scale = scale[start:end] if scale.dim() == 1 else scale
        lse, stats = (None, None) if extras is None else (extras[0][start:end], (extras[1][start:end],
                                                                                  extras[2][start:end]))
        cross_entropy_rows(logits, labels[start:end], loss[start:end], logits if want_grad else None, chunk_scale,
                           ignore_index, label_smoothing, z_loss, lse, stats)
        if grad_h is not None:
            torch.mm(logits, weight, out=grad_h[start:end])
        if grad_w is not None:
            _accumulate_mm(grad_w, logits.t(), h, first=start == 0)
        if grad_b is not None:
            if start == 0:
                torch.sum(logits, 0, dtype=grad_b.dtype, out=grad_b)
            else:
                grad_b += logits.sum(0, dtype=grad_b.dtype)


def _cast(t, dtype):
    return t.to(dtype) if t is not None else None


def _scaled(t, grad_output, dtype):
    return scaled(t, grad_output, dtype) if t is not None else None


def _new_grads(hidden, weight, bias, need, acc):
    """Uninitialised gradient buffers (no memset: the first chunk writes them with beta = 0). An empty batch
    has no first chunk: its gradients are zeros."""
    new = torch.empty if hidden.shape[0] else torch.zeros
    grad_h = new(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need[0] else None
    grad_w = new(weight.shape, dtype=acc, device=weight.device) if need[1] else None
    grad_b = new(bias.shape, dtype=acc, device=bias.device) if bias is not None and need[2] else None
    return grad_h, grad_w, grad_b


# -------------------------------------------------------------------------------------------- autograd
class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, ignore_index, reduction, label_smoothing, z_loss, rows,
                grad_enabled, want_extras, uniform_grad):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        need = tuple(n and grad_enabled for n in ctx.needs_input_grad[:3])  # True under no_grad otherwise
        loss = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        extras = torch.empty(3, hidden.shape[0], dtype=acc, device=hidden.device) if want_extras else None
        ctx.options = (ignore_index, reduction, label_smoothing, z_loss, rows, uniform_grad)
        ctx.dtype, ctx.param_dtype = hidden.dtype, weight.dtype
        # under autocast fp32 parameters meet bf16 activations: the GEMMs take a cast copy (as F.linear's would),
        # and the gradients go back in the parameters' fp32 straight from the fp32 accumulators (no cast pass)
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
        if (reduction == "none" and not uniform_grad) or not any(need):
            _chunk_loop(hidden, weight, bias, labels, scale, loss, None, ignore_index, label_smoothing, z_loss, rows,
                        extras)
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            grads = _new_grads(hidden, weight, bias, need, acc)
            _chunk_loop(hidden, weight, bias, labels, scale, loss, grads, ignore_index, label_smoothing, z_loss, rows,
                        extras)
            ctx.save_for_backward(labels, *grads)  # scaled in place by backward: a second backward fails loudly
        if extras is None:
            extras = loss.new_empty(3, 0)
        ctx.mark_non_differentiable(extras)
        if reduction == "none":
            return loss, extras
        return loss.sum() * scale, extras

    # Backward scales by grad_output without a host sync (``kernels._common.scaled``): in place, where a
    # grad_output of 1 (a plain ``loss.backward()``) moves no byte; for a bf16/fp16 weight, folded into the one
    # cast pass that writes its gradient from the accumulator. For reduction="none" every row has its own
    # grad_output, which does not factor out of ``g^T h``: the chunks are recomputed with it as the row scale,
    # unless ``uniform_grad`` promised one value for every non-ignored row (see the module docstring).
    @staticmethod
    def backward(ctx, grad_output, _grad_extras):
        ignore_index, reduction, label_smoothing, z_loss, rows, uniform_grad = ctx.options
        if reduction == "none" and not uniform_grad:
            hidden, weight, bias, labels = ctx.saved_tensors
            acc = torch.promote_types(hidden.dtype, torch.float32)
            grads = _new_grads(hidden, weight, bias, ctx.needs_input_grad[:3], acc)
            scratch = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
            _chunk_loop(hidden, weight, bias, labels, grad_output.to(acc).contiguous(), scratch, grads,
                        ignore_index, label_smoothing, z_loss, rows)
            grad_h, grad_w, grad_b = grads
            return grad_h, _cast(grad_w, ctx.param_dtype), _cast(grad_b, ctx.param_dtype), *(None,) * 10
        labels, grad_h, grad_w, grad_b = ctx.saved_tensors
        if reduction == "none":
            grad_output = _uniform_value(grad_output, labels, ignore_index)
        # scaled by grad_output with no host sync: nothing moves when it is 1 (the gradients stay in their fp32
        # accumulators for fp32 parameters), and for bf16/fp16 parameters the scaling rides on the one cast pass
        return (_scaled(grad_h, grad_output, ctx.dtype), _scaled(grad_w, grad_output, ctx.param_dtype),
                _scaled(grad_b, grad_output, ctx.param_dtype)) + (None,) * 10


def _uniform_value(grad_output: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The grad_output shared by every non-ignored row, as a 0-d tensor: NaN when two of them differ (checked on
    the device, no host sync). Ignored rows' values are free: their gradients are zero."""
    if labels.numel() == 0:  # no rows: no gradient to scale
        return grad_output.new_zeros(())
    valid = labels != ignore_index
    first = valid.to(torch.uint8).argmax().reshape(1)  # the first non-ignored row (row 0 if none)
    value = grad_output.index_select(0, first).squeeze(0)  # a 0-d index would read it on the host (a sync)
    differs = (valid & (grad_output != value)).any()
    return torch.where(differs, torch.nan, value)


# ---------------------------------------------------------------------------------------------- checks
# Under ``torch.autocast`` with fp32 weights (transformers' Trainer with bf16=True) the GEMMs use a bf16 copy of
# the weight made for the call, as ``F.linear`` would, and the fp32 weight gets its gradient straight from the
# fp32 accumulator (no bf16 rounding, no cast passes).
def _autocast_dtype(hidden: torch.Tensor) -> tuple[torch.dtype, bool]:
    """(the dtype the GEMMs run in, whether autocast is on). Under ``torch.autocast`` it is the autocast dtype, as
    ``F.linear``'s would be (fp32 weights with bf16 autocast: bf16 logits, fp32 loss): ``hidden`` gets a
    differentiable cast copy, and the weight and bias are cast inside the autograd function, whose gradients
    for them come back in their own (fp32) dtype. Without this, the chunk GEMMs would autocast while the
    ``out=`` products did not, and crash."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden.dtype, False
    dtype = torch.get_autocast_dtype(device_type)
    return (dtype if hidden.dtype in FLOAT_DTYPES else hidden.dtype), True  # float64 stays


def _check(hidden, weight, labels, bias, reduction, label_smoothing, z_loss, num_items_in_batch,
           chunk_budget_bytes) -> None:
    """Arguments of ``fused_linear_cross_entropy``."""
    dtypes = FLOAT_DTYPES + (torch.float64,)
    check_tensor(_FN, "hidden", hidden, ndim=(2, 3), dtypes=dtypes)
    check_tensor(_FN, "weight", weight, ndim=2, dtypes=dtypes)
    check_tensor(_FN, "labels", labels, ndim=hidden.dim() - 1, dtypes=_INT_DTYPES)
    if bias is not None:
        check_tensor(_FN, "bias", bias, ndim=1, dtypes=dtypes)
    check_same_device(_FN, hidden=hidden, weight=weight, labels=labels, bias=bias)
    dtype, autocast = _autocast_dtype(hidden)
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"{_FN}: hidden width {hidden.shape[-1]} does not match weight [V, H] = "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{_FN}: labels must have shape {tuple(hidden.shape[:-1])} to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(labels.shape)}")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"{_FN}: bias must have shape ({V},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):  # under autocast the function casts them itself
        if t is not None and t.dtype != dtype and not (autocast and t.dtype in FLOAT_DTYPES):
            raise TypeError(f"{_FN}: {name} dtype {t.dtype} must match hidden dtype {dtype}")
    check_options(_FN, reduction, label_smoothing, z_loss)
    if num_items_in_batch is not None and reduction == "none":
        raise ValueError(f"{_FN}: num_items_in_batch divides the summed loss; it cannot be combined with "
                         "reduction='none'")
    # a tensor num_items_in_batch is not checked: no host sync
    if isinstance(num_items_in_batch, (int, float)) and not num_items_in_batch > 0:
        raise ValueError(f"{_FN}: num_items_in_batch must be positive, got {num_items_in_batch}")
    if chunk_budget_bytes is not None and chunk_budget_bytes <= 0:
        raise ValueError(f"{_FN}: chunk_budget_bytes must be positive, got {chunk_budget_bytes}")


# --------------------------------------------------------------------------------------------- public
_COLLECTORS: list[list[torch.Tensor]] = []


@contextlib.contextmanager
def token_statistics() -> Iterator[list[torch.Tensor]]:
    """Inside the block, every ``fused_linear_cross_entropy`` call (e.g. the patched model's loss) also appends to
    the yielded list a device tensor ``[top-1 hits, entropy sum, tokens]`` over its non-ignored tokens: accuracy and
    entropy for a training log, from the kernel's first sweep (no logits, no host sync)."""
    collected: list[torch.Tensor] = []
    _COLLECTORS.append(collected)
    try:
        yield collected
    finally:
        _COLLECTORS.remove(collected)


class FusedLinearCrossEntropyOutput(NamedTuple):
    """What ``fused_linear_cross_entropy`` returns when any ``return_*`` flag is set. ``loss`` as without them
    (it includes the z-loss term); the others carry no gradient and are None unless asked for. With "mean" / "sum"
    / ``num_items_in_batch``: ``z_loss`` is the z-loss part of ``loss``, reduced as ``loss``; ``token_accuracy`` and
    ``entropy`` are means over the non-ignored tokens (0.0 when there are none). With ``reduction="none"``: per
    token, shaped like ``labels`` (0 on ignored tokens; ``token_accuracy`` is 1.0 where the label is the argmax)."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    chunk_budget_bytes: int | None = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_entropy: bool = False,
    uniform_grad: bool = False,
) -> torch.Tensor | FusedLinearCrossEntropyOutput:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, chunked (see the module docstring).

    ``hidden`` [N, H] or [B, T, H] with ``labels`` [N] or [B, T] (already shifted for a causal LM),
    ``weight`` [V, H] (may be a tied embedding), ``bias`` [V]. Returns an fp32 scalar, or fp32 losses shaped
    like ``labels`` for ``reduction="none"`` (float64 inputs give float64). As ``cross_entropy``: "mean" over
    labels that are all ``ignore_index`` is 0.0 with zero gradients, where PyTorch gives NaN. With
    ``return_z_loss`` / ``return_token_accuracy`` / ``return_entropy``: a ``FusedLinearCrossEntropyOutput``.
    ``uniform_grad`` (``reduction="none"`` only): see the module docstring.
    """
    _check(hidden, weight, labels, bias, reduction, label_smoothing, z_loss, num_items_in_batch, chunk_budget_bytes)
    if uniform_grad and reduction != "none":
        raise ValueError(f"{_FN}: uniform_grad=True applies to reduction='none' (the others are uniform already), "
                         f"got reduction={reduction!r}")
    hidden = hidden.to(_autocast_dtype(hidden)[0])
    V, H = weight.shape
    h2 = hidden.reshape(-1, H)
    y = labels.reshape(-1).contiguous()
    check_labels(_FN, y, V, ignore_index)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            scale = num_items_in_batch.to(device=hidden.device, dtype=acc).reciprocal()
        else:  # filled on the device: no host-to-device copy (allowed under CUDA-graph capture)
            scale = torch.full((), 1.0 / num_items_in_batch, dtype=acc, device=hidden.device)
    elif reduction == "mean":
        scale = mean_scale(y, ignore_index).to(acc)
    else:
        scale = torch.ones((), dtype=acc, device=hidden.device)
    budget = chunk_budget_bytes or DEFAULT_CHUNK_BUDGET_BYTES["cuda" if hidden.is_cuda else "cpu"]
    triton_path = hidden.dtype in FLOAT_DTYPES and use_triton(hidden)
    rows = chunk_rows(h2.shape[0], V, hidden.dtype, triton_path, budget)
    asked = return_z_loss or return_token_accuracy or return_entropy
    want_extras = asked or bool(_COLLECTORS)
    # inputs already cast: products stay as chosen; kernels launch on hidden's GPU
    with torch.autocast(hidden.device.type, enabled=False), on_device(hidden):
        loss, extras = _FusedLinearCrossEntropyFunction.apply(
            h2, weight, bias, y, scale, int(ignore_index), reduction, float(label_smoothing), float(z_loss), rows,
            torch.is_grad_enabled(), want_extras, uniform_grad)
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    if not want_extras:
        return loss
    lse, entropy, top1 = extras
    if _COLLECTORS:
        counts = torch.stack([top1.sum(), entropy.sum(), (y != ignore_index).sum().to(acc)])
        for collected in _COLLECTORS:
            collected.append(counts)
    if not asked:
        return loss
    # only what was asked for is computed (TRL's head asks for entropy and accuracy every step, never z-loss)
    if reduction == "none":
        shape = labels.shape
        return FusedLinearCrossEntropyOutput(
            loss,
            (float(z_loss) * lse * lse).reshape(shape) if return_z_loss else None,
            top1.reshape(shape) if return_token_accuracy else None,
            entropy.reshape(shape) if return_entropy else None,
        )
    token_mean = mean_scale(y, ignore_index).to(acc) if return_token_accuracy or return_entropy else None
    return FusedLinearCrossEntropyOutput(
        loss,
        float(z_loss) * (lse * lse).sum() * scale if return_z_loss else None,
        top1.sum() * token_mean if return_token_accuracy else None,
        entropy.sum() * token_mean if return_entropy else None,
    )


# ------------------------------------------------------------------------------------------- reference
def fused_linear_cross_entropy_reference(
    hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
    num_items_in_batch=None,
):
    """Unfused reference: full logits with ``F.linear``, then ``cross_entropy_reference``."""
    logits = torch.nn.functional.linear(hidden, weight, bias).flatten(0, -2)
    y = labels.reshape(-1)
    if num_items_in_batch is not None:
        return cross_entropy_reference(logits, y, ignore_index, "sum", label_smoothing, z_loss) / num_items_in_batch
    loss = cross_entropy_reference(logits, y, ignore_index, reduction, label_smoothing, z_loss)
    return loss.reshape(labels.shape) if reduction == "none" else loss


# ------------------------------------------------------------------------------------------ inspection
def kernel_specs(shape: dict) -> list:
    """The cross-entropy kernel as this module launches it on each chunk, and the scaling kernels of its
    backward (the GEMMs are cuBLAS); derived from those modules' launch arguments."""
    rows = chunk_rows(shape["tokens"], shape["vocab"], spec_dtype(shape), True, DEFAULT_CHUNK_BUDGET_BYTES["cuda"])
    spec = fused_kernel_spec(shape)
    scaling = [dataclasses.replace(s, name=f"{_FN}.{s.name}") for s in scale_kernel_specs(spec_dtype(shape))]
    return [dataclasses.replace(spec, name=f"{_FN}.{spec.name}", config=f"{spec.config} chunk={rows} rows"), *scaling]
