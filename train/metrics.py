"""What a run reports: each step's loss, gradient norm, learning rate, throughput, and the trained tokens' top-1
accuracy and softmax entropy (``mean_token_accuracy``, ``entropy``, as TRL names them), synchronised once per log
interval, checked to be finite, written to ``log.jsonl`` (and TensorBoard when installed) and shown on the progress
bar; rank 0 writes, every rank takes part in the sync."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from s1fast.files import write_atomic


class MetricsLogger:
    """Steps are :meth:`add`-ed as they run (their tensors stay on the device); :meth:`flush` syncs them in one
    all-reduce and logs them. ``out``: the output directory; ``enabled``: this rank writes; ``progress``: a bar
    from step ``initial`` to ``end``."""

    def __init__(self, out: str, *, enabled: bool, progress: bool, initial: int, end: int, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, int, torch.Tensor]] = []
        self.window_tokens, self.window_t0 = 0, time.perf_counter()
        self.file = self.tb = self.bar = None
        if not enabled:
            return
        self.file = open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=end, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(os.path.join(out, "tensorboard"))

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int,
            token_stats: list[torch.Tensor] = ()) -> None:
        """Step ``step`` ran: this rank's share of the loss, the gradient norm, the tokens of its global batch, and
        its micro-batches' ``[top-1 hits, entropy sum, trained tokens]`` (``token_statistics``; none: zeros)."""
        stats = torch.stack(list(token_stats)).sum(0) if token_stats else torch.zeros(3, device=loss.device)
        self.pending.append((step, loss, grad_norm, tokens, stats.to(loss.dtype)))
        self.window_tokens += tokens

    def flush(self, lr: float, latest_checkpoint: Callable[[], str | None]) -> list[dict]:
        """The one host sync per log interval: all ranks sum their loss shares. Returns the pending steps' records
        (also logged), or raises a FloatingPointError at the first non-finite loss or gradient norm, naming the step
        and ``latest_checkpoint()``, before anything of that step is logged."""
        stacked = torch.stack([torch.cat([p[1].reshape(1), p[4]]) for p in self.pending])  # [steps, loss + stats]
        dist.all_reduce(stacked)
        norms = torch.stack([_local(p[2]) for p in self.pending]).tolist()
        tps = self.window_tokens / max(time.perf_counter() - self.window_t0, 1e-9)
        records = []
        for (step, _, _, tokens, _), (loss, hits, entropy, count), norm in zip(self.pending, stacked.tolist(), norms):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                last = latest_checkpoint()
                last = f"the last checkpoint is {os.path.basename(last)}" if last else "no checkpoint"
                raise FloatingPointError(
                    f"training diverged at step {step}: loss {loss}, gradient norm {norm}; stopped, nothing of step "
                    f"{step} or later was saved ({last}); lower the learning rate or check the data"
                )
            record = {"step": step, "epoch": (step - 1) // self.steps_per_epoch + 1, "loss": loss, "grad_norm": norm,
                      "lr": lr, "tokens": tokens, "tokens_per_s": tps}
            if count:  # measured by the fused loss (not without patch(): no made-up zeros)
                record.update(mean_token_accuracy=hits / count, entropy=entropy / count)
            self._write(record)
            records.append(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            self.bar.update(len(records))
        self.pending, self.window_tokens, self.window_t0 = [], 0, time.perf_counter()
        return records

    def _write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: flush stops before a NaN
            self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        for handle in (self.bar, self.file, self.tb):
            if handle is not None:
                handle.close()


def truncate_log(out: str, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (those after it are about to be run again; a line cut short by
    a kill is dropped), so that a resumed run's log reads like an uninterrupted one."""
    path = os.path.join(out, "log.jsonl")
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


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2's grad norm is one), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
