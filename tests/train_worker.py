"""A small, fast s1fast training run for the trainer tests, in-process or as a subprocess (alone or under torchrun).

Tiny random Qwen2 (vocab 512) on synthetic examples shaped like s1's (a masked prompt, then trained tokens),
so the tests exercise the trainer, not the vocabulary projection. Every process builds the same model and data
from the seeds.

    python tests/train_worker.py OUTPUT_DIR [--max-steps N] [--save-every K] [--sleep S] [--resume]
    torchrun --nproc-per-node 2 tests/train_worker.py OUTPUT_DIR ...

Losses land in OUTPUT_DIR/log.jsonl (the trainer's log).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from s1fast.train.data import IGNORE_INDEX, Dataset

VOCAB = 512


def tiny_model(seed: int = 0, attn: str = "sdpa", patched: bool = True, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from s1fast.model.patch import patch

    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=VOCAB, max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=True,
        attn_implementation=attn, initializer_range=0.1,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # non-trivial norm weights and biases (ones / zeros would hide mistakes)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model = model.to(dtype)  # after the random draws, so every dtype gets the same weights
    return patch(model) if patched else model


def synthetic_examples(n: int, seed: int = 1, lo: int = 8, hi: int = 48) -> list[dict]:
    """Examples of random lengths: a masked prompt (about a third), then trained tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        prompt = max(1, length // 3)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def synthetic_dataset(n: int = 24, seed: int = 1) -> Dataset:
    examples = synthetic_examples(n, seed)
    return Dataset(examples, list(range(n)), [])


def config(output_dir: str, **overrides):
    from s1fast.train.trainer import TrainConfig

    fields = dict(output_dir=output_dir, epochs=2, global_batch=4, lr=3e-3, param_dtype="float32",
                  micro_batch_tokens=64, progress=False)
    return TrainConfig(**{**fields, **overrides})


def main(argv: list[str] | None = None) -> int:
    from s1fast.train.trainer import Trainer, init_distributed, latest_checkpoint

    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after each step (gives a test time to kill)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    init_distributed("cpu")
    trainer = Trainer(tiny_model(), synthetic_dataset(), config(args.output_dir, max_steps=args.max_steps,
                      save_every=args.save_every), device=torch.device("cpu"))
    if args.resume:
        trainer.load_checkpoint(latest_checkpoint(args.output_dir))
    trainer.fit(on_step=lambda step, record: time.sleep(args.sleep))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())
