"""The s1 SFT loop: padding-free packed micro-batches, exact token-mean loss over each global batch, FSDP2 on
one process or many (torchrun), atomic checkpoints with exact resume.

One code path for every world size: the process group is torchrun's, or a one-rank group when run alone, and
the model is always sharded with :func:`s1fast.model.fsdp.shard_model` (fp32 master weights, compute in
``param_dtype``, fp32 gradient reduction). Everything that decides the numbers is deterministic given the seed:
the shuffle of epoch ``e`` is a permutation seeded by ``(seed, e)``, and a global batch is split into
micro-batches by a fixed rule, so resuming from step ``k`` replays steps ``k+1, ...`` exactly.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from s1fast.model.fsdp import shard_model
from s1fast.model.patch import causal_lm
from s1fast.train.data import IGNORE_INDEX, Dataset, write_atomic

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    """Defaults are s1's recipe (AdamW 1e-5, betas 0.9/0.95, wd 1e-4, 5% warmup then cosine, 5 epochs,
    global batch 16, bf16, gradient clipping at 1.0 as transformers' Trainer does by default)."""

    output_dir: str
    epochs: int = 5
    global_batch: int = 16
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 32768  # token budget of one packed row (an example longer than it gets a row alone)
    pack: bool = True  # several examples per row (False: one example per row)
    gradient_checkpointing: bool = False
    param_dtype: str = "bfloat16"  # compute dtype; master weights, optimizer state and reductions stay fp32
    seed: int = 0
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    max_steps: int | None = None  # stop after this many steps (the schedule still spans the whole run)
    progress: bool = True

    def check(self) -> None:
        for name in ("epochs", "global_batch", "micro_batch_tokens", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "max_grad_norm", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.param_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"param_dtype must be bfloat16, float16 or float32, got {self.param_dtype!r}")


# --- distributed set-up --------------------------------------------------------------------------------------


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device). Under torchrun: its process group (NCCL on CUDA, gloo on CPU) and
    ``cuda:LOCAL_RANK``; alone: a one-rank group, so the same FSDP2 code path runs."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), dev


# --- packing -------------------------------------------------------------------------------------------------


def plan_micro_batches(lengths: Sequence[int], *, world_size: int, max_tokens: int, pack: bool) -> list[list[list[int]]]:
    """Split one global batch into micro-batches, per rank: ``plan[rank][m]`` lists positions into ``lengths``.

    Packing is first-fit decreasing into rows of at most ``max_tokens`` tokens (an example longer than that gets
    a row alone), so examples of similar length share rows and no token is padding. Rows go to the rank with
    the fewest tokens so far (longest first), and every rank gets the same number of micro-batches (FSDP needs
    the same collectives on every rank): a rank short of rows gets empty ones, which contribute nothing.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        slot = next((r for r, free in enumerate(room) if pack and free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(max_tokens - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    plan: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for row in sorted(rows, key=lambda r: -sum(lengths[i] for i in r)):
        rank = min(range(world_size), key=lambda r: (load[r], len(plan[r]), r))
        plan[rank].append(row)
        load[rank] += sum(lengths[i] for i in row)
    count = max(len(p) for p in plan)
    for p in plan:
        p.extend([] for _ in range(count - len(p)))
    return plan


def collate(examples: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row ``[1, T]`` with ``position_ids`` restarting at 0 for each example.

    Each example's first label becomes -100: the model shifts labels, so the last token of one example would
    otherwise be trained to predict the first token of the next. Attention stays inside each example because
    transformers reads the restarting ``position_ids`` (flash-attn varlen, or sdpa's block-diagonal mask); the
    model must be called without ``attention_mask`` and with ``use_cache=False``. No examples: one ignored token.
    """
    if not examples:
        return {
            "input_ids": torch.tensor([[pad_id]]),
            "labels": torch.tensor([[IGNORE_INDEX]]),
            "position_ids": torch.zeros(1, 1, dtype=torch.long),
        }
    ids, labels, positions = [], [], []
    for ex in examples:
        ids.extend(ex["input_ids"])
        labels.append(IGNORE_INDEX)
        labels.extend(ex["labels"][1:])
        positions.extend(range(len(ex["input_ids"])))
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }


def num_items(examples: Sequence[dict]) -> int:
    """Tokens that carry a loss after the shift: transformers' ``num_items_in_batch`` of these examples."""
    return sum(sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX) for ex in examples)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of ``epoch`` (the same on every rank and every resume)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# --- the trainer ---------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_writable(path: str, what: str = "output_dir") -> None:
    """Create ``path`` if needed and prove a file can be written there; a clear error naming ``what`` if not."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{what} {path!r} is not writable: {e.strerror or e}") from e


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in ``output_dir`` (temporaries are never complete)."""
    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(name[len(CHECKPOINT_PREFIX):]) for name in os.listdir(output_dir)
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()
    ]  # fmt: skip
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{max(steps):06d}") if steps else None


class Trainer:
    """Trains ``model`` (a Qwen causal LM, patched or not, in fp32, on ``device``) on ``dataset``.

    ``init_distributed`` must have run. The model is sharded here (FSDP2, one unit per decoder layer) and
    trained in place; ``fit()`` returns the loss of every step it ran, ``save_model()`` writes the result
    with ``save_pretrained``.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, config: TrainConfig, *, device: torch.device,
                 tokenizer=None, pad_id: int = 0):
        config.check()
        if not len(dataset):
            raise ValueError("dataset is empty: no examples to train on")
        self.config, self.dataset, self.device, self.tokenizer, self.pad_id = config, dataset, device, tokenizer, pad_id
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_writable(config.output_dir)
        self.lengths = [len(ex["input_ids"]) for ex in dataset.examples]
        self.steps_per_epoch = math.ceil(len(dataset) / config.global_batch)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.step = 0

        lm = causal_lm(model)
        lm.config.use_cache = False
        if config.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        param_dtype = getattr(torch, config.param_dtype)
        self.model = shard_model(
            model, param_dtype=None if param_dtype == torch.float32 else param_dtype, reduce_dtype=torch.float32,
            reshard_after_forward=self.world > 1,
        )
        self.model.train()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]  # no decay on biases and norm weights
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=config.betas,
        )
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, math.ceil(config.warmup_ratio * self.total_steps), self.total_steps
        )

    # -- one optimizer step --

    def batch_positions(self, step: int) -> list[int]:
        """Dataset positions of the global batch of optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.dataset), self.config.seed, epoch)
        return order[k * self.config.global_batch:(k + 1) * self.config.global_batch]

    def train_step(self, examples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward every micro-batch of this rank, clip, step. Returns (this rank's share of the global
        batch loss, gradient norm), both on the device, unsynchronised. The global batch loss is the sum of every
        token's loss over the number of trained tokens, however the batch is split into micro-batches and ranks."""
        cfg = self.config
        n_items = num_items(examples)
        plan = plan_micro_batches([len(ex["input_ids"]) for ex in examples], world_size=self.world,
                                  max_tokens=cfg.micro_batch_tokens, pack=cfg.pack)[self.rank]
        total = torch.zeros((), device=self.device)
        for row in plan:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in collate([examples[i] for i in row], self.pad_id).items()}
            out = self.model(**batch, num_items_in_batch=n_items, use_cache=False)
            # FSDP averages gradients over ranks; each rank's loss is already a share of the global sum.
            (out.loss * self.world).backward()
            total += out.loss.detach().float()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    # -- the loop --

    def fit(self, on_step: Callable[[int, dict], None] | None = None) -> list[float]:
        """Train from ``self.step`` to the end (or ``max_steps``), logging and checkpointing; returns the
        global-batch loss of each step run."""
        cfg = self.config
        end = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        logger = _Logger(cfg.output_dir, enabled=self.rank == 0)
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        losses: list[float] = []
        pending: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []
        window_tokens, window_t0 = 0, time.perf_counter()
        try:
            while self.step < end:
                examples = [self.dataset.examples[i] for i in self.batch_positions(self.step)]
                loss, grad_norm = self.train_step(examples)
                self.step += 1
                tokens = sum(len(ex["input_ids"]) for ex in examples)
                window_tokens += tokens
                pending.append((self.step, loss, grad_norm, tokens))
                if self.step % cfg.log_every == 0 or self.step == end:
                    # The one host sync per log interval: all ranks sum their loss shares.
                    stacked = torch.stack([p[1] for p in pending])
                    dist.all_reduce(stacked)
                    norms = torch.stack([_local(p[2]) for p in pending]).tolist()
                    elapsed = time.perf_counter() - window_t0
                    tps = window_tokens / max(elapsed, 1e-9)
                    for (step, _, _, tok), value, norm in zip(pending, stacked.tolist(), norms):
                        losses.append(value)
                        record = {"step": step, "epoch": (step - 1) // self.steps_per_epoch + 1, "loss": value,
                                  "grad_norm": norm, "lr": self.scheduler.get_last_lr()[0], "tokens": tok,
                                  "tokens_per_s": tps}
                        logger.log(record)
                        if on_step is not None:
                            on_step(step, record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                        bar.update(len(pending))
                    pending, window_tokens, window_t0 = [], 0, time.perf_counter()
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == end:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        return losses

    # -- checkpoints --

    def save_checkpoint(self) -> str:
        """Write model, optimizer, scheduler, data position and RNG states of every rank into a temporary
        directory, then rename it to ``checkpoint-STEP`` (a crash leaves either no checkpoint or a whole one)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = os.path.join(self.config.output_dir, f"{CHECKPOINT_PREFIX}{self.step:06d}")
        if os.path.isdir(final):
            return final
        tmp = os.path.join(self.config.output_dir, f".tmp-{CHECKPOINT_PREFIX}{self.step:06d}")
        if self.rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
        _write_synced(os.path.join(tmp, f"rng-rank{self.rank}.pt"), lambda f: torch.save(_rng_state(), f))
        if self.rank == 0:
            state = {"step": self.step, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                     "num_examples": len(self.dataset), "world_size": self.world,
                     "scheduler": self.scheduler.state_dict(), "config": asdict(self.config)}
            _write_synced(os.path.join(tmp, "trainer_state.json"), lambda f: f.write(json.dumps(state, indent=1).encode()))
        dist.barrier()
        if self.rank == 0:  # every file is on disk (dcp.save fsyncs its own) before the rename makes it a checkpoint
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.config.output_dir)
            steps = sorted(int(n[len(CHECKPOINT_PREFIX):]) for n in os.listdir(self.config.output_dir)
                           if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit())
            for old in steps[:-self.config.keep_checkpoints]:
                shutil.rmtree(os.path.join(self.config.output_dir, f"{CHECKPOINT_PREFIX}{old:06d}"))
        dist.barrier()
        return final

    def load_checkpoint(self, path: str) -> None:
        """Restore everything ``save_checkpoint`` wrote; the run then continues exactly as if never stopped."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        state_path = os.path.join(path, "trainer_state.json")
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f"resume: {path!r} is not a checkpoint (no trainer_state.json)")
        with open(state_path) as f:
            state = json.load(f)
        for key, mine in (("num_examples", len(self.dataset)), ("steps_per_epoch", self.steps_per_epoch),
                          ("total_steps", self.total_steps)):
            if state[key] != mine:
                raise ValueError(f"resume: checkpoint {path!r} has {key}={state[key]} but this run has {mine}; "
                                 "resume with the same data, global batch and epochs")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sd = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = os.path.join(path, f"rng-rank{self.rank}.pt")
        if os.path.isfile(rng):
            _set_rng_state(torch.load(rng, weights_only=False))
        self.step = state["step"]
        if self.rank == 0:
            _truncate_log(self.config.output_dir, self.step)

    def save_model(self, path: str | None = None, dtype: torch.dtype | None = None) -> str:
        """Gather the full weights and ``save_pretrained`` them (in ``dtype``, default the compute dtype) with the
        tokenizer, on rank 0: loadable by ``transformers.AutoModelForCausalLM`` and ``s1fast.model.load``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        path = path or self.config.output_dir
        dtype = dtype or getattr(torch, self.config.param_dtype)
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            sd = {k: v.to(dtype) for k, v in sd.items()}
            lm = causal_lm(self.model)
            lm.config.use_cache = True
            lm.save_pretrained(path, state_dict=sd)
            lm.config.use_cache = False
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path)
        dist.barrier()
        return path


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2's grad norm is one), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _truncate_log(output_dir: str, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (those after it are about to be run again; a line cut short by
    a kill is dropped), so that a resumed run's log reads like an uninterrupted one."""
    path = os.path.join(output_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    write_atomic(path, "".join(keep))


def _write_synced(path: str, write: Callable) -> None:
    """``write(binary file)`` then flush and fsync, so a crash right after cannot leave the file empty."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Logger:
    """``log.jsonl`` in the output directory (appended across resumes), and TensorBoard when installed."""

    def __init__(self, output_dir: str, enabled: bool):
        self.file = self.tb = None
        if not enabled:
            return
        self.file = open(os.path.join(output_dir, "log.jsonl"), "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
