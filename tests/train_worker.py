"""A small, fast s1fast training run for the trainer tests, in-process or as a subprocess (alone or under torchrun).

Tiny random Qwen2 (vocab 512) on synthetic examples shaped like s1's (a masked prompt, then trained tokens),
so the tests exercise the trainer, not the vocabulary projection. Every process builds the same model and data
from the seeds.

    python tests/train_worker.py OUTPUT_DIR [--max-steps N] [--save-every K] [--sleep S] [--resume]
    torchrun --nproc-per-node 2 tests/train_worker.py OUTPUT_DIR ...

Losses land in OUTPUT_DIR/log.jsonl (the trainer's log).

    torchrun --nproc-per-node 4 tests/train_worker.py OUTPUT_DIR --scale MODEL_DIR

The scaling run (:func:`scale_run`): the model saved in MODEL_DIR loaded shard by shard from the meta device, with
each rank's peak host memory while loading measured; trained, checkpointed, saved, resumed, and trained again with
other step settings. Results in OUTPUT_DIR/results.json.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import sys
import time

import torch

from s1fast.train.data import IGNORE_INDEX, Dataset

VOCAB = 512


def tiny_model(seed: int = 0, attn: str = "sdpa", patched: bool = True, dtype=torch.float32):
    from s1fast.model.patch import patch
    from s1fast.model.shapes import random_qwen

    shape = dict(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=64, vocab=VOCAB, tied=True)
    model = random_qwen(shape, seed=seed, dtype=dtype, random_norms=True, max_positions=512, attn=attn,
                        initializer_range=0.1)
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


def config(out: str, **overrides):
    from s1fast.train.config import TrainConfig

    fields = dict(out=out, epochs=2, global_batch=4, lr=3e-3, param_dtype="fp32",
                  micro_batch_tokens=64, progress=False)
    return TrainConfig(**{**fields, **overrides})


def medium_model(seed: int = 0):
    """An unpatched Qwen2 of about 16M parameters (64 MB in fp32; most of it the tied 32K x 384 embedding), big enough
    that memory per rank is measurable, small enough to train a few steps on CPU in seconds."""
    from tiny_qwen import tiny_model as qwen

    return qwen(
        "qwen2",
        tied=True,
        seed=seed,
        hidden_size=384,
        intermediate_size=1152,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=32768,
        max_position_embeddings=512,
        initializer_range=0.05,
    )


def probe_ids() -> torch.Tensor:
    """The input whose logits the scaling run and the test compare."""
    return torch.tensor([synthetic_examples(1, seed=9)[0]["input_ids"]])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)[1])


def step_peak_bytes(trainer, examples) -> int:
    """The most memory torch held on this rank during one training step on ``examples``, after a first one (so that
    AdamW's moments exist and the step is a steady one): the bytes held before the step (the storages of the
    parameter shards and the optimizer state) plus the peak of the step's running sum of allocations and frees, as
    torch's profiler records every CPU allocation (``profile_memory``)."""
    from torch.profiler import ProfilerActivity, profile

    trainer.train_step(examples)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    tensors = [local(p) for p in trainer.model.parameters()]
    tensors += [local(v) for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(examples)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return held + peak


def scale_config(output_dir: str, **overrides):
    """The scaling run's settings: 2 steps of 8 examples in rows of at most 32 tokens, so that each of 4 ranks
    runs 2 micro-batches per step (gradient sync only after the last is then a change)."""
    return config(output_dir, **{"global_batch": 8, "micro_batch_tokens": 32, "max_steps": 2, **overrides})


def scale_run(model_dir: str, out: str) -> None:
    """See the module docstring. Every rank runs it; rank 0 writes OUTPUT_DIR/results.json."""
    import torch.distributed as dist

    from s1fast.model.fsdp import empty_model
    from s1fast.train.trainer import Trainer

    cpu, data, run = torch.device("cpu"), synthetic_dataset(), os.path.join(out, "run")
    # Peak resident memory while sharding and loading: the kernel's high-water mark, reset just before (clear_refs 5),
    # once the model exists on the meta device (Python objects only) and the code the trainer imports is loaded.
    import transformers.optimization  # noqa: F401

    model = empty_model(model_dir)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    trainer = Trainer(model, data, scale_config(run, save_every=1, grad_sync="last"), device=cpu, weights=model_dir)
    load_peak = (_status_kib("VmHWM") - before) * 1024
    losses = trainer.fit()
    trainer.save_model(dtype=torch.float32)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=probe_ids()).logits
    trainer.model.train()  # two more steps (after the save), the second measured: the memory plan's check
    step_peak = step_peak_bytes(trainer, [data.examples[i] for i in trainer.batch_positions(0)])
    ckpt = os.path.join(run, "checkpoint-000001")
    resumed = Trainer(empty_model(model_dir), data, scale_config(run, save_every=1, grad_sync="last"), device=cpu,
                      weights=ckpt)
    resumed.load_checkpoint(ckpt, model=False)
    resumed_losses = resumed.fit()
    other = Trainer(empty_model(model_dir), data, scale_config(os.path.join(out, "other"), grad_sync="every",
                                                               cpu_offload=True, gradient_checkpointing=True),
                    device=cpu, weights=model_dir)
    other_losses = other.fit()
    peaks, step_peaks = [None] * dist.get_world_size(), [None] * dist.get_world_size()
    dist.all_gather_object(peaks, load_peak)
    dist.all_gather_object(step_peaks, step_peak)
    if dist.get_rank() == 0:
        torch.save(logits, os.path.join(out, "logits.pt"))
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"losses": losses, "resumed": resumed_losses, "other": other_losses, "load_peak_bytes": peaks,
                       "step_peak_bytes": step_peaks,
                       "sync_last": trainer.sync_last, "other_sync_last": other.sync_last}, f)


def main(argv: list[str] | None = None) -> int:
    from s1fast.train.checkpoint import latest_checkpoint
    from s1fast.train.trainer import Trainer, init_distributed

    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument(
        "--sleep", type=float, default=0.0, help="seconds to wait after each step (gives a test time to kill)"
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--scale", metavar="MODEL_DIR", help="the scaling run (see the module docstring)")
    args = p.parse_args(argv)
    faulthandler.enable()  # a crash in native code (SIGABRT, SIGSEGV) prints every thread's Python stack to stderr
    torch.set_num_threads(1)
    init_distributed("cpu")
    if args.scale:
        scale_run(args.scale, args.output_dir)
        torch.distributed.destroy_process_group()
        return 0
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
