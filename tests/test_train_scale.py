"""Training at scale on CPU (gloo): a model loaded shard by shard from the meta device by 4 ranks (each rank's
peak host memory measured), trained with gradient sync only on the last micro-batch, saved as a sharded
transformers checkpoint without gathering it on one rank, resumed from a sharded checkpoint, and trained with
CPU offload and activation checkpointing; every loss against one rank's. Also the saved model's round trip on one
rank (tied and untied)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from s1fast.commands import DTYPES
from s1fast.files import SAFE_INDEX, weight_files
from s1fast.kernels import force_backend
from s1fast.model.fsdp import empty_model, file_plan, load_weights, materialize
from s1fast.model.patch import patch
from s1fast.train.packing import plan_micro_batches
from s1fast.train.trainer import Trainer, init_distributed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_qwen  # noqa: E402
import train_worker  # noqa: E402
from helpers import run_torchrun  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def process_group():
    """A one-rank gloo group, and the kernels' PyTorch path (as in tests/test_train.py)."""
    init_distributed("cpu")
    with force_backend("torch"):
        yield


def test_four_ranks_load_shards_train_save_and_resume_as_one_rank(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    train_worker.medium_model().to(torch.bfloat16).save_pretrained(src)  # stored in bf16, as released models are
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the kernels' PyTorch path on CPU, as in the fixture above
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           os.path.join(HERE, "train_worker.py"), out, "--scale", src]
    proc = run_torchrun(cmd, env=env, timeout=400)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(os.path.join(out, "results.json")) as f:
        got = json.load(f)

    data = train_worker.synthetic_dataset()
    one = Trainer(
        empty_model(src),
        data,
        train_worker.scale_config(str(tmp_path / "one"), grad_sync="last"),
        device=CPU,
        weights=src,
    )
    want = one.fit()
    assert len(want) == 2 and got["sync_last"] and not got["other_sync_last"]
    for step in range(2):  # each rank reduced its gradients once for two micro-batches
        lengths = [len(data.examples[i]["input_ids"]) for i in one.batch_positions(step)]
        assert {len(p) for p in plan_micro_batches(lengths, world_size=4, max_tokens=32, pack=True)} == {2}
    # fp32 throughout; 4 ranks sum per-rank partial losses and reduce-scatter gradients: rounding order only
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["other"]), torch.tensor(want), rtol=1e-5, atol=0)
    assert got["resumed"] == got["losses"][1:]  # same ranks, same order of operations: bit-identical

    # Loading: each rank's peak resident memory while sharding and loading well under one fp32 copy of the model
    # (every rank holding the whole model would put each over it).
    full_fp32 = sum(p.numel() for p in one.model.parameters()) * 4
    peaks = got["load_peak_bytes"]
    print(f"peak RSS while loading, per rank: {[f'{p / 2**20:.1f} MiB' for p in peaks]}; "
          f"the model in fp32: {full_fp32 / 2**20:.1f} MiB")
    assert len(peaks) == 4 and max(peaks) < 0.5 * full_fp32, (peaks, full_fp32)  # its fp32 shard is 0.25

    # The memory plan of this run (4 ranks, rows of at most 32 tokens, 2 per rank, sync on the last) against the
    # peak each rank measured during a step (train_worker.step_peak_bytes): parameters and gradients dominate.
    from s1fast.train.plan import Setup, Shape, plan

    planned = plan(Shape.from_config(one.model.config), Setup(world=4, tokens=32, dtype_bytes=4, sync_last=True,
                                                               micro_batches=2, device="cpu")).peak
    measured = max(got["step_peak_bytes"])
    print(f"4 ranks: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB per rank")
    assert abs(planned / measured - 1) < 0.15, (planned, got["step_peak_bytes"])

    # The saved model: sharded safetensors with their index, read by transformers and s1fast.model.load.
    from transformers import AutoModelForCausalLM

    from s1fast.model.patch import load

    run = os.path.join(out, "run")
    assert os.path.isfile(os.path.join(run, SAFE_INDEX))
    assert len(set(weight_files(run).values())) > 1
    logits = torch.load(os.path.join(out, "logits.pt"))  # the trained FSDP model's, on 4 ranks
    ids = train_worker.probe_ids()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker: the same GEMM blocking, so the same kernels give the same bits
    try:
        with torch.no_grad():
            ours = load(run, dtype=torch.float32, device="cpu").eval()
            torch.testing.assert_close(ours(input_ids=ids).logits, logits, rtol=0, atol=0)
            hf = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
            assert hf.lm_head.weight is hf.model.embed_tokens.weight
            # transformers' own modules against s1fast's fused kernels, fp32 logits of size ~10: rounding
            torch.testing.assert_close(hf(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("arch, tied", [("qwen2", True), ("qwen3", False)])
def test_save_then_load_is_exact(tmp_path, arch, tied):
    """save_model -> from_pretrained: the same tensors, tied or not (Qwen3 has q/k norms), and a model built on the
    meta device then filled from the save equals it; a checkpoint lacking a tensor is named."""
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "run")
    model = tiny_qwen.tiny_model(arch, tied=tied, vocab_size=train_worker.VOCAB)
    trainer = Trainer(model, train_worker.synthetic_dataset(8), train_worker.config(out, global_batch=8, max_steps=1),
                      device=CPU)
    trainer.fit()
    trainer.save_model(dtype=torch.float32)
    trained = {k: v.full_tensor() for k, v in trainer.model.state_dict().items()}
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    assert hf.state_dict().keys() == trained.keys()
    for name, p in hf.state_dict().items():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0, msg=name)

    again = empty_model(out, patched=False)  # on the meta device; materialize recomputes the rotary buffers
    materialize(again, "cpu")
    load_weights(again, out)
    reference = hf.state_dict()
    for name, p in again.state_dict().items():
        torch.testing.assert_close(p, reference[name], rtol=0, atol=0, msg=name)
    for name, buf in hf.named_buffers():  # non-persistent: not in the files
        torch.testing.assert_close(dict(again.named_buffers())[name], buf, rtol=0, atol=0, msg=name)

    from safetensors.torch import load_file, save_file

    (file,) = set(weight_files(out).values())
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the checkpoint lacks 1 tensor\(s\) of the model: model.norm.weight$"):
        load_weights(again, out)


def test_file_plan_balances_ranks():
    """Tensors in order into files of about total / world bytes; one oversized tensor gets a file alone."""
    files, n = file_plan([10] * 8, 4)
    assert n == 4 and files == [0, 0, 1, 1, 2, 2, 3, 3]
    files, n = file_plan([50, 5, 5, 5, 5], 4, max_bytes=1000)
    assert files[0] == 0 and files[1] == 1 and n == files[-1] + 1 and n <= 3
    assert file_plan([10] * 8, 1, max_bytes=25) == ([0, 0, 1, 1, 2, 2, 3, 3], 4)


# --- the memory plan ---------------------------------------------------------------------------------------------


def _long_rows(tokens: int, n: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (tokens,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


@pytest.mark.parametrize("dtype, checkpointing, tokens", [("fp32", False, 1024), ("fp32", True, 1024),
                                                     ("bf16", True, 512)])  # CPU bf16 is slow: fewer tokens
def test_memory_plan_matches_measured_peak(tmp_path, dtype, checkpointing, tokens):
    """The plan's peak within 15% of the peak torch allocated during a step (measured with the profiler's memory
    events, see train_worker.step_peak_bytes), for a layout where activations dominate: 2 rows of 1024 (or 512)
    tokens per step, 4 layers; with and without activation checkpointing, fp32 and bf16 compute. (4 ranks, where the
    shards and gradients dominate: the test above.)"""
    from s1fast.train.data import Dataset
    from s1fast.train.plan import Setup, Shape, plan

    vocab = 1024
    model = tiny_qwen.tiny_model("qwen2", tied=False, layers=4, hidden_size=128, intermediate_size=384, head_dim=32,
                                 vocab_size=vocab, max_position_embeddings=tokens)
    rows = _long_rows(tokens, 2, vocab)
    trainer = Trainer(patch(model), Dataset(rows, [0, 1], []), train_worker.config(
        str(tmp_path), global_batch=2, micro_batch_tokens=tokens, pack=False, param_dtype=dtype,
        gradient_checkpointing=checkpointing), device=CPU)
    measured = train_worker.step_peak_bytes(trainer, rows)
    planned = plan(Shape.from_config(model.config), Setup(
        world=1, tokens=tokens, dtype_bytes=DTYPES[dtype].itemsize, checkpointing=checkpointing,
        micro_batches=2, device="cpu")).peak
    mib = f"planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    print(f"{dtype}, checkpointing {checkpointing}: {mib}")
    assert abs(planned / measured - 1) < 0.15, (planned, measured)


def test_memory_plan_of_s1_32b_on_16_gpus():
    """s1's run: Qwen2.5-32B, 16 x 80 GB, rows of 32768 tokens, bf16: fits with activation checkpointing (as s1 ran
    it), not without; the verdict says what to change."""
    from s1fast.model.shapes import QWEN25_SHAPES
    from s1fast.train.plan import Setup, Shape, advice, plan, render

    shape, gpu = Shape.from_sizes(QWEN25_SHAPES["32B"]), 80 * 10**9
    assert 32.5e9 < shape.params < 33e9  # Qwen2.5-32B: 32.8B parameters
    s1 = Setup(world=16, tokens=32768, checkpointing=True)
    assert plan(shape, s1).fits(gpu)
    bare = Setup(world=16, tokens=32768)
    assert not plan(shape, bare).fits(gpu)
    assert advice(shape, bare, gpu)[0] == "--gradient-checkpointing"
    text = render(plan(shape, bare), gpu)
    assert "verdict: does not fit" in text and "change: --gradient-checkpointing" in text
    assert "verdict: fits" in render(plan(shape, s1), gpu)


# --- the command -------------------------------------------------------------------------------------------------


def test_cli_trains_a_model_directory_loaded_shard_by_shard_and_resumes(tmp_path, capsys):
    """`s1fast train --model DIR`: built on the meta device and filled from DIR's safetensors; the checkpoint is a
    transformers checkpoint; --resume reads the weights from the checkpoint once; the final model loads."""
    from transformers import AutoModelForCausalLM

    from s1fast.model.shapes import random_qwen
    from s1fast.train.cli import DEMO_SHAPE, main

    src, out = str(tmp_path / "src"), str(tmp_path / "run")
    random_qwen(DEMO_SHAPE, dtype=torch.bfloat16, max_positions=512).save_pretrained(src)
    args = ["--model", src, "--out", out, "--global-batch", "2", "--lr", "1e-3", "--dtype", "fp32", "--no-progress"]
    assert main([*args, "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"loaded {src} into 1 shard(s)" in printed
    ckpt = os.path.join(out, "checkpoint-000001")
    assert AutoModelForCausalLM.from_pretrained(ckpt).dtype == torch.float32  # the fp32 master weights
    init_distributed("cpu")  # main ended the process group
    assert main([*args, "--resume", "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"loaded {ckpt} into 1 shard(s)" in printed and "resumed from" in printed and "trained 1 steps" in printed
    init_distributed("cpu")
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.lm_head.weight is saved.model.embed_tokens.weight


def test_cli_plan(tmp_path, capsys):
    """`s1fast train --plan`: the table and verdict, exit 0 when it fits and 1 when not; a model directory's config;
    bad input is one line and exit 2."""
    from s1fast.train.cli import main

    s1 = ["--plan", "--model", "32B", "--world-size", "16", "--gpu-memory", "79.6"]
    assert main([*s1, "--gradient-checkpointing"]) == 0
    printed = capsys.readouterr().out
    assert "32.76B parameters" in printed and "16 GPU(s) of 79.6 GiB" in printed and "verdict: fits" in printed
    assert main(s1) == 1
    assert "verdict: does not fit" in capsys.readouterr().out
    model = tmp_path / "model"
    tiny_qwen.tiny_model("qwen3", tied=False).save_pretrained(str(model))
    assert main(["--plan", "--model", str(model), "--block-size", "256", "--gpu-memory", "4"]) == 0
    assert "2 layers, hidden 64, vocab 300, untied" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--plan", "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[-1].startswith("s1fast train: error: --model ")
    assert "a Qwen2.5 size: 0.5B, 1.5B, 3B, 7B, 14B, 32B" in err[-1]
