"""Decoding: the KV-cache decoder, the request engine (continuous batching), budget forcing, ``s1fast generate`` and
``s1fast serve``."""

from s1fast.decode.budget import BudgetForcing
from s1fast.decode.decoder import Decoder, GenerationResult
from s1fast.decode.engine import Engine

__all__ = ["BudgetForcing", "Decoder", "Engine", "GenerationResult"]
