"""s1fast: fused Triton kernels, a patched Qwen model, budget-forced decoding and the s1 SFT recipe.

Subpackages: ``s1fast.kernels`` (Triton kernels + PyTorch references), ``s1fast.model`` (the patched training
model, chat formats, shapes), ``s1fast.decode`` (KV-cache decoder, engine, budget forcing, generate, serve),
``s1fast.train`` (s1 SFT recipe), ``s1fast.eval`` (test-time-scaling evaluation, grading), ``s1fast.bench``
(benchmarks, inspection). Data flows one way: kernels <- model <- decode, train <- eval, bench.
"""

__version__ = "0.1.0"
