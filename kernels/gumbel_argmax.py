r"""Sampling by the Gumbel-max trick with counter-based noise: one token per row, fused, graph-safe.

For row ``r`` with logits ``x``, inverse temperature ``beta`` (0: greedy), random key ``k`` and sequence position
``p`` (where the sampled token goes), with ``U_v = u(k, p, v)`` uniform in (0, 1)::

    token = argmax_v  beta * x_v + G_v,   G_v = -log(-log U_v)      (beta > 0)
    token = argmax_v  x_v                                            (beta = 0)

``G_v`` is standard Gumbel noise, so ``token`` is drawn with probability ``softmax(beta * x)_v`` (no softmax is
computed: the normaliser does not move the argmax). Tokens whose logit is ``-inf`` (filtered) are never drawn.

Noise ``u(k, p, v)``: integer hashing, the same bits on every device and in every batch (``lowbias32``, C. Wellons'
32-bit bijection ``mix``, on 32-bit words; ``+`` and ``*`` mod 2^32)::

    s = mix(mix(k mod 2^32) ^ (k >> 32));   s = mix(s ^ (p mod 2^32))          per row
    h = mix(mix(s ^ (v * 0x9E3779B9)) + s)                                       per token (a Weyl sequence in v)
    U = ((h >> 9) + 1/2) / 2^23                                                  23 bits: exact in fp32, never 0 or 1

A request's draws depend only on its key and its positions: not on the batch, the admission order or a
preemption (a recomputed token gets the same noise), and there is no generator state for a CUDA graph to capture.

Plan: grid ``(rows, ceil(V / BLOCK))``; each program hashes its tile, takes the best ``(value, index)`` and writes
it to ``[rows, tiles]`` partials; the winner per row is one ``argmax`` + ``gather`` over the partials (first index
on ties, as ``torch.argmax``). Bytes: the logits read once (``2 V`` per bf16 row; the minimum) plus 20 per row of
settings, and 12 written per tile; the noise is computed, not read. The reference computes the same words in
int64 (a 32-bit product split in 16-bit halves so that nothing overflows).
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

_FN = "gumbel_argmax"
# Tokens per program: 1,024 x fp32 is 8 per thread at 4 warps (two 128-bit loads); Qwen's 151,936-token vocabulary
# is then 149 programs per row, more than an H100's 132 SMs even at batch 1 (chosen, not tuned on a GPU).
_BLOCK = 1024
_WARPS = 4
_WEYL = 0x9E3779B9  # 2^32 / golden ratio: consecutive token ids land far apart before hashing
_MIX = (0x21F0AAAD, 0xD35A2D97)  # lowbias32's multipliers (shifts 16, 15, 15)
_UNIT = 1.0 / (1 << 23)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _mix(x):
    """lowbias32 on uint32 words (wrapping products)."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0xD35A2D97
    x ^= x >> 15
    return x


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr, beta_ptr, keys_ptr, positions_ptr, best_ptr, index_ptr,
    stride_logits, V, tiles,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    x = tl.load(logits_ptr + row * stride_logits + cols, mask=mask, other=-float("inf")).to(tl.float32)
    beta = tl.load(beta_ptr + row)
    key = tl.load(keys_ptr + row)
    pos = tl.load(positions_ptr + row)
    s = _mix(_mix((key & 0xFFFFFFFF).to(tl.uint32)) ^ (key >> 32).to(tl.uint32))
    s = _mix(s ^ (pos & 0xFFFFFFFF).to(tl.uint32))
    h = _mix(_mix(s ^ (cols.to(tl.uint32) * 0x9E3779B9)) + s)
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    g = -tl.log(-tl.log(u))
    sampled = beta > 0
    val = x * tl.where(sampled, beta, 1.0) + tl.where(sampled, g, 0.0)  # greedy: x itself
    val = tl.where(mask, val, -float("inf"))
    best, i = tl.max(val, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(best_ptr + row * tiles + tile, best)
    tl.store(index_ptr + row * tiles + tile, (tile * BLOCK + i).to(tl.int64))


# ------------------------------------------------------------------------------ launch arguments, launchers
def _args(logits, beta, keys, positions, best, index) -> list:
    """The kernel's runtime arguments in order (shared by the launcher and ``kernel_specs``)."""
    return [logits, beta, keys, positions, best, index, logits.stride(0), logits.shape[1], best.shape[1]]


def _launch(logits, beta, keys, positions) -> torch.Tensor:
    rows, V = logits.shape
    tiles = triton.cdiv(V, _BLOCK)
    best = torch.empty(rows, tiles, dtype=torch.float32, device=logits.device)
    index = torch.empty(rows, tiles, dtype=torch.int64, device=logits.device)
    _gumbel_argmax_kernel[(rows, tiles)](*_args(logits, beta, keys, positions, best, index), BLOCK=_BLOCK,
                                         num_warps=_WARPS)
    return index.gather(1, best.argmax(1, keepdim=True))[:, 0]


# ---------------------------------------------------------------------------------------------- checks
def _check(logits, beta, keys, positions) -> None:
    check_tensor(_FN, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(_FN, "beta", beta, ndim=1, dtypes=(torch.float32,))
    check_tensor(_FN, "keys", keys, ndim=1, dtypes=(torch.int64,))
    check_tensor(_FN, "positions", positions, ndim=1, dtypes=(torch.int64,))
    check_same_device(_FN, logits=logits, beta=beta, keys=keys, positions=positions)
    rows = logits.shape[0]
    for name, t in (("beta", beta), ("keys", keys), ("positions", positions)):
        if t.shape[0] != rows:
            raise ValueError(f"{_FN}: {name} must have one entry per logits row ({rows}), got {t.shape[0]}")
    if logits.shape[1] == 0:
        raise ValueError(f"{_FN}: logits must have at least one column, got shape {tuple(logits.shape)}")


# --------------------------------------------------------------------------------------------- public
def gumbel_argmax(logits: torch.Tensor, beta: torch.Tensor, keys: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` [rows, V]: drawn from ``softmax(beta * logits)`` with the noise of
    ``(keys, positions)`` (int64 [rows]; keys below 2^63, positions below 2^32), or the argmax where ``beta``
    (fp32 [rows]) is 0. Returns int64 [rows]. No host sync; Triton on CUDA (and under ``TRITON_INTERPRET=1``),
    ``gumbel_argmax_reference`` otherwise and for float64 logits."""
    _check(logits, beta, keys, positions)
    if logits.dtype == torch.float64 or not use_triton(logits):
        return gumbel_argmax_reference(logits, beta, keys, positions)
    with on_device(logits):
        return _launch(unit_last(logits), beta.contiguous(), keys.contiguous(), positions.contiguous())


# ------------------------------------------------------------------------------------------- reference
_M32 = 0xFFFFFFFF


def _mul32_(x: torch.Tensor, c: int, tmp: torch.Tensor) -> None:
    """``x <- x * c mod 2^32`` in place for words ``x`` in int64, without overflow (c split in 16-bit halves)."""
    torch.mul(x, c >> 16, out=tmp).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    x.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_M32)


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 words, in place (in place: 4x faster on CPU than fresh tensors per step)."""
    tmp = torch.empty_like(x)
    for shift, c in ((16, _MIX[0]), (15, _MIX[1]), (15, None)):
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=tmp))
        if c is not None:
            _mul32_(x, c, tmp)
    return x


def gumbel_noise_reference(keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """The uniform noise ``U`` [rows, vocab] (fp32, in (0, 1)) of the module docstring."""
    s = _mix_(_mix_(keys & _M32) ^ (keys >> 32))
    s = _mix_(s ^ (positions & _M32))[:, None]
    h = (torch.arange(vocab, device=keys.device) * _WEYL).bitwise_and_(_M32) ^ s
    _mix_(_mix_(h).add_(s).bitwise_and_(_M32))
    return h.bitwise_right_shift_(9).to(torch.float32).add_(0.5).mul_(_UNIT)


def gumbel_argmax_reference(logits: torch.Tensor, beta: torch.Tensor, keys: torch.Tensor,
                            positions: torch.Tensor) -> torch.Tensor:
    """``gumbel_argmax`` in plain PyTorch (fp32, or fp64 for fp64 logits)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    sampled = (beta > 0)[:, None]
    g = gumbel_noise_reference(keys, positions, x.shape[1]).log_().neg_().log_().neg_().masked_fill_(~sampled, 0.0)
    return (x * torch.where(sampled, beta[:, None], 1.0).to(x.dtype)).add_(g).argmax(-1)


# ------------------------------------------------------------------------------------------ inspection
def kernel_specs(shape: dict) -> list[KernelSpec]:
    """The kernel as the launcher runs it on ``[shape["tokens"], shape["vocab"]]`` logits of ``shape["dtype"]``
    (the decoder's lm_head output)."""
    rows, V = shape["tokens"], shape["vocab"]
    tiles = triton.cdiv(V, _BLOCK)
    meta = dict(device="meta")
    logits = torch.empty(rows, V, dtype=spec_dtype(shape), **meta)
    beta = torch.empty(rows, dtype=torch.float32, **meta)
    keys = torch.empty(rows, dtype=torch.int64, **meta)
    best = torch.empty(rows, tiles, dtype=torch.float32, **meta)
    index = torch.empty(rows, tiles, dtype=torch.int64, **meta)
    return [launch_spec("gumbel_argmax", _gumbel_argmax_kernel, _args(logits, beta, keys, keys, best, index),
                        {"BLOCK": _BLOCK}, _WARPS, config=f"BLOCK={_BLOCK} warps={_WARPS}")]
