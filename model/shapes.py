"""Qwen2.5 model shapes (ANCHORS.md) and random-initialised models of any shape (no weights are downloaded).

``kernel_specs(shape)`` in each kernel module, the benchmarks and ``s1fast env`` take these dicts.
"""

from __future__ import annotations

import torch

QWEN25_SHAPES: dict[str, dict] = {
    "0.5B": dict(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64, intermediate=4864, vocab=151936, tied=True),
    "1.5B": dict(layers=28, hidden=1536, heads=12, kv_heads=2, head_dim=128, intermediate=8960, vocab=151936, tied=True),
    "7B": dict(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064, tied=False),
    "32B": dict(layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=27648, vocab=152064, tied=False),
}


def random_qwen2(shape: dict, *, device: str | torch.device, layers: int | None = None, dtype: torch.dtype = torch.float32,
                 max_positions: int = 32768, use_cache: bool = False, arch: str = "qwen2"):
    """A random-initialised (seed 0) transformers ``Qwen2ForCausalLM`` (or ``Qwen3ForCausalLM`` with
    ``arch="qwen3"``) of a ``QWEN25_SHAPES``-style dict (``layers`` overrides its depth), with Qwen2.5's RMSNorm
    eps and rope theta, SDPA attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    archs = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    if arch not in archs:
        raise ValueError(f"random_qwen2: arch must be one of {sorted(archs)}, got {arch!r}")
    config_cls, model_cls = archs[arch]
    config = config_cls(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"] if layers is None else layers, num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], vocab_size=shape["vocab"],
        tie_word_embeddings=shape["tied"], rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=max_positions,
        attn_implementation="sdpa", use_cache=use_cache,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return model_cls(config).to(dtype)
