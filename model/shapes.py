"""Qwen2.5 model shapes (ANCHORS.md) and random-initialised models of any shape (no weights are downloaded).

``kernel_specs(shape)`` in each kernel module, the benchmarks and ``s1fast env`` take these dicts.
"""

from __future__ import annotations

import torch

QWEN25_SHAPES: dict[str, dict] = {
    "0.5B": dict(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64, intermediate=4864, vocab=151936, tied=True),
    "1.5B": dict(
        layers=28, hidden=1536, heads=12, kv_heads=2, head_dim=128, intermediate=8960, vocab=151936, tied=True
    ),
    "7B": dict(
        layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064, tied=False
    ),
    "32B": dict(
        layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=27648, vocab=152064, tied=False
    ),
}


# The tests' and ``s1fast env``'s tiny shape: every dimension small but none equal to another, GQA (2 query heads per
# key/value head), so a transposed or mixed-up axis changes a shape instead of passing silently.
TINY: dict = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=300, tied=True)


def random_qwen(shape: dict, *, device: str | torch.device = "cpu", arch: str = "qwen2", layers: int | None = None,
                dtype: torch.dtype = torch.float32, seed: int = 0, random_norms: bool = False,
                max_positions: int = 32768, attn: str = "sdpa", use_cache: bool = False, **config):
    """A random-initialised (``seed``) transformers ``Qwen2ForCausalLM`` (``Qwen3ForCausalLM`` with
    ``arch="qwen3"``) of a ``QWEN25_SHAPES``-style dict (``layers`` overrides its depth), with Qwen2.5's RMSNorm
    eps and rope theta; ``config`` overrides further transformers config fields (e.g. ``rope_theta``).

    The one builder of random models: the CPU demo, the benchmarks, ``s1fast env`` and the tests use it.
    ``random_norms`` draws the norm weights from U(0.5, 1.5) and the biases from N(0, 0.1) (their defaults, ones and
    zeros, would hide a kernel that ignores them), before the cast to ``dtype`` so every dtype gets the same weights.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    archs = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    if arch not in archs:
        raise ValueError(f"random_qwen: arch must be one of {sorted(archs)}, got {arch!r}")
    config_cls, model_cls = archs[arch]
    fields = dict(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"] if layers is None else layers, num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], vocab_size=shape["vocab"],
        tie_word_embeddings=shape["tied"], rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=max_positions,
        attn_implementation=attn, use_cache=use_cache,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config_cls(**{**fields, **config}))
    if random_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                elif name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    return model.to(dtype)
