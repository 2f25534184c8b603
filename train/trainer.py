"""The s1 SFT loop: padding-free packed micro-batches, exact token-mean loss over each global batch, FSDP2 on
one process or many (torchrun), atomic checkpoints with exact resume.

This module orchestrates; the parts are named after what they do: the settings (``config``), the rows of a global
batch (``packing``), checkpoints and the output directory (``checkpoint``), what a run reports (``metrics``).
One code path for every world size: the process group is torchrun's, or a one-rank group when run alone, and
the model is always sharded with :func:`s1fast.model.fsdp.shard_model` (fp32 master weights, compute in
``param_dtype``, fp32 gradient reduction). Everything that decides the numbers is deterministic given the seed:
the shuffle of epoch ``e`` is a permutation seeded by ``(seed, e)``, and a global batch is split into
micro-batches by a fixed rule, so resuming from step ``k`` replays steps ``k+1, ...`` exactly.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from s1fast.commands import DTYPES, DeferredInterrupt
from s1fast.kernels.fused_linear_cross_entropy import token_statistics
from s1fast.model.fsdp import agree_failed, load_weights, materialize, shard_model
from s1fast.model.patch import causal_lm
from s1fast.train.checkpoint import Checkpointer, check_writable, claim_output_dir, read_checkpoint
from s1fast.train.config import TrainConfig, run_settings, schedule_steps
from s1fast.train.data import Dataset
from s1fast.train.metrics import MetricsLogger, truncate_log
from s1fast.train.packing import (
    FLEX_ATTENTION,
    FLEX_BLOCK,
    collate,
    document_mask,
    epoch_order,
    num_items,
    plan_micro_batches,
)


def init_distributed(device: str | torch.device | None = None, *,
                     timeout_minutes: float = 30) -> tuple[int, int, torch.device]:
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


class Trainer:
    """Trains ``model`` (a Qwen causal LM, patched or not, in fp32) on ``dataset``.

    ``init_distributed`` must have run. The model is sharded here (FSDP2, one unit per decoder layer) and
    trained in place; ``fit()`` returns the loss of every step it ran, ``save_model()`` writes the result as a
    transformers checkpoint. ``model`` is on ``device`` (every rank holds the same weights), or on the meta
    device (:func:`s1fast.model.fsdp.empty_model`), for models of any size: it is then sharded first and each
    rank reads only its shards from the safetensors checkpoint directory ``weights``. A model whose attention is
    :data:`s1fast.train.packing.FLEX_ATTENTION` (``packing.use_flex_attention``) gets each packed row's document
    mask, its rows padded to a multiple of FlexAttention's block.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, config: TrainConfig, *, device: torch.device,
                 tokenizer=None, pad_id: int = 0, weights: str | None = None):
        config.check()
        if not len(dataset):
            raise ValueError("dataset is empty: no examples to train on")
        self.config, self.dataset, self.device, self.pad_id = config, dataset, device, pad_id
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_writable(config.out)
        self.checkpointer = Checkpointer(config.out, keep=config.keep_checkpoints, tokenizer=tokenizer)
        self.steps_per_epoch, self.total_steps = schedule_steps(len(dataset), config)
        self.settings = run_settings(config, dataset)
        self.step = 0
        self.model = self._build(model, weights)
        self.flex = causal_lm(self.model).config._attn_implementation == FLEX_ATTENTION
        self.sync_last = self._sync_last()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]  # no decay on biases and norm weights
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay}])
        self._set_schedule()

    # -- set-up --

    def _build(self, model: nn.Module, weights: str | None) -> nn.Module:
        """``model`` for training: no KV cache, activation checkpointing when asked, sharded (FSDP2) and filled."""
        cfg = self.config
        meta = any(p.is_meta for p in model.parameters())
        if meta and weights is None:
            raise ValueError("the model is on the meta device: pass weights=PATH, the checkpoint directory to fill "
                             "it from")
        lm = causal_lm(model)
        lm.config.use_cache = False
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        param_dtype = DTYPES[cfg.param_dtype]
        model = shard_model(
            model, param_dtype=None if param_dtype == torch.float32 else param_dtype, reduce_dtype=torch.float32,
            reshard_after_forward=self.world > 1 or cfg.cpu_offload, cpu_offload=cfg.cpu_offload,
        )
        if meta:
            materialize(model, self.device, cpu_offload=cfg.cpu_offload)
        if weights is not None:
            load_weights(model, weights)
        return model.train()

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

    def micro_batch(self, examples: Sequence[dict]) -> dict:
        """The model's inputs for one row of ``examples``, on the device (FlexAttention: with its document mask)."""
        batch = collate(examples, self.pad_id, multiple_of=FLEX_BLOCK if self.flex else 1)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.flex:
            batch["attention_mask"] = document_mask(batch["position_ids"])
        return batch

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
            out = self.model(**self.micro_batch([examples[i] for i in row]), num_items_in_batch=n_items,
                             use_cache=False)
            # FSDP averages gradients over ranks; each rank's loss is already a share of the global sum.
            (out.loss * self.world).backward()
            total += out.loss.detach().float()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    # -- the loop --

    def fit(self, on_step: Callable[[int, dict], None] | None = None) -> list[float]:
        """Train from ``self.step`` to the end (or ``max_steps``), logging and checkpointing; returns the
        global-batch loss of each step run. The output directory is claimed (``checkpoint.claim_output_dir``) for
        the run: a fresh start there is refused when it holds another run. A checkpoint is saved at the end of every
        epoch, every ``save_every`` steps and at the end; Ctrl-C or SIGTERM lets training run to the next step that
        logs (``log_every``) or saves, saves a checkpoint and raises KeyboardInterrupt (a second signal stops at
        once). A non-finite loss or gradient norm stops training with a ``FloatingPointError`` naming the step, before
        anything of that step is saved."""
        cfg = self.config
        end = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        losses: list[float] = []
        signals = DeferredInterrupt()
        with claim_output_dir(cfg.out, resume=self.step > 0, enabled=self.rank == 0), signals.deferred():
            logger = MetricsLogger(cfg.out, enabled=self.rank == 0, progress=cfg.progress, initial=self.step,
                                   end=end, steps_per_epoch=self.steps_per_epoch)
            try:
                while self.step < end:
                    examples = [self.dataset.examples[i] for i in self.batch_positions(self.step)]
                    with token_statistics() as stats:  # accuracy and entropy from the fused loss, on the device
                        loss, grad_norm = self.train_step(examples)
                    self.step += 1
                    logger.add(self.step, loss, grad_norm, sum(len(ex["input_ids"]) for ex in examples), stats)
                    save = self.step % self.steps_per_epoch == 0 or self.step == end or bool(
                        cfg.save_every and self.step % cfg.save_every == 0)
                    flush = save or self.step % cfg.log_every == 0  # the steps that sync with the host anyway
                    # Every rank stops at the same step: agreed (one all-reduce) only where the host syncs anyway, so
                    # a signal takes effect at the next log or save step (each step with the default --log-every 1).
                    stop = flush and agree_failed(signals.signum is not None)
                    save = save or stop
                    if flush:  # a checkpoint is saved only once its losses are checked
                        for record in logger.flush(self.scheduler.get_last_lr()[0], self.checkpointer.latest):
                            losses.append(record["loss"])
                            if on_step is not None:
                                on_step(record["step"], record)
                    if save:
                        self.save_checkpoint()
                    if stop:
                        raise signals.interrupt() if signals.signum else KeyboardInterrupt("another rank")
            finally:
                logger.close()
        return losses

    # -- checkpoints --

    def save_checkpoint(self) -> str:
        """Checkpoint this step (``checkpoint.Checkpointer.save``): weights, optimizer, RNG states and the trainer
        state (the step, which fixes the data position and the schedule, and the settings)."""
        state = {"step": self.step, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                 "num_examples": len(self.dataset), "world_size": self.world, "settings": self.settings,
                 "config": dataclasses.asdict(self.config)}
        return self.checkpointer.save(self.step, self.model, self.optimizer, state)

    def load_checkpoint(self, path: str, *, allow_changed_settings: bool = False, model: bool = True) -> None:
        """Restore everything ``save_checkpoint`` wrote; the run then continues exactly as if never stopped (with
        any number of ranks). Checked first by ``checkpoint.read_checkpoint`` (changed settings are refused unless
        ``allow_changed_settings``: the config's hyperparameters and schedule then apply from the checkpoint's
        step). ``model=False``: the weights are already the checkpoint's (``Trainer(weights=path)``)."""
        state = read_checkpoint(path, self.settings, self.total_steps, allow_changed_settings=allow_changed_settings)
        self.checkpointer.load(path, self.model, self.optimizer, state, weights=model)
        self.step = state["step"]
        self._set_schedule()
        if self.rank == 0:
            truncate_log(self.config.out, self.step)

    def save_model(self, path: str | None = None, dtype: torch.dtype | None = None) -> str:
        """The model (in ``dtype``, default the compute dtype) as a transformers checkpoint with the tokenizer in
        ``path`` (default the output directory): ``checkpoint.Checkpointer.save_model``."""
        dtype = dtype or DTYPES[self.config.param_dtype]
        return self.checkpointer.save_model(self.model, path or self.config.out, dtype)
