"""SFT recipe benchmark: s1fast's trainer on s1K-shaped data, patched vs unpatched, and the projected wall time of
s1's 5 epochs.

    python -m s1fast.bench.sft [--device cuda] [--quick] [--json]

GPU: random-initialised Qwen2.5-0.5B and 1.5B shapes (all layers, full vocabulary), the recipe as
``s1fast train`` runs it on one GPU: FSDP2 over one rank with fp32 master weights and bf16 compute, AdamW,
global batch 16 examples, block size 32768 (no example cut), gradient checkpointing, micro-batches as the
trainer packs them (one example per row with sdpa, packed rows with flash-attn). Example lengths are drawn
from s1K's distribution (mean about 4.7K tokens, longest about 9.1K; a gamma law clipped to [512, 9100]) and,
for s1K-1.1 on 1.5B, from a wider one (mean 10K, up to 26K). Each row: ``tokens_per_s`` over the timed steps
(after one warm-up step that allocates the optimizer state), ``step_s``, ``peak_mem_mib`` (CUDA allocator peak
over the timed steps: weights, AdamW state, activations, logits), and ``projected_5_epochs_min`` = 5 x the
dataset's tokens (s1K: 1000 x 4.7K = 23.5M for 5 epochs) / tokens_per_s. The target: under 26 minutes for
1.5B on one H100. CPU / quick: a tiny Qwen2 shape with the full vocabulary and short examples (mean 160
tokens), fp32; its projection is of that tiny model, only there to run the same code path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch

from s1fast.bench.common import synchronize
from s1fast.commands import default_device
from s1fast.env import environment
from s1fast.model.patch import patch
from s1fast.model.shapes import QWEN25_SHAPES, TINY, random_qwen
from s1fast.train.data import IGNORE_INDEX, Dataset
from s1fast.train.trainer import TrainConfig, Trainer, init_distributed

# name: (examples in the real dataset, mean tokens, longest tokens)
DATASETS = {"s1K": (1000, 4700, 9100), "s1K-1.1": (1000, 10000, 26000), "tiny": (320, 160, 400)}
EPOCHS = 5


def synthetic_lengths(n: int, mean: int, longest: int, seed: int = 0) -> list[int]:
    """``n`` example lengths from a gamma law (shape 4) with the given mean, clipped to [mean / 8, longest]."""
    draws = np.random.default_rng(seed).gamma(4.0, mean / 4.0, n)
    return np.clip(np.round(draws), mean // 8, longest).astype(int).tolist()


def synthetic_dataset(lengths: list[int], vocab: int, seed: int = 0) -> Dataset:
    """Random token examples of the given lengths; the first tenth (the prompt) is not trained, as in s1K."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        prompt = max(1, n // 10)
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return Dataset(examples, list(range(len(examples))), [])


def measure(shape: dict, layers: int, dataset_name: str, patched: bool, device: torch.device,
            steps: int) -> dict:
    n_real, mean, longest = DATASETS[dataset_name]
    global_batch = 16
    cuda = device.type == "cuda"
    lengths = synthetic_lengths(global_batch * (steps + 1), mean, longest)
    dataset = synthetic_dataset(lengths, shape["vocab"])
    lm = random_qwen(shape, device=device, layers=layers)
    if patched:
        patch(lm)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            out=out, global_batch=global_batch, param_dtype="bf16" if cuda else "fp32",
            gradient_checkpointing=cuda, micro_batch_tokens=32768, pack=not cuda, progress=False,
        )
        trainer = Trainer(lm, dataset, config, device=device)
        batches = [
            [dataset.examples[i] for i in range(k * global_batch, (k + 1) * global_batch)] for k in range(steps + 1)
        ]
        try:
            trainer.train_step(batches[0])  # warm-up: allocates AdamW's state
            synchronize(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for batch in batches[1:]:
                t0 = time.perf_counter()
                trainer.train_step(batch)
                synchronize(device)
                times.append(time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            return {"error": "out of memory"}
        finally:
            del trainer, lm
            if cuda:
                torch.cuda.empty_cache()
    tokens = sum(lengths[global_batch:])
    tokens_per_s = tokens / sum(times)
    row = {"tokens_per_s": tokens_per_s, "step_s": statistics.median(times), "timed_steps": steps,
           "mean_example_tokens": mean, "longest_example_tokens": longest,
           "projected_5_epochs_min": EPOCHS * n_real * mean / tokens_per_s / 60}
    if cuda:
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def run(*, device: str, quick: bool, peers: list[str], headline: bool = False) -> Iterator[dict]:
    """Yields one row per (model, dataset, patched/unpatched) as it is measured. ``peers`` does not apply (the
    unpatched model is the peer); ``headline``: 1.5B on s1K only, 2 timed steps (on GPU)."""
    _, _, dev = init_distributed(device)
    env = environment(device)
    if dev.type == "cuda":
        grid = ([("0.5B", "s1K")] if quick else [("1.5B", "s1K")] if headline
                else [("0.5B", "s1K"), ("1.5B", "s1K"), ("1.5B", "s1K-1.1")])
        cases = [(m, QWEN25_SHAPES[m], QWEN25_SHAPES[m]["layers"], d) for m, d in grid]
        steps = 2 if quick or headline else 3
    else:
        # a smoke test of the measurement on CPU: TINY's small vocabulary keeps it to seconds (a Qwen vocabulary's
        # projection would dominate and take most of a minute)
        cases = [("tiny", TINY, 2, "tiny")]
        steps = 1 if quick else 2
    for model_name, shape, layers, dataset_name in cases:
        results = {}
        for patched in (False, True):
            r = measure(shape, layers, dataset_name, patched, dev, steps)
            results[patched] = r
            row = {
                "bench": "sft",
                "model": model_name,
                "dataset": dataset_name,
                "impl": "s1fast" if patched else "unpatched",
                "global_batch": 16,
                "block_size": 32768,
                **r,
                **env,
            }
            if patched and "tokens_per_s" in r and "tokens_per_s" in results[False]:
                row["speedup_vs_unpatched"] = r["tokens_per_s"] / results[False]["tokens_per_s"]
                if "peak_mem_mib" in r:
                    row["peak_mem_vs_unpatched"] = r["peak_mem_mib"] / results[False]["peak_mem_mib"]
            yield row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m s1fast.bench.sft",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default=default_device())
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    rows = list(run(device=args.device, quick=args.quick, peers=[]))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            stats = (
                (
                    f"{r['tokens_per_s']:>10,.0f} tok/s  step {r['step_s']:.2f}s  "
                    f"5 epochs {r['projected_5_epochs_min']:.1f} min"
                    + (f"  peak {r['peak_mem_mib']:,.0f} MiB" if "peak_mem_mib" in r else "")
                )
                if "error" not in r
                else r["error"]
            )
            print(f"{r['model']:>5} {r['dataset']:>8} {r['impl']:>9}: {stats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
