"""torchrun worker for tests/test_patch_fsdp.py: two AdamW steps of patched, FSDP2-sharded tiny Qwen models.

    torchrun --standalone --nproc-per-node 2 tests/fsdp_worker.py OUT.pt

Each rank takes its slice of the global batch; the per-rank loss is scaled so that FSDP's gradient average
equals the gradient of the global token mean (what transformers' Trainer does with num_items_in_batch).
Rank 0 saves, per case: the global loss of each step, the full gradients of step 1 and the full parameters
after both steps.
"""

from __future__ import annotations

import faulthandler
import sys

import torch
import torch.distributed as dist
from tiny_qwen import random_batch, tiny_model

from s1fast.model.fsdp import shard_model
from s1fast.model.patch import patch

# (arch, tied embeddings, patch before sharding): the patch works on either side of fully_shard
CASES = (("qwen2", True, True), ("qwen3", False, False))
STEPS, BATCH, TOKENS, LR = 2, 4, 16, 3e-3


def case_name(arch: str, tied: bool, patch_first: bool) -> str:
    return f"{arch}-{'tied' if tied else 'untied'}-{'patch-then-shard' if patch_first else 'shard-then-patch'}"


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_case(arch: str, tied: bool, patch_first: bool, rank: int, world: int) -> dict:
    model = tiny_model(arch, tied=tied)
    model = shard_model(patch(model)) if patch_first else patch(shard_model(model))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], None
    for step in range(STEPS):
        input_ids, labels = random_batch(BATCH, TOKENS, seed=200 + step)
        tokens = (labels[:, 1:] != -100).sum()  # over the global batch, as the loss shifts labels
        mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        out = model(input_ids=input_ids[mine], labels=labels[mine], num_items_in_batch=tokens / world)
        assert out.logits is None, "the fused loss did not run under FSDP"
        loss = out.loss
        loss.backward()
        if step == 0:
            grads = {n: full(p.grad).clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        total = loss.detach() / world
        dist.all_reduce(total)
        losses.append(total)
    return {
        "losses": torch.stack(losses),
        "grads": grads,
        "params": {n: full(p.detach()) for n, p in model.named_parameters()},
    }


def main(out: str) -> None:
    faulthandler.enable()  # a native crash (SIGABRT, SIGSEGV) prints every thread's Python stack to stderr
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {case_name(*case): run_case(*case, rank, world) for case in CASES}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
