"""The s1fast trainer: packing, the exact global-batch loss, checkpoints and resume (with a real kill), a run's
safety (locked output directory, no mixed runs, resume with the same settings,
divergence, full disk, signals, damaged checkpoints), the saved model, and the ``s1fast train`` command (demo and
bad input). Several ranks (FSDP2 over 4 processes equal to 1): tests/test_train_scale.py."""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from s1fast.kernels import force_backend
from s1fast.train.checkpoint import checkpoint_steps, claim_output_dir, latest_checkpoint, read_checkpoint
from s1fast.train.config import TrainConfig, run_settings
from s1fast.train.data import IGNORE_INDEX, Dataset
from s1fast.train.packing import (
    FLEX_BLOCK,
    collate,
    document_mask,
    num_items,
    plan_micro_batches,
    use_flex_attention,
)
from s1fast.train.trainer import Trainer, init_distributed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_worker  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def process_group():
    """A one-rank gloo group (kept when one exists), and the kernels' PyTorch path: these tests are about the
    trainer, and the Triton interpreter (TRITON_INTERPRET=1 on CPU) would take minutes per training step.
    The kernels' own tests cover their Triton paths."""
    init_distributed("cpu")
    with force_backend("torch"):
        yield


def _log(path: str) -> list[dict]:
    with open(os.path.join(path, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _reference_loss(model, examples) -> torch.Tensor:
    """Global-batch loss computed the plain way in float64: each example alone through the unpatched model,
    summed token cross-entropies over the number of trained tokens."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1].double()
        target = torch.tensor(ex["labels"][1:])
        total = total + F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((target != IGNORE_INDEX).sum())
    return total / count


# --- packing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("pack", [True, False])
def test_plan_micro_batches_covers_each_example_once(world, pack):
    g = torch.Generator().manual_seed(world)
    lengths = torch.randint(1, 100, (17,), generator=g).tolist() + [150]  # one longer than the row budget
    plan = plan_micro_batches(lengths, world_size=world, max_tokens=120, pack=pack)
    assert len(plan) == world and len({len(p) for p in plan}) == 1  # same micro-batch count on every rank
    rows = [row for rank in plan for row in rank]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert len(row) <= 1 or sum(lengths[i] for i in row) <= 120
        assert pack or len(row) <= 1
    if pack:  # first-fit decreasing: no two non-empty rows could be merged
        sizes = sorted(sum(lengths[i] for i in row) for row in rows if row)
        assert sizes[0] + sizes[1] > 120


def test_collate_restarts_positions_and_masks_boundaries():
    examples = train_worker.synthetic_examples(3, seed=5)
    for ex in examples:  # make every first label trainable to see collate mask it
        ex["labels"][0] = ex["input_ids"][0]
    batch = collate(examples)
    lengths = [len(ex["input_ids"]) for ex in examples]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert batch["input_ids"][0].tolist() == sum((ex["input_ids"] for ex in examples), [])
    assert batch["position_ids"][0].tolist() == sum((list(range(n)) for n in lengths), [])
    for s, ex in zip(starts, examples):
        assert batch["labels"][0, s] == IGNORE_INDEX
        assert batch["labels"][0, s + 1:s + len(ex["labels"])].tolist() == ex["labels"][1:]
    assert num_items(examples) == sum(sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX) for ex in examples)
    empty = collate([])
    assert empty["labels"].tolist() == [[IGNORE_INDEX]] and empty["input_ids"].shape == (1, 1)


@pytest.mark.parametrize("patched", [False, True])
def test_packed_loss_and_grads_equal_examples_run_apart(patched):
    """One packed row (sdpa detects the restarting position_ids and keeps attention inside each example) gives
    the loss and gradients of the examples run one by one, and matches a float64 reference."""
    model = train_worker.tiny_model(patched=patched).train()
    examples = train_worker.synthetic_examples(4, seed=3)
    n = num_items(examples)
    packed = model(**collate(examples), num_items_in_batch=n, use_cache=False).loss
    packed.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    apart = sum(model(**collate([ex]), num_items_in_batch=n, use_cache=False).loss for ex in examples)
    apart.backward()
    # fp32 sums of about 100 token losses of size ~6 in a different order: agreement to ~1e-6 relative.
    torch.testing.assert_close(packed, apart, rtol=2e-6, atol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
    reference = train_worker.tiny_model(patched=False, dtype=torch.float64).eval()
    torch.testing.assert_close(packed.double(), _reference_loss(reference, examples), rtol=1e-5, atol=0)


def test_document_mask_keeps_attention_inside_each_document():
    """The FlexAttention block mask of a packed row (documents of 200, 56 and 300 tokens: five 128-token blocks)
    allows exactly the causal pairs inside each document, and lists no block that holds none of them."""
    from torch.nn.attention.flex_attention import create_mask

    lengths = [200, 56, 300]
    positions = torch.tensor([sum((list(range(n)) for n in lengths), [])])
    mask = document_mask(positions)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    t = torch.arange(sum(lengths))
    want = (doc[:, None] == doc[None, :]) & (t[:, None] >= t[None, :])
    assert torch.equal(create_mask(mask.mask_mod, 1, 1, len(t), len(t), device="cpu")[0, 0], want)
    blocks = mask.to_dense()[0, 0].bool()  # the 128 x 128 blocks FlexAttention computes
    assert blocks.shape == (5, 5)
    for q in range(5):
        for kv in range(5):
            rows, cols = slice(q * 128, (q + 1) * 128), slice(kv * 128, (kv + 1) * 128)
            assert bool(blocks[q, kv]) == bool(want[rows, cols].any()), (q, kv)
    assert not blocks[4, :2].any()  # the third document's last block skips the first document's blocks


@pytest.mark.filterwarnings("ignore::UserWarning")  # FlexAttention's note that uncompiled it materialises the scores
def test_flex_attention_packing_equals_examples_run_apart():
    """A packed row through FlexAttention's document mask (the trainer's path on GPUs without flash-attn), padded as
    the trainer pads it, has the loss and the gradient of its examples run one by one, in float64: the losses agree
    to rounding (~1e-16 relative). torch 2.13 has no FlexAttention backward on CPU, so the gradient is compared
    through central differences along a random direction in parameter space, step 1e-4: packed and apart share the
    truncation error, and differ by rounding, ~1e-16 of the loss / 1e-4 (observed ~1e-12 relative; 1e-9 allowed);
    both agree with the autograd gradient to the truncation error and the float32 rounding of transformers'
    Qwen2RMSNorm, which computes in float32 whatever the model's dtype (observed ~1e-5; 1e-4 allowed)."""
    model = train_worker.tiny_model(patched=False, dtype=torch.float64).train()
    examples = train_worker.synthetic_examples(4, seed=3)

    def loss(batch, **kwargs) -> torch.Tensor:  # in float64 (transformers' loss function computes in float32)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **kwargs).logits
        return F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")

    rows = [collate([ex]) for ex in examples]
    apart = sum(loss(row) for row in rows)
    apart.backward()
    use_flex_attention(model)
    batch = collate(examples, multiple_of=FLEX_BLOCK)
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape[1] % FLEX_BLOCK == 0 and batch["input_ids"].shape[1] > tokens  # a pad document
    mask = document_mask(batch["position_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loss(batch, attention_mask=mask), apart.detach(), rtol=1e-13, atol=0)
        causal_only = document_mask(torch.arange(batch["input_ids"].shape[1])[None])  # attends across documents
        assert abs(loss(batch, attention_mask=causal_only) - apart) > 1e-3 * apart

    params, eps = dict(model.named_parameters()), 1e-4
    g = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
    saved = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def slope(f) -> torch.Tensor:
        values = []
        for sign in (1, -1):
            for k, d in direction.items():
                params[k].copy_(saved[k] + sign * eps * d)
            values.append(f())
        for k in params:
            params[k].copy_(saved[k])
        return (values[0] - values[1]) / (2 * eps)

    packed = slope(lambda: loss(batch, attention_mask=mask))
    torch.testing.assert_close(packed, slope(lambda: sum(loss(row) for row in rows)), rtol=1e-9, atol=0)
    expected = sum((params[k].grad * d).sum() for k, d in direction.items())
    assert packed.dtype == torch.float64 and abs(expected) > 1
    torch.testing.assert_close(packed, expected, rtol=1e-4, atol=0)


def test_global_batch_loss_independent_of_split(tmp_path):
    """The same step with one packed row, rows of 64 tokens, one example per row, or gradient checkpointing:
    same loss, same weights."""
    dataset = train_worker.synthetic_dataset(8)
    results = []
    for i, (tokens, pack, ckpt) in enumerate(
        [(4096, True, False), (64, True, False), (4096, False, False), (64, True, True)]
    ):
        cfg = train_worker.config(str(tmp_path / str(i)), global_batch=8, micro_batch_tokens=tokens, pack=pack,
                                  gradient_checkpointing=ckpt, max_steps=1)
        trainer = Trainer(train_worker.tiny_model(), dataset, cfg, device=CPU)
        examples = [dataset.examples[j] for j in trainer.batch_positions(0)]
        loss, _ = trainer.train_step(examples)
        params = torch.cat([p.detach().full_tensor().flatten() for p in trainer.model.parameters()])
        results.append((loss, params))
    reference = _reference_loss(train_worker.tiny_model(patched=False, dtype=torch.float64).eval(), examples)
    for loss, params in results:
        torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)
        # AdamW's first step moves every weight by about lr: equal to fp32 rounding of the gradients.
        torch.testing.assert_close(params, results[0][1], rtol=1e-5, atol=1e-6)


def test_log_has_token_accuracy_and_entropy(tmp_path):
    """log.jsonl's mean_token_accuracy and entropy of a step (split into micro-batches) are those of the trained
    tokens under the step's weights, computed the plain way in float64 (the loss alongside as a check)."""
    dataset = train_worker.synthetic_dataset(8)
    cfg = train_worker.config(str(tmp_path), global_batch=8, micro_batch_tokens=64, max_steps=1)
    trainer = Trainer(train_worker.tiny_model(), dataset, cfg, device=CPU)
    examples = [dataset.examples[j] for j in trainer.batch_positions(0)]
    trainer.fit()
    (record,) = _log(str(tmp_path))
    model = train_worker.tiny_model(patched=False, dtype=torch.float64).eval()
    hits = entropy = count = 0.0
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
        target = torch.tensor(ex["labels"][1:])
        valid = target != IGNORE_INDEX
        logp = logits.log_softmax(-1)[valid]
        hits += float((logits.argmax(-1)[valid] == target[valid]).sum())
        entropy += float(-(logp.exp() * logp).sum())
        count += float(valid.sum())
    # an untrained model hits few tokens (maybe none); the kernel tests check top-1 with many hits
    assert record["mean_token_accuracy"] == pytest.approx(hits / count, abs=1e-12)
    assert record["entropy"] == pytest.approx(entropy / count, rel=1e-5)
    # unpatched, nothing measures them: absent from the log, not zeros
    plain_cfg = train_worker.config(str(tmp_path / "plain"), global_batch=8, micro_batch_tokens=64, max_steps=1)
    plain = Trainer(train_worker.tiny_model(patched=False), dataset, plain_cfg, device=CPU)
    plain.fit()
    (record,) = _log(str(tmp_path / "plain"))
    assert "loss" in record and "mean_token_accuracy" not in record and "entropy" not in record


def test_s1_schedule_and_step_count(tmp_path):
    """s1: 1,000 examples, global batch 16, 5 epochs = 63 steps per epoch (the last batch of an epoch holds 8),
    315 optimizer steps; AdamW 1e-5, betas (0.9, 0.95), weight decay 1e-4 on matrices only; linear warmup over
    ceil(5% of 315) = 16 steps (from 0, as transformers' Trainer), then cosine to 0."""
    trainer = Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(1000),
                      TrainConfig(out=str(tmp_path), param_dtype="fp32", progress=False), device=CPU)
    assert (trainer.steps_per_epoch, trainer.total_steps) == (63, 315)
    for epoch in range(2):
        batches = [trainer.batch_positions(epoch * 63 + k) for k in range(63)]
        assert [len(b) for b in batches] == [16] * 62 + [8]
        assert sorted(i for b in batches for i in b) == list(range(1000))  # each example once per epoch
    assert trainer.batch_positions(0) != trainer.batch_positions(63)  # reshuffled every epoch
    (group_decay, group_plain) = trainer.optimizer.param_groups
    assert group_decay["lr"] == 0.0 and group_decay["betas"] == (0.9, 0.95) and group_decay["weight_decay"] == 1e-4
    assert all(p.ndim >= 2 for p in group_decay["params"]) and all(p.ndim == 1 for p in group_plain["params"])
    assert group_plain["weight_decay"] == 0.0
    factor = trainer.scheduler.lr_lambdas[0]
    assert [factor(k) for k in (0, 8, 16)] == [0.0, 0.5, 1.0]
    for k in (16, 100, 200, 315):
        assert factor(k) == pytest.approx(0.5 * (1 + math.cos(math.pi * (k - 16) / (315 - 16))), abs=1e-12)
    assert factor(315) == pytest.approx(0.0, abs=1e-12)


# --- checkpoints and resume ------------------------------------------------------------------------------------


def test_resume_gives_the_same_losses_and_checkpoints_are_atomic(tmp_path):
    full = str(tmp_path / "full")
    Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(full, save_every=3),
            device=CPU).fit()
    expected = {r["step"]: r["loss"] for r in _log(full)}
    assert len(expected) == 12 and expected[12] < expected[1]
    # keep_checkpoints=2 pruned 3 and 6; no temporaries are left behind.
    assert sorted(n for n in os.listdir(full) if "checkpoint" in n) == ["checkpoint-000009", "checkpoint-000012"]

    part = str(tmp_path / "part")
    Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(),
            train_worker.config(part, save_every=3, max_steps=5), device=CPU).fit()
    os.makedirs(os.path.join(part, ".tmp-checkpoint-000006"))  # a save cut short: never picked up
    assert latest_checkpoint(part) == os.path.join(part, "checkpoint-000005")  # the end of a run is saved too
    resumed = Trainer(train_worker.tiny_model(seed=123), train_worker.synthetic_dataset(),
                      train_worker.config(part, save_every=3), device=CPU)
    resumed.load_checkpoint(os.path.join(part, "checkpoint-000003"))
    assert resumed.step == 3
    losses = resumed.fit()
    assert losses == [expected[s] for s in range(4, 13)]  # bit-identical: same weights, moments, schedule, data

    with pytest.raises(ValueError, match="settings differ from .*trainer_state.json: global_batch 4 -> 3"):
        Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(part, global_batch=3),
                device=CPU).load_checkpoint(latest_checkpoint(part))
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resumed.load_checkpoint(str(tmp_path))
    # a checkpoint written before --dtype had one spelling stored torch's name: still the same setting
    state_path = os.path.join(latest_checkpoint(part), "trainer_state.json")
    with open(state_path) as f:
        state = json.load(f)
    assert state["settings"]["param_dtype"] == "fp32"
    state["settings"]["param_dtype"] = "float32"
    with open(state_path, "w") as f:
        json.dump(state, f)
    Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(part),
            device=CPU).load_checkpoint(latest_checkpoint(part))


def test_checkpoint_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """trainer_state.json and the RNG state are fsynced, then the temporary directory, then it is renamed."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))) or fsync(fd),
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", os.path.basename(b))) or replace(a, b))
    trainer = Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(8),
                      train_worker.config(str(tmp_path), global_batch=8, max_steps=1), device=CPU)
    trainer.fit()
    rename = events.index(("replace", "checkpoint-000001"))
    synced = {name for kind, name in events[:rename] if kind == "fsync"}
    assert {"trainer_state.json", "rng-rank0.pt", ".tmp-checkpoint-000001"} <= synced, events


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the kernels' PyTorch path on CPU, as in the fixture above
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


@pytest.mark.slow  # ~60 s: run on the newest transformers only in CI
def test_killed_run_resumes_with_the_same_losses(tmp_path):
    """SIGKILL a training process after its first checkpoint, resume in a new process: the steps after the
    checkpoint have the losses of an uninterrupted run (computed in-process with the same seeds)."""
    out = str(tmp_path / "killed")
    worker = os.path.join(HERE, "train_worker.py")
    proc = _run([worker, out, "--save-every", "2", "--sleep", "0.5"])
    ckpt = os.path.join(out, "checkpoint-000002")
    deadline = time.time() + 240  # a loaded machine imports torch and transformers slowly
    while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, output  # killed mid-run, not finished
    assert os.path.isdir(ckpt), output
    with open(os.path.join(out, "log.jsonl")) as f:  # complete lines only: the kill may cut the last one
        before = [json.loads(line) for line in f if line.endswith("\n")]
    assert 2 <= before[-1]["step"] < 12

    resume = _run([worker, out, "--resume"])
    output = resume.communicate(timeout=120)[0].decode()
    assert resume.returncode == 0, output
    # The log was cut back to the checkpoint the run resumed from, so it reads like an uninterrupted run's.
    after = _log(out)
    assert [r["step"] for r in after] == list(range(1, 13))

    full = str(tmp_path / "full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker: the same reduction order, so the losses are bit-identical
    try:
        Trainer(
            train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(full), device=CPU
        ).fit()
    finally:
        torch.set_num_threads(threads)
    expected = {r["step"]: r["loss"] for r in _log(full)}
    assert [r["loss"] for r in after] == [expected[r["step"]] for r in after]


# --- a run's safety ----------------------------------------------------------------------------------------------


def _strict_log(path: str) -> list[dict]:
    """log.jsonl read as strict JSON (NaN and Infinity refused)."""
    def refuse(name):
        raise ValueError(f"log.jsonl holds {name}")

    with open(os.path.join(path, "log.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def _refused(capsys, argv: list[str], *parts: str) -> str:
    """``s1fast train ARGV`` stops as argparse's ``parser.error`` does: the usage, then one line
    ``s1fast train: error: ...`` holding each of ``parts``, exit status 2. Returns that line."""
    from s1fast.train.cli import _parser, main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err, usage = capsys.readouterr().err, _parser().format_usage()
    line = err[len(usage):]
    assert e.value.code == 2 and err.startswith(usage), err
    assert line.startswith("s1fast train: error: ") and line.count("\n") == 1, err
    for part in parts:
        assert part in line, err
    return line


def test_output_dir_is_locked_while_a_run_uses_it(tmp_path, capsys):
    """A second run into a directory in use is refused, naming the holder's pid; the kernel releases the lock
    when the holder dies, even by SIGKILL."""

    out = str(tmp_path / "run")
    os.makedirs(out)
    ready, told = os.pipe()
    holder = os.fork()  # another process (a fork: no second start-up of torch) that holds the directory
    if holder == 0:
        try:
            os.close(ready)
            with claim_output_dir(out, resume=False):
                os.write(told, b"held")
                time.sleep(300)
        finally:
            os._exit(0)
    os.close(told)
    try:
        assert os.read(ready, 4) == b"held"
        _refused(capsys, ["--out", out, "--no-progress"], f"--out '{out}' is in use by another run (pid {holder})")
        init_distributed("cpu")  # main ended the process group
        trainer = Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(8),
                          train_worker.config(out, global_batch=8, max_steps=1), device=CPU)
        with pytest.raises(BlockingIOError, match=f"pid {holder}"):
            trainer.fit()
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written by the refused runs
    finally:
        os.close(ready)
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)

    def locked() -> bool:  # another open file description cannot take the lock while it is held
        fd = os.open(os.path.join(out, ".lock"), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    assert not locked()  # the killed holder's lock is gone
    with claim_output_dir(out, resume=False):
        assert locked()
        with claim_output_dir(out, resume=False):  # reentrant in one process (the command, then fit)
            pass
        assert locked()
    assert not locked()


def test_a_new_run_into_a_used_output_dir_is_refused(tmp_path, capsys):
    """A run's log, checkpoints and model are never mixed with another's: a new run into a used directory is
    refused, saying what to do, and so is a resume where an interrupted first save left no complete checkpoint."""

    out = str(tmp_path / "used")
    Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(out, max_steps=2),
            device=CPU).fit()
    def state() -> dict:  # every name and its modification time, but the lock file (rewritten with each holder's pid)
        return {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out) if name != ".lock"}

    before = state()
    with pytest.raises(
        FileExistsError, match=r"already holds a run \(checkpoint-000002, log.jsonl\); continue it with --resume"
    ):
        Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(out), device=CPU).fit()
    _refused(capsys, ["--out", out, "--no-progress"], f"--out '{out}' already holds a run",
             "continue it with --resume, or choose another --out")
    assert state() == before

    # What a SIGKILL during the first checkpoint leaves: the log of steps 1-2 and a temporary checkpoint.
    cut = tmp_path / "cut"
    (cut / ".tmp-checkpoint-000002").mkdir(parents=True)
    (cut / ".tmp-checkpoint-000002" / "__0_0.distcp").write_bytes(b"\0" * 100)
    log = "".join(json.dumps({"step": s, "loss": 6.0}) + "\n" for s in (1, 2))
    (cut / "log.jsonl").write_text(log)
    _refused(capsys, ["--out", str(cut), "--no-progress"], "it has no complete checkpoint to resume from: delete it")
    _refused(capsys, ["--out", str(cut), "--resume", "--no-progress"],
             f"--resume: no complete checkpoint in '{cut}' (.tmp-checkpoint-000002 is a save cut short)")
    assert (cut / "log.jsonl").read_text() == log  # never 1, 2, 1, 2, 3


def test_resume_refuses_changed_settings(tmp_path):
    """Every setting that changes the numbers is compared with the checkpoint's: a difference is refused with
    one line listing them, unless allowed; then the new hyperparameters apply from the checkpoint's step."""
    out = str(tmp_path / "run")
    Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(out, max_steps=3),
            device=CPU).fit()
    ckpt = latest_checkpoint(out)
    data = train_worker.synthetic_dataset()
    changes = dict(
        lr=1e-3,
        seed=1,
        warmup_ratio=0.2,
        max_grad_norm=0.5,
        epochs=3,
        global_batch=3,
        micro_batch_tokens=128,
        weight_decay=0.1,
        betas=(0.9, 0.99),
        pack=False,
        param_dtype="bf16",
        model_name="another model",
    )
    for name, value in changes.items():
        settings = run_settings(train_worker.config(out, **{name: value}), data)
        with pytest.raises(
            ValueError, match=rf"settings differ from {re.escape(ckpt)}/trainer_state.json: {name} .* -> "
        ):
            read_checkpoint(ckpt, settings, 10**6)
    with pytest.raises(ValueError, match=r"trainer_state.json: data [0-9a-f\"]+ -> "):  # other tokens or labels
        read_checkpoint(ckpt, run_settings(train_worker.config(out), train_worker.synthetic_dataset(seed=2)), 10**6)
    # Not numbers: where and how often to save and log, how far to go, gradient checkpointing.
    same = train_worker.config(
        out, save_every=5, log_every=2, keep_checkpoints=1, max_steps=7, gradient_checkpointing=True
    )
    assert read_checkpoint(ckpt, run_settings(same, data), 12)["step"] == 3

    trainer = Trainer(train_worker.tiny_model(), data, train_worker.config(out, lr=1e-3, seed=5), device=CPU)
    with pytest.raises(ValueError) as refused:
        trainer.load_checkpoint(ckpt)
    assert (
        "lr 0.003 -> 0.001; seed 0 -> 5. Resume with the checkpoint's settings, or pass --allow-changed-settings"
        in str(refused.value)
    )
    assert "\n" not in str(refused.value) and trainer.step == 0

    trainer = Trainer(
        train_worker.tiny_model(),
        data,
        train_worker.config(out, lr=1e-3, weight_decay=0.5, betas=(0.8, 0.9)),
        device=CPU,
    )
    trainer.load_checkpoint(ckpt, allow_changed_settings=True)
    decay, plain = trainer.optimizer.param_groups
    factor = trainer.scheduler.lr_lambdas[0]
    assert trainer.step == 3 and 0 < factor(3) < 1
    assert decay["lr"] == plain["lr"] == 1e-3 * factor(3)  # the new peak on the schedule, not the old 3e-3
    assert (decay["weight_decay"], plain["weight_decay"], decay["betas"]) == (0.5, 0.0, (0.8, 0.9))
    assert all(int(s["step"]) == 3 for s in trainer.optimizer.state.values())  # the moments are the checkpoint's


@pytest.mark.parametrize("flag, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1"), ("--epochs", "0"), ("--epochs", "1.5"),
    ("--micro-batch-tokens", "0"), ("--global-batch", "0"), ("--block-size", "0"), ("--warmup-ratio", "1"),
    ("--max-grad-norm", "nan"), ("--weight-decay", "-1e-4"), ("--save-every", "-1"), ("--out", ""),
    ("--resume", ""), ("--data", " "),
])
def test_bad_settings_are_refused_at_parsing(flag, value, capsys):
    from s1fast.train.cli import main

    with pytest.raises(SystemExit) as e:
        main([flag, value])
    assert e.value.code == 2
    assert f"s1fast train: error: argument {flag}: expected " in capsys.readouterr().err


def test_bad_settings_are_refused_by_the_config():
    for name, value in [
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("lr", 0.0),
        ("max_grad_norm", float("nan")),
        ("weight_decay", float("inf")),
        ("warmup_ratio", float("nan")),
        ("epochs", 0),
        ("betas", (0.9, 1.0)),
    ]:
        with pytest.raises(ValueError, match=name):
            train_worker.config("unused", **{name: value}).check()


def test_divergence_stops_training_before_anything_is_saved(tmp_path):
    """lr 1e3 makes the gradient norm NaN within a few steps: fit stops at that step, naming it, and no checkpoint
    of it or a later step exists (with log_every 4, a checkpoint still waits for its step's loss to be checked);
    the log stays strict JSON."""
    out = str(tmp_path / "run")
    trainer = Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(),
                      train_worker.config(out, lr=1e3, save_every=1, log_every=4), device=CPU)
    with pytest.raises(
        FloatingPointError, match=r"^training diverged at step (\d+): loss \S+, gradient norm \S+;"
    ) as e:
        trainer.fit()
    bad = int(re.match(r"training diverged at step (\d+)", str(e.value))[1])
    assert bad > 1 and "\n" not in str(e.value)
    assert [r["step"] for r in _strict_log(out)] == list(range(1, bad))
    assert latest_checkpoint(out).endswith(f"checkpoint-{bad - 1:06d}")
    assert not glob.glob(os.path.join(out, ".tmp-*"))


def test_a_full_disk_says_so_and_removes_the_partial_files(tmp_path, monkeypatch):
    """ENOSPC while writing a checkpoint or the model: one line that says the disk is full, and no partial files.
    torch.save reports a full disk as "unexpected pos" without the errno: the space left decides then."""
    out = str(tmp_path / "run")
    trainer = Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(8),
                      train_worker.config(out, global_batch=8, max_steps=1), device=CPU)
    fsync = os.fsync

    def failing(error):
        def fail(fd):
            raise error
        return fail

    monkeypatch.setattr(os, "fsync", failing(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(
        OSError,
        match=rf"^no space left on the device of '{re.escape(out)}' while writing checkpoint-000001; "
        rf"the partial .tmp-checkpoint-000001 was removed: free some space, then delete '{re.escape(out)}' "
        "and start again$",
    ):
        trainer.fit()
    assert sorted(os.listdir(out)) == [".lock", "log.jsonl"]

    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(os, "fsync", failing(torch_full))
    with pytest.raises(
        OSError,
        match=r"writing .*checkpoint-000001 failed \(RuntimeError: \[enforce fail .* unexpected pos 704 vs 598\)",
    ):
        trainer.save_checkpoint()  # plenty of space left: not called a full disk
    usage = shutil.disk_usage(out)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(OSError, match="^no space left on the device"):
        trainer.save_checkpoint()
    assert sorted(os.listdir(out)) == [".lock", "log.jsonl"]

    monkeypatch.setattr(os, "fsync", fsync)
    trainer.save_checkpoint()  # with room again

    def save_file(tensors, path, **kwargs):  # a model file cut short by a full disk
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError, match=r"^no space left .* while writing model.safetensors; the partial .tmp-model was "
                                      "removed: free some space, then run again with --resume$"):
        trainer.save_model()
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-000001", "log.jsonl"]


def _signalled(main, argv: list[str], sig: signal.Signals, ready) -> int:
    """``main(argv)``, while a thread sends ``sig`` to this process once ``ready()`` holds (never after main()
    returned): real signals, as a user's Ctrl-C or a scheduler's SIGTERM."""
    done = threading.Event()

    def send():
        while not ready() and not done.is_set():
            time.sleep(0.01)
        if not done.is_set():
            os.kill(os.getpid(), sig)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return main(argv)
    finally:
        done.set()
        sender.join()


def test_sigterm_and_sigint_end_with_one_line_and_a_resumable_state(tmp_path, capsys):
    """`s1fast train` stopped by SIGTERM once it has a checkpoint, resumed, stopped by SIGINT (Ctrl-C): each time
    one line (no traceback) and 128 + the signal; no partial checkpoint is left, and the run resumes from the last
    one. The signals are real, sent to this process by a thread while main() trains in it."""
    from s1fast.train import make_sample
    from s1fast.train.cli import main

    data, out = _jsonl(tmp_path / "d.jsonl", make_sample.make_rows(4)), str(tmp_path / "run")
    args = ["--data", data, "--out", out, "--global-batch", "1", "--epochs", "50", "--save-every", "1",
            "--no-progress", "--no-decode"]

    def step() -> int:
        last = latest_checkpoint(out)
        return int(last[-6:]) if last else 0

    def stop(extra: list[str], sig: signal.Signals, after: int) -> int:
        rc = _signalled(main, [*args, *extra], sig, lambda: step() > after)  # once a checkpoint past `after` exists
        err = capsys.readouterr().err
        assert rc == 128 + sig, err
        assert re.fullmatch(  # the step under way finishes and is saved (the signal's note), then one line
            rf"\n{sig.name}: stopping after this step, with a checkpoint \(again: stop at once\)\n"
            rf"s1fast train: interrupted \({sig.name}\); {re.escape(out)}/checkpoint-\d{{6}} is complete: "
            "continue with --resume\n",
            err,
        ), err
        assert not glob.glob(os.path.join(out, ".tmp-*"))
        return step()

    first = stop([], signal.SIGTERM, 0)
    last = stop(["--resume"], signal.SIGINT, first)
    assert last > first
    assert main([*args, "--resume", "--max-steps", str(last + 1)]) == 0
    assert f"resumed from {out}/checkpoint-{last:06d} at step {last}" in capsys.readouterr().out
    assert [r["step"] for r in _strict_log(out)] == list(range(1, last + 2))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_that_resumes_to_the_same_losses(tmp_path, capsys, sig):
    """No --save-every: Ctrl-C or SIGTERM during a step lets it finish and saves it; resumed, the run's losses are
    those of a run never stopped (bit for bit, as the log keeps them)."""
    from s1fast.train import make_sample
    from s1fast.train.cli import main

    data = _jsonl(tmp_path / "d.jsonl", make_sample.make_rows(4))
    args = ["--data", data, "--global-batch", "1", "--epochs", "50", "--no-progress", "--no-decode"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert main([*args, "--out", whole, "--max-steps", "5"]) == 0
    log = os.path.join(cut, "log.jsonl")
    rc = _signalled(main, [*args, "--out", cut], sig, lambda: os.path.isfile(log) and os.path.getsize(log) > 0)
    assert rc == 128 + sig
    stopped = latest_checkpoint(cut)
    assert stopped is not None and 1 <= int(stopped[-6:]) < 5, os.listdir(cut)
    assert f"s1fast train: interrupted ({sig.name}); {stopped} is complete" in capsys.readouterr().err
    assert main([*args, "--out", cut, "--resume", "--max-steps", "5"]) == 0
    assert [(r["step"], r["loss"]) for r in _strict_log(cut)] == [(r["step"], r["loss"]) for r in _strict_log(whole)]


def test_checkpoints_are_saved_at_the_end_of_every_epoch(tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(),
                      train_worker.config(out, global_batch=8, max_steps=5, keep_checkpoints=5), device=CPU)
    trainer.fit()
    per_epoch = trainer.steps_per_epoch
    assert per_epoch < 5 and checkpoint_steps(out) == sorted({*range(per_epoch, 5, per_epoch), 5})


def test_damaged_checkpoints_are_named(tmp_path):
    """Each damaged checkpoint file gives one line naming it."""
    out = str(tmp_path / "run")
    Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(out, max_steps=2),
            device=CPU).fit()
    good = latest_checkpoint(out)
    trainer = Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(out), device=CPU)

    def truncate(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    def write(path, content):
        with open(path, "w" + ("b" if isinstance(content, bytes) else "")) as f:
            f.write(content)

    def step_999(path):
        with open(path) as f:
            state = json.load(f)
        write(path, json.dumps({**state, "step": 999}))

    cases = [  # (file, damage, message)
        ("__0_0.distcp", truncate, r" is truncated \([\d,]+ of [\d,]+ bytes\): the checkpoint is damaged"),
        (
            "model.safetensors",
            truncate,
            r" is truncated or not a safetensors file \([\d,]+ bytes\): the checkpoint is damaged",
        ),
        (
            "model.safetensors",
            os.remove,
            r" is missing \(no model.safetensors.index.json either\): no safetensors weights: "
            r"the checkpoint is damaged",
        ),
        (".metadata", os.remove, r" is missing: the checkpoint is incomplete"),
        (".metadata", lambda p: write(p, b"\x80garbage"), r" is unreadable \("),
        ("trainer_state.json", lambda p: write(p, "{not json"), r": not a valid trainer state \(JSONDecodeError"),
        ("trainer_state.json", step_999, r": step 999 is past the end of this run \(12 steps\)"),
        ("rng-rank0.pt", lambda p: write(p, b"garbage"), r" is unreadable \("),  # last: the states before it load
    ]
    assert os.path.isfile(os.path.join(good, "__0_0.distcp"))
    for i, (name, damage, message) in enumerate(cases):
        path = shutil.copytree(good, str(tmp_path / f"damaged{i}"))
        damage(os.path.join(path, name))
        with pytest.raises(ValueError, match=re.escape(os.path.join(path, name)) + message) as e:
            trainer.load_checkpoint(path)
        assert "\n" not in str(e.value)
    trainer.load_checkpoint(good)  # the undamaged one loads
    assert trainer.step == 2


# --- the saved model -------------------------------------------------------------------------------------------


def test_saved_model_loads_in_transformers_and_s1fast(tmp_path):
    from transformers import AutoModelForCausalLM

    from s1fast.model.patch import load

    out = str(tmp_path / "run")
    trainer = Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(),
                      train_worker.config(out, max_steps=2), device=CPU)
    trainer.fit()
    trainer.save_model(dtype=torch.float32)
    trained = {k: v.full_tensor() for k, v in trainer.model.state_dict().items()}
    ids = torch.tensor([train_worker.synthetic_examples(1, seed=9)[0]["input_ids"]])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load(out, dtype=torch.float32, device="cpu").eval()
    for name, p in hf.state_dict().items():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0, msg=name)
    reference = train_worker.tiny_model(patched=False).eval()
    reference.load_state_dict(trained)
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        torch.testing.assert_close(hf(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# --- the command -----------------------------------------------------------------------------------------------


def test_cli_demo_trains_saves_and_decodes(tmp_path, capsys, monkeypatch):
    """`s1fast train` defaults (tiny random Qwen2, real Qwen vocabulary, bundled sample), cut to 2 steps."""
    from s1fast.train import cli
    from s1fast.train.cli import main

    out = str(tmp_path / "demo")
    rc = main(["--out", out, "--max-steps", "2", "--global-batch", "2", "--no-progress",
               "--max-thinking-tokens", "6", "--num-waits", "1", "--max-new-tokens", "12"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "data: 320 examples" in printed and "trained 2 steps" in printed
    assert "--- thinking (" in printed and "--- answer (" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "log.jsonl", "checkpoint-000002"} <= set(
        os.listdir(out)
    )
    assert [r["step"] for r in _log(out)] == [1, 2]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 151936

    rc = main(["--out", out, "--resume", "--max-steps", "3", "--global-batch", "2", "--no-progress", "--no-decode"])
    printed = capsys.readouterr().out
    assert rc == 0 and "resumed from" in printed and "trained 1 steps" in printed
    assert [r["step"] for r in _log(out)] == [1, 2, 3]

    # Resuming with another learning rate, or from a damaged checkpoint: one line, before the model loads.
    monkeypatch.setattr(cli, "_build_model", _no_model)
    _refused(capsys, ["--out", out, "--resume", "--global-batch", "2", "--lr", "0.5", "--no-progress"],
             "settings differ from", "lr 0.01 -> 0.5")
    distcp = os.path.join(latest_checkpoint(out), "__0_0.distcp")
    with open(distcp, "r+b") as f:
        f.truncate(1000)
    _refused(capsys, ["--out", out, "--resume", "--global-batch", "2", "--no-progress"], f"{distcp} is truncated")


def test_cli_demo_runs_twice_in_its_default_directory(tmp_path, capsys, monkeypatch):
    """The README's `s1fast train` (no --out: ./s1fast-demo) run a second time continues the first run (exit 0);
    with other settings it is refused, naming them, so two runs never mix."""
    from s1fast.train import cli
    from s1fast.train.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["--max-steps", "2", "--global-batch", "2", "--no-progress", "--no-decode"]
    assert main(args) == 0 and "trained 2 steps" in capsys.readouterr().out
    first = _log("s1fast-demo")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "s1fast train: s1fast-demo holds the demo run of an earlier call: continuing it" in printed
    assert "resumed from s1fast-demo/checkpoint-000002 at step 2" in printed
    assert not re.search(r"trained \d+ steps", printed)
    assert _log("s1fast-demo") == first and os.path.isfile("s1fast-demo/model.safetensors")
    monkeypatch.setattr(cli, "_build_model", _no_model)
    _refused(capsys, [*args, "--lr", "0.5"], "settings differ from", "lr 0.01 -> 0.5")


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def _jsonl(path, rows: list) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def test_cli_divergence_stops_with_one_line_and_saves_no_model(tmp_path, capsys):
    from s1fast.train import make_sample

    data, out = _jsonl(tmp_path / "d.jsonl", make_sample.make_rows(4)), str(tmp_path / "run")
    _refused(capsys, ["--data", data, "--out", out, "--lr", "1e4", "--global-batch", "1", "--epochs", "5",
                      "--no-progress", "--no-decode"], "training diverged at step")
    assert not {"config.json", "model.safetensors"} & set(os.listdir(out))
    assert _strict_log(out)


def test_cli_bad_model_tokenizer_data_or_output_dir(tmp_path, capsys, monkeypatch):
    """Each a one-line error with exit 2, before any model loads."""
    from s1fast.train import cli, make_sample

    monkeypatch.setattr(cli, "_build_model", _no_model)
    model = tmp_path / "model"
    train_worker.tiny_model(patched=False).save_pretrained(str(model))
    capsys.readouterr()  # transformers' progress bar
    assert cli._argument_problem(cli._parser().parse_args(["--model", str(model)])) is None  # a whole one passes
    size = os.path.getsize(model / "model.safetensors")

    def broken(name, damage) -> str:
        path = shutil.copytree(model, tmp_path / name)
        damage(path)
        return str(path)

    cases = [
        (
            broken("half", lambda p: os.truncate(p / "model.safetensors", size // 2)),
            "model.safetensors': truncated or not a safetensors file",
        ),
        (
            broken("garbage", lambda p: (p / "model.safetensors").write_bytes(os.urandom(size))),
            "truncated or not a safetensors file",
        ),
        (
            broken("llama", lambda p: (p / "config.json").write_text('{"model_type": "llama"}')),
            "model_type 'llama'; s1fast runs Qwen2, Qwen2.5 and Qwen3 (qwen2, qwen3)",
        ),
        (broken("bad-config", lambda p: (p / "config.json").write_text("{")), "config.json does not load (OSError: "),
        (broken("no-config", lambda p: (p / "config.json").unlink()), "no config.json"),
        (broken("no-weights", lambda p: (p / "model.safetensors").unlink()), "no weights in it"),
    ]
    for path, message in cases:
        _refused(capsys, ["--model", path, "--out", str(tmp_path / "o"), "--no-progress"], "--model", message)

    (tmp_path / "tok").mkdir()
    _refused(capsys, ["--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o")],
             f"--tokenizer '{tmp_path / 'tok'}': no tokenizer files in it")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(capsys, ["--out", str(blocker), "--no-progress"], f"--out '{blocker}' is a file, not a directory")

    record = make_sample.make_rows(1)[0]
    data = tmp_path / "d.jsonl"
    for row, message in (([1, 2], "d.jsonl: line 2 is a JSON array, expected an object"),
                         ({"question": "q", "attempt": "a"}, "row 1: missing column(s) ['thinking_trajectories']")):
        _refused(capsys, ["--data", _jsonl(data, [record, row]), "--out", str(tmp_path / "o"), "--no-progress"],
                 message)
    data.write_bytes(b'{"question": "caf\xe9"}\n')  # Latin-1
    _refused(capsys, ["--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"],
             "d.jsonl: line 1 is not valid UTF-8")


def test_cli_bad_input(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(capsys, ["--out", str(blocker / "out"), "--no-progress"], "--out", "not writable")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _refused(capsys, ["--data", str(empty), "--out", str(tmp_path / "o"), "--no-progress"], "is empty")
    _refused(capsys, ["--out", str(tmp_path / "o"), "--resume", "--no-progress", "--max-steps", "1"],
             "no complete checkpoint")
    _refused(capsys, ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")], "--model")
    _refused(capsys, ["--device", "gpu", "--out", str(tmp_path / "o")], "--device must be cuda[:N] or cpu, got 'gpu'")
    _refused(capsys, ["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'")

    init_distributed("cpu")  # main ended the process group
    with pytest.raises(ValueError, match="global_batch must be an integer >= 1"):
        Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(),
                train_worker.config(str(tmp_path / "c"), global_batch=0), device=CPU)
    with pytest.raises(ValueError, match="dataset is empty"):
        Trainer(train_worker.tiny_model(), Dataset([], [], []), train_worker.config(str(tmp_path / "c")), device=CPU)
