"""What every command (train, generate, eval, serve, bench) shares: the ``--device`` and ``--dtype`` arguments
(their defaults and parsing), the sampling-argument check, the model directory check and load, and SIGTERM
handled as Ctrl-C.

The commands spell the same things the same way: ``--model PATH``, ``--out``, ``--no-progress``, ``--max-rows``
(rows decoded at once), ``--device`` and ``--dtype`` (:func:`add_device_arguments`); every argument problem,
found by argparse or after parsing (a ValueError of a ``check_*`` function), is ``parser.error``: the usage,
then ``s1fast <command>: error: ...``, exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}  # --dtype


def default_device() -> str:
    """``--device``'s default: ``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> str:
    """``--dtype``'s default, a key of :data:`DTYPES`: ``bf16`` on CUDA, ``fp32`` on CPU."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def add_device_arguments(parser, dtypes: tuple[str, ...] = tuple(DTYPES)) -> None:
    """``--device`` (default: :func:`default_device`) and, unless ``dtypes`` is empty, ``--dtype`` (one of
    ``dtypes``, keys of :data:`DTYPES`; default: :func:`default_dtype` of the device) on an argparse parser or
    argument group; read them back with :func:`check_device` and :func:`check_dtype`."""
    parser.add_argument("--device", default=default_device(), help="cuda, cuda:N or cpu (default: %(default)s)")
    if dtypes:
        parser.add_argument("--dtype", choices=dtypes, help="default: bf16 on CUDA, fp32 on CPU")


_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def kv_cache_budget(value: str) -> dict:
    """``--kv-cache``: the decoder's KV-cache memory budget as ``Decoder`` keyword arguments. ``8GiB`` / ``512MiB``
    (a size with a binary unit) -> ``kv_cache_bytes``; a number in (0, 1] -> ``kv_cache_fraction``, that share of
    the GPU memory free when the model is loaded (CUDA only; vLLM's ``gpu_memory_utilization``). An argparse type:
    anything else is refused at parsing."""
    import argparse

    text = value.strip()
    unit = next((u for u in _UNITS if text.endswith(u)), None)
    try:
        number = float(text[: -len(unit)] if unit else text)
    except ValueError:
        number = float("nan")
    if unit and number > 0 and number * _UNITS[unit] >= 1:
        return {"kv_cache_bytes": int(number * _UNITS[unit])}
    if not unit and 0 < number <= 1:
        return {"kv_cache_fraction": number}
    raise argparse.ArgumentTypeError(
        f"expected a size with a unit ({', '.join(_UNITS)}, e.g. 8GiB) or a share of free GPU memory in (0, 1], "
        f"got {value!r}")


def check_kv_cache(budget: dict, device: torch.device) -> None:
    """A ``--kv-cache`` share of free GPU memory needs a CUDA device: refused on the CPU before anything loads."""
    if "kv_cache_fraction" in budget and device.type != "cuda":
        raise ValueError(f"--kv-cache {budget['kv_cache_fraction']:g}: a share of free GPU memory needs a CUDA device; "
                         "give a size instead (e.g. 1GiB)")


def add_kv_cache_argument(parser) -> None:
    """``--kv-cache`` (read with :func:`kv_cache_budget`; default: no budget, every admitted row can grow to its
    longest length)."""
    parser.add_argument("--kv-cache", type=kv_cache_budget, default={}, metavar="SIZE|SHARE",
                        help="KV-cache memory budget: a size (8GiB, 512MiB) or a share of free GPU memory (0.9); "
                             "requests wait for pages, or are preempted and recomputed, when it is full "
                             "(default: no budget)")


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


def check_dtype(value: str | None, device: str | torch.device, name: str = "--dtype") -> torch.dtype:
    """The torch dtype of ``value``, a key of :data:`DTYPES` (None: :func:`default_dtype` of ``device``), or a
    ValueError naming ``name``."""
    value = default_dtype(device) if value is None else value
    if value not in DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[value]


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None) -> None:
    """The sampling arguments of a command, checked before any model loads by the object every request is built
    into (``s1fast.decode.params.SamplingParams``), or its one-line ValueError."""
    from s1fast.decode.params import SamplingParams

    SamplingParams.of("sampling", max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed)


def check_model_dir(path: str, name: str = "--model") -> None:
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
