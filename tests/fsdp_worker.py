"""torchrun worker for tests/test_patch_fsdp.py: two AdamW steps of patched, FSDP2-sharded tiny Qwen models.

    torchrun --standalone --nproc-per-node 2 tests/fsdp_worker.py OUT.pt

Each rank takes its slice of the global batch; the per-rank loss is scaled so that FSDP's gradient average
equals the gradient of the global token mean (what transformers' Trainer does with num_items_in_batch).
Rank 0 saves, per case: the global loss of each step, the full gradients of step 1 and the full parameters
after both steps.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from tiny_qwen import random_batch, tiny_model

from s1fast.model.fsdp import shard_model
from s1fast.model.patch import patch

CASES = (("qwen2", True), ("qwen3", False))  # (arch, tied embeddings)
STEPS, BATCH, TOKENS, LR = 2, 4, 16, 3e-3


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_case(arch: str, tied: bool, rank: int, world: int) -> dict:
    model = shard_model(patch(tiny_model(arch, tied=tied)))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], None
    for step in range(STEPS):
        input_ids, labels = random_batch(BATCH, TOKENS, seed=200 + step)
        tokens = (labels[:, 1:] != -100).sum()  # over the global batch, as the loss shifts labels
        mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = model(input_ids=input_ids[mine], labels=labels[mine], num_items_in_batch=tokens / world).loss
        loss.backward()
        if step == 0:
            grads = {n: full(p.grad).clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        total = loss.detach() / world
        dist.all_reduce(total)
        losses.append(total)
    return {"losses": torch.stack(losses), "grads": grads, "params": {n: full(p.detach()) for n, p in model.named_parameters()}}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {f"{arch}-{'tied' if tied else 'untied'}": run_case(arch, tied, rank, world) for arch, tied in CASES}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
