"""The patched training model: ``patch`` / ``unpatch`` / ``load`` (fused kernels in transformers' Qwen2/2.5/3),
FSDP2 wrapping, the reasoning chat formats and the model shapes (``s1fast.model.shapes``)."""

from s1fast.model.patch import load, patch, patched, unpatch

__all__ = ["load", "patch", "patched", "unpatch"]
