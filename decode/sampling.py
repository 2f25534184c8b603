"""Sampling the next token of each row on the device, inside a decode step's CUDA graph: greedy, or temperature
with top-k / top-p (transformers' rules: temperature, then top-k, then top-p on what is left), every row with its
own settings and its own random stream.

A request's settings are a ``Sampling``; on the device, per cache row, they are one fp32 row ``(temperature,
0 for greedy; top_k or 0; 1 - top_p or 0)`` and an int64 key. Draws are ``s1fast.kernels.gumbel_argmax``:
counter-based noise hashed from (key, position of the token, token id), so a request's tokens depend on its
seed only, never on the batch, the admission order or a preemption, and there is no generator state for a graph
to capture. ``request_key(seed, stream)`` makes the key: ``Decoder.generate`` gives prompt ``i`` stream ``i``;
without a seed every request draws a fresh random key.

Modes (``Sampling.mode``; a step runs the highest of its rows', each mode its own CUDA graph): GREEDY is one
argmax; TEMPERATURE one fused kernel (greedy rows inside it take their argmax); FILTERED adds the top-k / top-p
mask, which sorts each row once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch

from s1fast.kernels import gumbel_argmax

GREEDY, TEMPERATURE, FILTERED = 0, 1, 2


def request_key(seed: int | None, stream: int = 0) -> int:
    """A request's random key (below 2^62): from ``(seed, stream)`` (two seeds or two streams never share one),
    or at random without a seed."""
    if seed is None:
        return secrets.randbits(62)
    return int.from_bytes(hashlib.blake2b(f"{seed} {stream}".encode(), digest_size=8).digest(), "little") >> 2


@dataclass(frozen=True)
class Sampling:
    """How one request draws its tokens (checked by ``s1fast.decode.params.SamplingParams``)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    key: int = 0  # request_key(seed, stream)

    @property
    def mode(self) -> int:
        if self.temperature == 0:
            return GREEDY
        return FILTERED if self.top_k is not None or (self.top_p is not None and self.top_p < 1) else TEMPERATURE

    def row(self) -> tuple[float, float, float]:
        """The device row: (temperature, 0: greedy; top_k, 0: off; 1 - top_p, 0: off)."""
        if self.temperature == 0:
            return 0.0, 0.0, 0.0
        return self.temperature, float(self.top_k or 0), 0.0 if self.top_p is None else 1.0 - self.top_p


def sample(logits: torch.Tensor, params: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
           mode: int) -> torch.Tensor:
    """Next token of each row of ``logits`` [n, V] with its settings ``params`` [n, 3] (``Sampling.row``), key
    ``keys`` [n] and the position its token goes to ``positions`` [n]; ``mode`` at least every row's. No host
    sync and no new shapes: safe inside a CUDA graph."""
    if mode == GREEDY:
        return logits.argmax(-1)
    if mode == FILTERED:
        logits = _top_k_top_p(logits, params)
    temperature = params[:, 0]
    return gumbel_argmax(logits, torch.where(temperature > 0, 1 / temperature, 0.0), keys, positions)


def _top_k_top_p(logits: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """``logits`` (fp32, fp64 for fp64) with what top-k and then top-p drop, on the temperature-scaled logits as
    transformers' TopKLogitsWarper / TopPLogitsWarper (ties at the k-th value kept; the top token always kept),
    set to -inf. Greedy rows and rows without a filter keep every token."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    V = x.shape[-1]
    temperature = params[:, 0:1].to(x.dtype)
    ordered, order = (x / torch.where(temperature > 0, temperature, 1.0)).sort(dim=-1)  # ascending
    k = params[:, 1:2].long()
    kth = ordered.gather(1, V - torch.where((k < 1) | (k > V), V, k))
    ordered = ordered.masked_fill(ordered < kth, -torch.inf)
    drop = ordered.softmax(-1).cumsum(-1) <= params[:, 2:3].to(x.dtype)  # 1 - top_p; 0 drops no mass
    drop[:, -1] = False
    return x.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), -torch.inf)
