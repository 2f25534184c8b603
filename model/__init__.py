"""The patched training model: ``patch`` / ``unpatch`` / ``load`` (fused kernels in transformers' Qwen2/2.5/3),
FSDP2 wrapping, the reasoning chat formats and the model shapes (``s1fast.model.shapes``); the same layers as
transformers Hub kernels (``s1fast.model.hub_kernels``)."""

from s1fast.model.patch import load, patch, unpatch

__all__ = ["load", "patch", "unpatch"]
