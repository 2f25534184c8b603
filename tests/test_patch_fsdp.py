"""Patched model + FSDP2 (``shard_model``: fully_shard per decoder layer and the root), 2 processes on CPU
(torchrun, gloo), against one process running transformers' unpatched model on the whole batch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fsdp_worker import BATCH, CASES, LR, STEPS, TOKENS, case_name
from helpers import run_torchrun
from tiny_qwen import random_batch, tiny_model

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def single_process(arch: str, tied: bool) -> dict:
    """The same steps on one process: unpatched transformers model, whole batch, plain mean loss."""
    model = tiny_model(arch, tied=tied)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], None
    for step in range(STEPS):
        input_ids, labels = random_batch(BATCH, TOKENS, seed=200 + step)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "grads": grads, "params": dict(model.named_parameters())}


def assert_rel(actual, expected, rel, what, atol=0.0):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale + atol, f"{what}: max |diff| {err:.3g} > {rel:g} x max |expected| {scale:.3g} + {atol:g}"


def test_fsdp2_two_processes_match_one(tmp_path):
    out = tmp_path / "fsdp.pt"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the kernels' CPU path: fast
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "fsdp_worker.py"), str(out)]
    proc = run_torchrun(cmd, cwd=HERE, env=env, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = torch.load(out)
    assert results.keys() == {case_name(*case) for case in CASES}
    for arch, tied, patch_first in CASES:
        name = case_name(arch, tied, patch_first)
        got, ref = results[name], single_process(arch, tied)
        # fp32 throughout; rounding differs (fused kernels, per-rank partial sums, fp32 reduce-scatter), see
        # test_patch.FP32_REL for the 1e-5 argument
        assert_rel(got["losses"], ref["losses"], 1e-5, f"{name} losses")
        assert got["grads"].keys() == ref["grads"].keys()
        for n, g in ref["grads"].items():
            assert_rel(got["grads"][n], g, 1e-5, f"{name} grad of {n}")
        # AdamW moves every element by about lr per step whatever its gradient's size, so an element whose
        # gradient is within rounding noise of zero (|g| ~ eps = 1e-8) can step differently: allow 1% of a step
        for n, p in ref["params"].items():
            assert_rel(got["params"][n], p, 1e-5, f"{name} {n} after {STEPS} AdamW steps", atol=1e-2 * LR)
