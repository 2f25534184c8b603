"""A run's output directory and its checkpoints: the directory's lock, the one ``checkpoint-NNNNNN`` name, and the
:class:`Checkpointer` (save / load / latest, and the final model's save), every write atomic.

A checkpoint holds the model (a transformers checkpoint in fp32, the master weights: ``from_pretrained`` reads it, and
resuming from it is exact) with the tokenizer, the optimizer state (``torch.distributed.checkpoint``: each rank
writes its own shards), the trainer state (step, schedule, settings) and the RNG states of every rank. It is written
into a temporary directory that is then renamed, so a crash leaves either no checkpoint or a whole one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from s1fast.files import fsync_path, is_model_file, safetensors_whole, weight_files
from s1fast.model.fsdp import load_weights, save_weights

PREFIX = "checkpoint-"
LOCK_FILE = ".lock"


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of ``step``."""
    return f"{PREFIX}{step:06d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a complete checkpoint's directory name, else None (a save cut short is a ``.tmp-`` directory)."""
    digits = name[len(PREFIX):]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def checkpoint_steps(out: str) -> list[int]:
    """Steps of the complete checkpoints in ``out``, ascending."""
    if not os.path.isdir(out):
        return []
    return sorted(step for step in map(checkpoint_step, os.listdir(out)) if step is not None)


def latest_checkpoint(out: str) -> str | None:
    """The complete checkpoint with the highest step in ``out`` (temporaries are never complete)."""
    steps = checkpoint_steps(out)
    return os.path.join(out, checkpoint_name(steps[-1])) if steps else None


def check_writable(path: str, what: str = "out") -> None:
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


_CLAIMED: set[str] = set()  # output directories this process holds (claim_output_dir is reentrant)


@contextlib.contextmanager
def claim_output_dir(out: str, *, resume: bool, enabled: bool = True, what: str = "out") -> Iterator[None]:
    """Hold ``out`` (which must exist) for one run.

    An exclusive ``fcntl.flock`` on ``OUT/.lock`` (holding the holder's pid), so that no second run writes there at
    the same time; released when the block ends, and by the kernel when the process dies (SIGKILL too). Unless
    ``resume``, a directory that already holds a run's state (log, checkpoints, a save cut short, a final model)
    is refused, so that two runs never mix. Reentrant in one process (the command claims the directory before
    the model loads, ``Trainer.fit`` claims it too). ``enabled=False`` (ranks other than 0) does nothing.
    """
    key = os.path.realpath(out)
    if not enabled or key in _CLAIMED:
        yield
        return
    fd = os.open(os.path.join(out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BlockingIOError(f"{what} {out!r} is in use by another run (pid {holder}); wait for it to "
                                  f"end or choose another {what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        found = [] if resume else sorted(
            name for name in os.listdir(out) if name in ("log.jsonl", "config.json")
            or name.endswith(".safetensors") or name.startswith((PREFIX, f".tmp-{PREFIX}"))
        )
        if found:
            hint = ("continue it with --resume" if checkpoint_steps(out)
                    else "it has no complete checkpoint to resume from: delete it")
            raise FileExistsError(f"{what} {out!r} already holds a run ({', '.join(found[:4])}"
                                  f"{', ...' if len(found) > 4 else ''}); {hint}, or choose another {what}")
        _CLAIMED.add(key)
        try:
            yield
        finally:
            _CLAIMED.discard(key)
    finally:
        os.close(fd)


def resume_path(out: str, resume: str) -> str:
    """``--resume``'s checkpoint: ``resume`` itself, or for "latest" the latest complete one in ``out`` (a
    FileNotFoundError that names a save cut short when there is none)."""
    if resume != "latest":
        return resume
    path = latest_checkpoint(out)
    if path is None:
        partial = sorted(n for n in os.listdir(out) if n.startswith(f".tmp-{PREFIX}"))
        raise FileNotFoundError(f"--resume: no complete checkpoint in {out!r}"
                                + (f" ({partial[-1]} is a save cut short)" if partial else "")
                                + "; nothing to resume: delete it or choose another --out")
    return path


_TORCH_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def read_checkpoint(path: str, settings: dict, total_steps: int, *, allow_changed_settings: bool = False) -> dict:
    """Check the checkpoint at ``path`` before anything is loaded from it, and return its trainer state.

    The one place that compares settings: those of this run (``config.run_settings``) against the checkpoint's;
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
        step, saved = state["step"], state["settings"]
        if not (isinstance(step, int) and step >= 1 and isinstance(saved, dict)):
            raise ValueError(f"step {step!r} or settings {saved!r:.60}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{state_path}: not a valid trainer state ({type(e).__name__}: {e})") from e
    if saved.get("param_dtype") in _TORCH_DTYPE_NAMES:  # written before --dtype had one spelling (torch's names)
        saved["param_dtype"] = _TORCH_DTYPE_NAMES[saved["param_dtype"]]
    changed = [f"{k} {json.dumps(saved[k])} -> {json.dumps(v)}" for k, v in settings.items()
               if k in saved and saved[k] != v]
    if changed and not allow_changed_settings:
        raise ValueError(f"resume: settings differ from {state_path}: {'; '.join(changed)}. Resume with the "
                         "checkpoint's settings, or pass --allow-changed-settings to go on with these")
    if step > total_steps:
        raise ValueError(f"{state_path}: step {step} is past the end of this run ({total_steps} steps)")
    damaged = "the checkpoint is damaged; resume from an earlier one (--resume PATH)"
    try:
        model_files = sorted(set(weight_files(path).values()))
    except ValueError as e:
        raise ValueError(f"{e}: {damaged}") from e
    for file in model_files:
        if not os.path.isfile(file):
            raise ValueError(f"{file} is missing: {damaged}")
        if not safetensors_whole(file):
            raise ValueError(f"{file} is truncated or not a safetensors file ({os.path.getsize(file):,} bytes): "
                             f"{damaged}")
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
                             f"{damaged}")
    return state


class Checkpointer:
    """The checkpoints of the run writing into ``out``, for this rank (every rank calls each method: they are
    collective). ``keep``: complete checkpoints kept, older ones removed after each save."""

    def __init__(self, out: str, *, keep: int, tokenizer=None):
        self.out, self.keep, self.tokenizer = out, keep, tokenizer
        self.rank = dist.get_rank()

    def latest(self) -> str | None:
        return latest_checkpoint(self.out)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> str:
        """Write checkpoint ``step`` (see the module docstring; ``state``: rank 0's ``trainer_state.json``). No rank
        holds more than its shards and about 1/world of the model; a failed write removes the temporary directory."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        final = os.path.join(self.out, checkpoint_name(step))
        tmp = os.path.join(self.out, f".tmp-{checkpoint_name(step)}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        with _writing(final, tmp, cleanup=self.rank == 0):
            save_weights(model, tmp, dtype=torch.float32, tokenizer=self.tokenizer)
            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp)
            _write_synced(os.path.join(tmp, f"rng-rank{self.rank}.pt"), lambda f: torch.save(_rng_state(), f))
            if self.rank == 0:
                _write_synced(os.path.join(tmp, "trainer_state.json"),
                              lambda f: f.write(json.dumps(state, indent=1).encode()))
            dist.barrier()
        if self.rank == 0:  # every file is on disk (dcp.save fsyncs its own) before the rename makes it a checkpoint
            fsync_path(tmp)
            if os.path.isdir(final):  # resumed from an earlier checkpoint of this directory: this run's replaces it
                _remove_checkpoint(final)
            os.replace(tmp, final)
            fsync_path(self.out)
            for old in checkpoint_steps(self.out)[:-self.keep]:
                _remove_checkpoint(os.path.join(self.out, checkpoint_name(old)))
        dist.barrier()
        return final

    def load(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, *,
             weights: bool = True) -> None:
        """Restore the weights (unless ``weights=False``: they are already the checkpoint's), the optimizer state and
        this rank's RNG states from the checkpoint ``path``, whose trainer ``state`` :func:`read_checkpoint` checked
        (with any number of ranks: each reads its own shards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if weights:
            load_weights(model, path)
        sd = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        try:
            dcp.load(sd, checkpoint_id=path)
        except BaseException as e:  # dcp's CheckpointException is a BaseException
            inner = _inner_error(e)
            if isinstance(inner, KeyboardInterrupt):
                raise inner from None
            raise ValueError(f"{path}: cannot load the optimizer state ({type(inner).__name__}: "
                             f"{_first_line(inner)})") from e
        set_optimizer_state_dict(model, optimizer, sd["optimizer"])
        rng = os.path.join(path, f"rng-rank{self.rank}.pt")
        if os.path.isfile(rng) or self.rank < state.get("world_size", 1):
            try:
                _set_rng_state(torch.load(rng, weights_only=False))
            except Exception as e:  # unpickling garbage fails in many ways
                raise ValueError(f"{rng} is unreadable ({type(e).__name__}: {_first_line(e)})") from e

    def save_model(self, model: nn.Module, path: str, dtype: torch.dtype) -> str:
        """Write ``model`` (in ``dtype``) as a transformers checkpoint with the tokenizer into ``path``, loadable by
        ``transformers.AutoModelForCausalLM`` and ``s1fast.model.load``; each rank writes its part
        (:func:`s1fast.model.fsdp.save_weights`), into a temporary directory whose files are then moved into place,
        weights first (a model file there is always whole); model files of an earlier save that this one does not
        have are removed last."""
        tmp = os.path.join(path, ".tmp-model")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        with _writing(os.path.join(path, "model.safetensors"), tmp, cleanup=self.rank == 0):
            save_weights(model, tmp, dtype=dtype, tokenizer=self.tokenizer)
            if self.rank == 0:
                new = sorted(os.listdir(tmp), key=lambda name: not name.endswith(".safetensors"))
                for name in new:
                    os.replace(os.path.join(tmp, name), os.path.join(path, name))
                for name in os.listdir(path):
                    if is_model_file(name) and name not in new:
                        os.remove(os.path.join(path, name))
                os.rmdir(tmp)
                fsync_path(path)
        dist.barrier()
        return path


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
    errno). Interrupts pass through; exceptions other than OSError and RuntimeError too (a bug keeps its
    traceback)."""
    try:
        yield
    except BaseException as e:
        inner = _inner_error(e)
        passes = isinstance(inner, KeyboardInterrupt) or not isinstance(inner, (OSError, RuntimeError))
        error = inner if passes else None
        if error is None:
            where, partial = os.path.dirname(os.path.abspath(target)), os.path.basename(tmp)
            try:
                full = (getattr(inner, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                        or shutil.disk_usage(where).free < 2**24)
            except OSError:
                full = False
            then = "run again with --resume" if checkpoint_steps(where) else f"delete {where!r} and start again"
            if full:
                error = OSError(f"no space left on the device of {where!r} while writing {os.path.basename(target)}; "
                                f"the partial {partial} was removed: free some space, then {then}")
            else:
                error = OSError(f"writing {target} failed ({type(inner).__name__}: {_first_line(inner)}); the partial "
                                f"{partial} was removed")
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
