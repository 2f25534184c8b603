"""s1fast: fused Triton kernels, a patched Qwen model, budget-forced decoding and the s1 SFT recipe.

Subpackages: ``s1fast.kernels`` (Triton kernels + PyTorch references), ``s1fast.model`` (Qwen patching,
KV-cache decoder), ``s1fast.train`` (s1 SFT recipe), ``s1fast.bench`` (benchmarks, inspection, evaluation).
Data flows one way: kernels <- model <- train / bench.
"""

__version__ = "0.1.0"
