"""The s1 SFT loop: padding-free packed micro-batches, exact token-mean loss over each global batch, FSDP2 on
one process or many (torchrun), atomic checkpoints with exact resume.

One code path for every world size: the process group is torchrun's, or a one-rank group when run alone, and
the model is always sharded with :func:`s1fast.model.fsdp.shard_model` (fp32 master weights, compute in
``param_dtype``, fp32 gradient reduction). Everything that decides the numbers is deterministic given the seed:
the shuffle of epoch ``e`` is a permutation seeded by ``(seed, e)``, and a global batch is split into
micro-batches by a fixed rule, so resuming from step ``k`` replays steps ``k+1, ...`` exactly.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from s1fast.model.fsdp import (
    fsync_path as _fsync,
    is_model_file,
    load_weights,
    materialize,
    safetensors_whole,
    save_weights,
    shard_model,
    weight_files,
)
from s1fast.model.patch import causal_lm
from s1fast.files import write_atomic
from s1fast.train.data import IGNORE_INDEX, Dataset

CHECKPOINT_PREFIX = "checkpoint-"
LOCK_FILE = ".lock"
# The settings that decide a run's numbers: a resumed run must keep them (see read_checkpoint). Not among them:
# where and how often to save or log, max_steps, gradient checkpointing (it recomputes the same values).
NUMERIC_SETTINGS = ("model_name", "epochs", "global_batch", "micro_batch_tokens", "pack", "param_dtype", "lr", "betas",
                    "weight_decay", "warmup_ratio", "max_grad_norm", "seed")  # fmt: skip


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
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (activations: one layer's)
    cpu_offload: bool = False  # sharded parameters, gradients and AdamW state in host memory (FSDP2 CPUOffloadPolicy)
    grad_sync: str = "auto"  # reduce gradients after "every" micro-batch or only the "last" of a global batch
    param_dtype: str = "bfloat16"  # compute dtype; master weights, optimizer state and reductions stay fp32
    seed: int = 0
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    max_steps: int | None = None  # stop after this many steps (the schedule still spans the whole run)
    progress: bool = True
    model_name: str = ""  # what is trained (name or path, patch and attention): recorded, and compared on resume

    def check(self) -> None:
        """Every setting in its range; each test is written so that NaN fails it."""
        for name in ("epochs", "global_batch", "micro_batch_tokens", "log_every", "keep_checkpoints"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm", "save_every"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_steps is not None and not self.max_steps >= 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.param_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"param_dtype must be bfloat16, float16 or float32, got {self.param_dtype!r}")
        if self.grad_sync not in ("auto", "every", "last"):
            raise ValueError(f"grad_sync must be auto, every or last, got {self.grad_sync!r}")


# --- distributed set-up --------------------------------------------------------------------------------------


def init_distributed(device: str | None = None, *, timeout_minutes: float = 30) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device). Under torchrun: its process group (NCCL for CUDA tensors, gloo for CPU
    ones) and ``cuda:LOCAL_RANK``, with collectives that give up after ``timeout_minutes`` (NCCL's watchdog then
    stops the run with an error rather than hanging); alone: a one-rank group, so the same FSDP2 code path runs."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # On GPUs, gloo too for CPU tensors: with --cpu-offload the gradient shards, hence the grad norm's reduction,
        # live on the host (pytorch/pytorch#148532)
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
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
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{what} {path!r} is not writable: {e.strerror or e}") from e


def _checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the complete checkpoints in ``output_dir``, ascending (a save cut short is a ``.tmp-`` directory)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(name[len(CHECKPOINT_PREFIX):]) for name in os.listdir(output_dir)
                  if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit())


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in ``output_dir`` (temporaries are never complete)."""
    steps = _checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{steps[-1]:06d}") if steps else None


_CLAIMED: set[str] = set()  # output directories this process holds (claim_output_dir is reentrant)


@contextlib.contextmanager
def claim_output_dir(output_dir: str, *, resume: bool, enabled: bool = True, what: str = "output_dir") -> Iterator[None]:
    """Hold ``output_dir`` (which must exist) for one run.

    An exclusive ``fcntl.flock`` on ``OUTPUT_DIR/.lock`` (holding the holder's pid), so that no second run writes
    there at the same time; released when the block ends, and by the kernel when the process dies (SIGKILL too). Unless
    ``resume``, a directory that already holds a run's state (log, checkpoints, a save cut short, a final model)
    is refused, so that two runs never mix. Reentrant in one process (the command claims the directory before
    the model loads, ``Trainer.fit`` claims it too). ``enabled=False`` (ranks other than 0) does nothing.
    """
    key = os.path.realpath(output_dir)
    if not enabled or key in _CLAIMED:
        yield
        return
    fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BlockingIOError(f"{what} {output_dir!r} is in use by another run (pid {holder}); wait for it to "
                                  f"end or choose another {what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        found = [] if resume else sorted(
            name for name in os.listdir(output_dir) if name in ("log.jsonl", "config.json")
            or name.endswith(".safetensors") or name.startswith((CHECKPOINT_PREFIX, f".tmp-{CHECKPOINT_PREFIX}"))
        )  # fmt: skip
        if found:
            hint = ("continue it with --resume" if _checkpoint_steps(output_dir)
                    else "it has no complete checkpoint to resume from: delete it")
            raise FileExistsError(f"{what} {output_dir!r} already holds a run ({', '.join(found[:4])}"
                                  f"{', ...' if len(found) > 4 else ''}); {hint}, or choose another {what}")
        _CLAIMED.add(key)
        try:
            yield
        finally:
            _CLAIMED.discard(key)
    finally:
        os.close(fd)


def schedule_steps(num_examples: int, config: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) of ``num_examples`` examples under ``config``."""
    per_epoch = math.ceil(num_examples / config.global_batch)
    return per_epoch, per_epoch * config.epochs


def run_settings(config: TrainConfig, dataset: Dataset) -> dict:
    """What decides the numbers of a run (:data:`NUMERIC_SETTINGS` and a hash of the tokenised data), as stored in
    ``trainer_state.json``."""
    settings = {name: getattr(config, name) for name in NUMERIC_SETTINGS}
    settings["data"] = dataset.fingerprint()
    return json.loads(json.dumps(settings))  # JSON's shapes (tuples become lists), to compare with a saved copy


def read_checkpoint(path: str, settings: dict, total_steps: int, *, allow_changed_settings: bool = False) -> dict:
    """Check the checkpoint at ``path`` before anything is loaded from it, and return its trainer state.

    The one place that compares settings: those of this run (:func:`run_settings`) against the checkpoint's;
    any difference is refused, listed, unless ``allow_changed_settings`` (the new ones then apply from the
    checkpoint's step on). Also refused, each naming the file: an unreadable ``trainer_state.json``, a step past
    this run's ``total_steps``, missing or truncated model files (safetensors and their index), a missing or
    unreadable ``.metadata``, a missing or truncated ``.distcp`` file.
    """
    import torch.distributed.checkpoint as dcp

    state_path = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"resume: {path!r} is not a checkpoint (no trainer_state.json)")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        step, saved = state["step"], state.get("settings", state["config"])  # older checkpoints: the config only
        if not (isinstance(step, int) and step >= 1 and isinstance(saved, dict)):
            raise ValueError(f"step {step!r} or settings {saved!r:.60}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{state_path}: not a valid trainer state ({type(e).__name__}: {e})") from e
    changed = [f"{k} {json.dumps(saved[k])} -> {json.dumps(v)}" for k, v in settings.items() if k in saved and saved[k] != v]
    if changed and not allow_changed_settings:
        raise ValueError(f"resume: settings differ from {state_path}: {'; '.join(changed)}. Resume with the "
                         "checkpoint's settings, or pass --allow-changed-settings to go on with these")
    if step > total_steps:
        raise ValueError(f"{state_path}: step {step} is past the end of this run ({total_steps} steps)")
    try:
        model_files = sorted(set(weight_files(path).values()))
    except ValueError as e:
        raise ValueError(f"{e}: the checkpoint is damaged; resume from an earlier one (--resume PATH)") from e
    for file in model_files:
        if not os.path.isfile(file) or not safetensors_whole(file):
            what = "missing" if not os.path.isfile(file) else f"truncated or not a safetensors file ({os.path.getsize(file):,} bytes)"
            raise ValueError(f"{file} is {what}: the checkpoint is damaged; resume from an earlier one (--resume PATH)")
    metadata = os.path.join(path, ".metadata")
    try:
        sizes: dict[str, int] = {}
        for info in dcp.FileSystemReader(path).read_metadata().storage_data.values():
            sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    except FileNotFoundError as e:
        raise ValueError(f"{metadata} is missing: the checkpoint is incomplete") from e
    except Exception as e:  # unpickling garbage fails in many ways
        raise ValueError(f"{metadata} is unreadable ({type(e).__name__}: {e})") from e
    for name, size in sorted(sizes.items()):
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            raise ValueError(f"{file} is {'missing' if have is None else f'truncated ({have:,} of {size:,} bytes)'}: "
                             "the checkpoint is damaged; resume from an earlier one (--resume PATH)")
    return state


class Trainer:
    """Trains ``model`` (a Qwen causal LM, patched or not, in fp32) on ``dataset``.

    ``init_distributed`` must have run. The model is sharded here (FSDP2, one unit per decoder layer) and
    trained in place; ``fit()`` returns the loss of every step it ran, ``save_model()`` writes the result as a
    transformers checkpoint. ``model`` is on ``device`` (every rank holds the same weights), or on the meta
    device (:func:`s1fast.model.fsdp.empty_model`), for models of any size: it is then sharded first and each
    rank reads only its shards from the safetensors checkpoint directory ``weights``.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, config: TrainConfig, *, device: torch.device,
                 tokenizer=None, pad_id: int = 0, weights: str | None = None):
        config.check()
        if not len(dataset):
            raise ValueError("dataset is empty: no examples to train on")
        self.config, self.dataset, self.device, self.tokenizer, self.pad_id = config, dataset, device, tokenizer, pad_id
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_writable(config.output_dir)
        self.lengths = [len(ex["input_ids"]) for ex in dataset.examples]
        self.steps_per_epoch, self.total_steps = schedule_steps(len(dataset), config)
        self.settings = run_settings(config, dataset)
        self.step = 0

        meta = any(p.is_meta for p in model.parameters())
        if meta and weights is None:
            raise ValueError("the model is on the meta device: pass weights=PATH, the checkpoint directory to fill it from")
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
            reshard_after_forward=self.world > 1 or config.cpu_offload, cpu_offload=config.cpu_offload,
        )
        if meta:
            materialize(self.model, device, cpu_offload=config.cpu_offload)
        if weights is not None:
            load_weights(self.model, weights)
        self.model.train()
        self.sync_last = self._sync_last()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]  # no decay on biases and norm weights
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay}])
        self._set_schedule()

    def _sync_last(self) -> bool:
        """Whether gradients are reduced only after the last micro-batch of a global batch (``grad_sync``). Saves
        one reduce-scatter per other micro-batch, but each rank then accumulates unsharded fp32 gradients (4 bytes
        per parameter of the whole model) until then. auto: with several ranks, when that fits (on CPU: always)."""
        if self.config.grad_sync != "auto":
            return self.config.grad_sync == "last"
        if self.world == 1:
            return False  # nothing to save: no communication
        if self.device.type != "cuda":
            return True
        from s1fast.train.plan import fits_unsynced_gradients

        return fits_unsynced_gradients(self.model, self.config, self.world, self.device)

    def _set_schedule(self) -> None:
        """The config's hyperparameters in the optimizer, and the learning-rate schedule at ``self.step``: at the
        start, and after a checkpoint restored the optimizer (with the checkpoint's values)."""
        from transformers import get_cosine_schedule_with_warmup

        cfg = self.config
        for group, decay in zip(self.optimizer.param_groups, (cfg.weight_decay, 0.0)):
            group.update(lr=cfg.lr, initial_lr=cfg.lr, betas=cfg.betas, weight_decay=decay)
        # last_epoch=step-1: the scheduler's first step() (in its constructor) brings it to step, lr = lr * f(step)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, math.ceil(cfg.warmup_ratio * self.total_steps), self.total_steps, last_epoch=self.step - 1
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
        for m, row in enumerate(plan):
            if self.sync_last:
                self.model.set_requires_gradient_sync(m == len(plan) - 1)
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
        global-batch loss of each step run. The output directory is claimed (:func:`claim_output_dir`) for the
        run: a fresh start there is refused when it holds another run. A non-finite loss or gradient norm stops
        training with a ``FloatingPointError`` naming the step, before anything of that step is saved."""
        with claim_output_dir(self.config.output_dir, resume=self.step > 0, enabled=self.rank == 0):
            return self._fit(on_step)

    def _fit(self, on_step: Callable[[int, dict], None] | None) -> list[float]:
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
                save = bool(cfg.save_every and self.step % cfg.save_every == 0) or self.step == end
                if save or self.step % cfg.log_every == 0:  # a checkpoint is written only after its losses are checked
                    # The one host sync per log interval: all ranks sum their loss shares.
                    stacked = torch.stack([p[1] for p in pending])
                    dist.all_reduce(stacked)
                    norms = torch.stack([_local(p[2]) for p in pending]).tolist()
                    elapsed = time.perf_counter() - window_t0
                    tps = window_tokens / max(elapsed, 1e-9)
                    for (step, _, _, tok), value, norm in zip(pending, stacked.tolist(), norms):
                        if not (math.isfinite(value) and math.isfinite(norm)):
                            last = latest_checkpoint(cfg.output_dir)
                            last = f"the last checkpoint is {os.path.basename(last)}" if last else "no checkpoint"
                            raise FloatingPointError(
                                f"training diverged at step {step}: loss {value}, gradient norm {norm}; stopped, nothing "
                                f"of step {step} or later was saved ({last}); lower the learning rate or check the data"
                            )
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
                if save:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        return losses

    # -- checkpoints --

    def save_checkpoint(self) -> str:
        """Write the model (a transformers checkpoint in fp32, the master weights: ``from_pretrained`` reads it, and
        resuming from it is exact) with the tokenizer, the optimizer state (``torch.distributed.checkpoint``: each
        rank writes its own shards), the step (which fixes the data position and the schedule), the settings and
        the RNG states of every rank into a temporary directory, then rename it to ``checkpoint-STEP`` (a crash
        leaves either no checkpoint or a whole one; a failed write removes the temporary directory). No rank holds
        more than its shards and about 1/world of the model."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        out = self.config.output_dir
        final = os.path.join(out, f"{CHECKPOINT_PREFIX}{self.step:06d}")
        tmp = os.path.join(out, f".tmp-{CHECKPOINT_PREFIX}{self.step:06d}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        with _writing(final, tmp, cleanup=self.rank == 0):
            save_weights(self.model, tmp, dtype=torch.float32, tokenizer=self.tokenizer)
            dcp.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}, checkpoint_id=tmp)
            _write_synced(os.path.join(tmp, f"rng-rank{self.rank}.pt"), lambda f: torch.save(_rng_state(), f))
            if self.rank == 0:
                state = {"step": self.step, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                         "num_examples": len(self.dataset), "world_size": self.world, "settings": self.settings,
                         "config": asdict(self.config)}
                _write_synced(os.path.join(tmp, "trainer_state.json"), lambda f: f.write(json.dumps(state, indent=1).encode()))
            dist.barrier()
        if self.rank == 0:  # every file is on disk (dcp.save fsyncs its own) before the rename makes it a checkpoint
            _fsync(tmp)
            if os.path.isdir(final):  # resumed from an earlier checkpoint of this directory: this run's replaces it
                _remove_checkpoint(final)
            os.replace(tmp, final)
            _fsync(out)
            for old in _checkpoint_steps(out)[:-self.config.keep_checkpoints]:
                _remove_checkpoint(os.path.join(out, f"{CHECKPOINT_PREFIX}{old:06d}"))
        dist.barrier()
        return final

    def load_checkpoint(self, path: str, *, allow_changed_settings: bool = False, model: bool = True) -> None:
        """Restore everything ``save_checkpoint`` wrote; the run then continues exactly as if never stopped (with
        any number of ranks: each reads its own shards). Checked first by :func:`read_checkpoint` (changed settings
        are refused unless ``allow_changed_settings``: the config's hyperparameters and schedule then apply from the
        checkpoint's step). ``model=False``: the weights are already the checkpoint's (``Trainer(weights=path)``)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = read_checkpoint(path, self.settings, self.total_steps, allow_changed_settings=allow_changed_settings)
        if model:
            load_weights(self.model, path)
        sd = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        try:
            dcp.load(sd, checkpoint_id=path)
        except BaseException as e:  # dcp's CheckpointException is a BaseException
            inner = _inner_error(e)
            if isinstance(inner, KeyboardInterrupt):
                raise inner from None
            raise ValueError(f"{path}: cannot load the optimizer state ({type(inner).__name__}: "
                             f"{_first_line(inner)})") from e
        set_optimizer_state_dict(self.model, self.optimizer, sd["optimizer"])
        rng = os.path.join(path, f"rng-rank{self.rank}.pt")
        if os.path.isfile(rng) or self.rank < state.get("world_size", 1):
            try:
                _set_rng_state(torch.load(rng, weights_only=False))
            except Exception as e:  # unpickling garbage fails in many ways
                raise ValueError(f"{rng} is unreadable ({type(e).__name__}: {_first_line(e)})") from e
        self.step = state["step"]
        self._set_schedule()
        if self.rank == 0:
            _truncate_log(self.config.output_dir, self.step)

    def save_model(self, path: str | None = None, dtype: torch.dtype | None = None) -> str:
        """Write the model (in ``dtype``, default the compute dtype) as a transformers checkpoint with the
        tokenizer into ``path`` (default the output directory), loadable by ``transformers.AutoModelForCausalLM``
        and ``s1fast.model.load``; each rank writes its part (:func:`s1fast.model.fsdp.save_weights`), into a
        temporary directory whose files are then moved into place, weights first (a model file there is always
        whole); model files of an earlier save that this one does not have are removed last."""
        path = path or self.config.output_dir
        dtype = dtype or getattr(torch, self.config.param_dtype)
        tmp = os.path.join(path, ".tmp-model")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        with _writing(os.path.join(path, "model.safetensors"), tmp, cleanup=self.rank == 0):
            save_weights(self.model, tmp, dtype=dtype, tokenizer=self.tokenizer)
            if self.rank == 0:
                new = sorted(os.listdir(tmp), key=lambda name: not name.endswith(".safetensors"))
                for name in new:
                    os.replace(os.path.join(tmp, name), os.path.join(path, name))
                for name in os.listdir(path):
                    if is_model_file(name) and name not in new:
                        os.remove(os.path.join(path, name))
                os.rmdir(tmp)
                _fsync(path)
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


@contextlib.contextmanager
def _writing(target: str, tmp: str, *, cleanup: bool) -> Iterator[None]:
    """Run a block that writes the temporary directory ``tmp`` (which becomes ``target`` or holds it). If it fails:
    remove ``tmp`` (when ``cleanup``) and raise one line, which says when the disk is full: an ``ENOSPC`` /
    ``EDQUOT`` error, or too little space left (torch.save reports a full disk as "unexpected pos", without the
    errno). Interrupts pass through; exceptions other than OSError and RuntimeError too (a bug keeps its traceback)."""
    try:
        yield
    except BaseException as e:
        inner = _inner_error(e)
        error = inner if isinstance(inner, KeyboardInterrupt) or not isinstance(inner, (OSError, RuntimeError)) else None
        if error is None:
            where, partial = os.path.dirname(os.path.abspath(target)), os.path.basename(tmp)
            try:
                full = getattr(inner, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(where).free < 2**24
            except OSError:
                full = False
            then = "run again with --resume" if _checkpoint_steps(where) else f"delete {where!r} and start again"
            error = OSError(
                f"no space left on the device of {where!r} while writing {os.path.basename(target)}; the partial "
                f"{partial} was removed: free some space, then {then}" if full else
                f"writing {target} failed ({type(inner).__name__}: {_first_line(inner)}); the partial {partial} was removed"
            )  # fmt: skip
        if cleanup:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is e:
            raise
        raise error from e


def _inner_error(e: BaseException) -> BaseException:
    """The exception inside dcp's ``CheckpointException`` (the first failed rank's), else ``e``."""
    failures = getattr(e, "failures", None)
    return next(iter(failures.values()))[0] if isinstance(failures, dict) and failures else e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _remove_checkpoint(path: str) -> None:
    """Rename, then delete: a removal cut short leaves a ``.old-`` directory, never a half checkpoint."""
    trash = os.path.join(os.path.dirname(path), ".old-" + os.path.basename(path))
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)


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
            self.file.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: fit stops before a NaN
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
