"""Fused Triton kernels for Qwen training and decoding, exact to PyTorch, forward and backward.

One file per kernel, each in one order: the math (module docstring), tuning constants with their reasons,
``_config``, the Triton kernels, the launch arguments (``_*_args``) and launchers (``_launch_*``), the autograd
Function (``_XxxFunction``), ``_check``, the public function, the plain-PyTorch ``*_reference`` and
``kernel_specs`` (built from the launchers' own ``_*_args`` by ``_common.launch_spec``). Pointer arguments are
named ``*_ptr``. See ``_common`` for the dispatch rule.
"""

from s1fast.kernels._common import force_backend, interpreting
from s1fast.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from s1fast.kernels.decode_attention import decode_attention, decode_attention_reference
from s1fast.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from s1fast.kernels.gumbel_argmax import gumbel_argmax, gumbel_argmax_reference
from s1fast.kernels.rms_norm import RMSNorm, add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from s1fast.kernels.rope import apply_rope, apply_rope_reference
from s1fast.kernels.rope_kv_write import rope_kv_write, rope_kv_write_reference
from s1fast.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "RMSNorm",
    "add_rms_norm",
    "add_rms_norm_reference",
    "apply_rope",
    "apply_rope_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "decode_attention",
    "decode_attention_reference",
    "force_backend",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "gumbel_argmax",
    "gumbel_argmax_reference",
    "interpreting",
    "rms_norm",
    "rms_norm_reference",
    "rope_kv_write",
    "rope_kv_write_reference",
    "swiglu",
    "swiglu_reference",
]
