"""The s1fast trainer: packing, the exact global-batch loss, checkpoints and resume (with a real kill), 2-process
FSDP2 equal to 1 process, the saved model, and the ``s1fast train`` command (demo and bad input)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from s1fast.kernels import force_backend
from s1fast.train.data import IGNORE_INDEX, Dataset
from s1fast.train.trainer import (
    Trainer,
    collate,
    init_distributed,
    latest_checkpoint,
    num_items,
    plan_micro_batches,
)

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


def test_global_batch_loss_independent_of_split(tmp_path):
    """The same step with one packed row, rows of 64 tokens, one example per row, or gradient checkpointing:
    same loss, same weights."""
    dataset = train_worker.synthetic_dataset(8)
    results = []
    for i, (tokens, pack, ckpt) in enumerate([(4096, True, False), (64, True, False), (4096, False, False), (64, True, True)]):
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


def test_s1_schedule_and_step_count(tmp_path):
    """s1: 1,000 examples, global batch 16, 5 epochs = 63 steps per epoch (the last batch of an epoch holds 8),
    315 optimizer steps; AdamW 1e-5, betas (0.9, 0.95), weight decay 1e-4 on matrices only; linear warmup over
    ceil(5% of 315) = 16 steps (from 0, as transformers' Trainer), then cosine to 0."""
    from s1fast.train.trainer import TrainConfig

    trainer = Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(1000),
                      TrainConfig(output_dir=str(tmp_path), param_dtype="float32", progress=False), device=CPU)
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

    with pytest.raises(ValueError, match="global batch"):
        Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(part, global_batch=3),
                device=CPU).load_checkpoint(latest_checkpoint(part))
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resumed.load_checkpoint(str(tmp_path))


def test_checkpoint_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """trainer_state.json and the RNG state are fsynced, then the temporary directory, then it is renamed."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))) or fsync(fd))
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


def test_killed_run_resumes_with_the_same_losses(tmp_path):
    """SIGKILL a training process after its first checkpoint, resume in a new process: the steps after the
    checkpoint have the losses of an uninterrupted run (computed in-process with the same seeds)."""
    out = str(tmp_path / "killed")
    worker = os.path.join(HERE, "train_worker.py")
    proc = _run([worker, out, "--save-every", "2", "--sleep", "0.5"])
    ckpt = os.path.join(out, "checkpoint-000002")
    deadline = time.time() + 60
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
        Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(full), device=CPU).fit()
    finally:
        torch.set_num_threads(threads)
    expected = {r["step"]: r["loss"] for r in _log(full)}
    assert [r["loss"] for r in after] == [expected[r["step"]] for r in after]


def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo, FSDP2 sharding, micro-batches split across ranks) gives the losses of
    one process with the same global batch."""
    two = str(tmp_path / "two")
    proc = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 os.path.join(HERE, "train_worker.py"), two, "--max-steps", "6"])
    output = proc.communicate(timeout=150)[0].decode()
    assert proc.returncode == 0, output
    one = str(tmp_path / "one")
    Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(), train_worker.config(one, max_steps=6),
            device=CPU).fit()
    got, want = [r["loss"] for r in _log(two)], [r["loss"] for r in _log(one)]
    assert len(got) == 6
    # Different reduction orders (per-rank partial sums, sharded AdamW) in fp32 over 6 steps: ~1e-6 relative.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    assert got[-1] < got[0]


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


def test_cli_demo_trains_saves_and_decodes(tmp_path, capsys):
    """`s1fast train` defaults (tiny random Qwen2, real Qwen vocabulary, bundled sample), cut to 2 steps."""
    from s1fast.train.cli import main

    out = str(tmp_path / "demo")
    rc = main(["--output-dir", out, "--max-steps", "2", "--global-batch", "2", "--no-progress",
               "--max-thinking-tokens", "6", "--num-waits", "1", "--max-new-tokens", "12"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "data: 320 examples" in printed and "trained 2 steps" in printed
    assert "--- thinking (" in printed and "--- answer (" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "log.jsonl", "checkpoint-000002"} <= set(os.listdir(out))
    assert [r["step"] for r in _log(out)] == [1, 2]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 151936

    rc = main(["--output-dir", out, "--resume", "--max-steps", "3", "--global-batch", "2", "--no-progress", "--no-decode"])
    printed = capsys.readouterr().out
    assert rc == 0 and "resumed from" in printed and "trained 1 steps" in printed
    assert [r["step"] for r in _log(out)] == [1, 2, 3]


def test_cli_bad_input(tmp_path, capsys):
    from s1fast.train.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--output-dir", str(blocker / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "not writable" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["--data", str(empty), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "is empty" in capsys.readouterr().err

    assert main(["--output-dir", str(tmp_path / "o"), "--resume", "--no-progress", "--max-steps", "1"]) == 2
    assert "no checkpoint" in capsys.readouterr().err

    assert main(["--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--device", "gpu", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--device 'gpu'" in capsys.readouterr().err

    with pytest.raises(ValueError, match="global_batch must be >= 1"):
        Trainer(train_worker.tiny_model(), train_worker.synthetic_dataset(),
                train_worker.config(str(tmp_path / "c"), global_batch=0), device=CPU)
    with pytest.raises(ValueError, match="dataset is empty"):
        Trainer(train_worker.tiny_model(), Dataset([], [], []), train_worker.config(str(tmp_path / "c")), device=CPU)
