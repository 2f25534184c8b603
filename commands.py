"""What every command (train, generate, eval, serve, bench) shares: device and dtype parsing, the model directory
check and load, and SIGTERM handled as Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def check_device(value: str, name: str = "--device") -> torch.device:
    """``value`` as a ``cpu`` / ``cuda[:N]`` device present on this machine, or a ValueError naming ``name``."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} must be cuda[:N] or cpu, got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {value}: no CUDA device is available here (use cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_model_dir(path: str, name: str = "model") -> None:
    """A local transformers model directory: exists and holds a config.json (its weights are checked by loading)."""
    if not os.path.isdir(path):
        raise ValueError(f"{name}: {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{name}: {path!r} holds no config.json, so it is not a transformers model directory")


def load_model(path: str, *, dtype: torch.dtype, device: str | torch.device):
    """``s1fast.model.load`` in eval mode; a directory that does not load (garbage or truncated config or
    weights, another architecture) gives a one-line ValueError naming it instead of a traceback."""
    from safetensors import SafetensorError

    from s1fast.model.patch import load

    try:
        return load(path, dtype=dtype, device=device).eval()
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"model {path!r} does not load: {type(e).__name__}: {reason}") from e


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that ``finally`` blocks and
    :func:`atomic_output` clean up when a run is killed; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
