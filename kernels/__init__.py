"""Fused Triton kernels for Qwen training and decoding, exact to PyTorch, forward and backward.

One file per kernel; each holds the Triton kernel(s), launcher, autograd Function, functional API and a
plain-PyTorch reference of the same function (``*_reference``). See ``_common`` for the dispatch rule.
"""

from s1fast.kernels._common import force_backend, interpreting
from s1fast.kernels.decode_attention import decode_attention, decode_attention_reference
from s1fast.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from s1fast.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from s1fast.kernels.rms_norm import RMSNorm, rms_norm, rms_norm_reference
from s1fast.kernels.rope import apply_rope, apply_rope_reference
from s1fast.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "RMSNorm",
    "apply_rope",
    "apply_rope_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "decode_attention",
    "decode_attention_reference",
    "force_backend",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "interpreting",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
]
