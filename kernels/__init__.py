"""Fused Triton kernels for Qwen training and decoding, exact to PyTorch, forward and backward.

One file per kernel, each in one order: the math (module docstring), tuning constants with their reasons,
``_config``, the Triton kernels, the launch arguments (``_*_args``) and launchers (``_launch_*``), the autograd
Function (``_XxxFunction``), ``_check``, the public function, the plain-PyTorch ``*_reference`` and
``kernel_specs`` (built from the launchers' own ``_*_args`` by ``_common.launch_spec``). Pointer arguments are
named ``*_ptr``. See ``_common`` for the dispatch rule.
"""

if __name__ == "kernels":
    # This folder was imported as a top-level ``kernels`` because the repository root is on sys.path (``python -m``,
    # pytest, or a script or notebook started there). ``kernels`` is also Hugging Face's Hub-kernels package, which
    # transformers >= 5.25 imports: hand the name over to the installed distribution, found on sys.path without the
    # repository root. Without one, the module stays empty (transformers then reads the Hub kernels as absent).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _installed  # the import statement returns what sys.modules holds at its end
        _spec.loader.exec_module(_installed)
else:
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
