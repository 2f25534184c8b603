"""Random-initialised tiny Qwen2 / Qwen3 causal LMs and batches for the patch tests (no weights are downloaded).

Shared by tests/test_patch.py, tests/test_patch_fsdp.py and the torchrun worker tests/fsdp_worker.py, so every
process builds bit-identical models from the same seed.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

VOCAB = 300
_ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny_config(arch: str = "qwen2", *, tied: bool = True, layers: int = 2, attn: str = "sdpa", **overrides):
    config_cls, _ = _ARCHS[arch]
    fields = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=tied, attn_implementation=attn,
        # std 0.1 rather than 0.02: logits spread over a few units, so the softmax is far from uniform
        initializer_range=0.1,
    )  # fmt: skip
    return config_cls(**{**fields, **overrides})


def tiny_model(arch: str = "qwen2", *, tied: bool = True, seed: int = 0, dtype=torch.float32, **config):
    """A train-mode model whose norm weights and biases are random too (their defaults, ones and zeros, would
    hide a kernel that ignores them)."""
    torch.manual_seed(seed)
    model = _ARCHS[arch][1](tiny_config(arch, tied=tied, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.to(dtype).train()


def random_batch(batch: int, tokens: int, *, seed: int = 1, prompt: int = 3):
    """input_ids and labels [batch, tokens]: labels are the ids with the first ``prompt`` tokens of each row
    and about 15% of the rest set to -100."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, tokens), generator=g)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[torch.rand(batch, tokens, generator=g) < 0.15] = -100
    return input_ids, labels
