"""Qwen model wrapper (patching with the fused kernels) and the KV-cache decoder with budget forcing."""

from s1fast.model.budget import BudgetForcing
from s1fast.model.decoder import Decoder, GenerationResult
from s1fast.model.patch import load, patch, unpatch

__all__ = ["BudgetForcing", "Decoder", "GenerationResult", "load", "patch", "unpatch"]
