"""What every command (train, generate, eval, serve, bench) shares: the checkers of numeric options
(:class:`Range`), the ``--device`` and ``--dtype`` arguments (their defaults and parsing), ``--kv-cache`` (checked
against free memory and the model's page size), the sampling-argument check, the model checks that need no
weights (a directory or a Hugging Face name probed with a short timeout, its config: architecture and positions
against the prompts), the model load, and SIGTERM handled as Ctrl-C.

The commands spell the same things the same way: ``--model PATH``, ``--out``, ``--no-progress``, ``--max-rows``
(rows decoded at once), ``--device`` and ``--dtype`` (:func:`add_device_arguments`); every argument problem,
found by argparse or after parsing (a ValueError of a ``check_*`` function), is ``parser.error``: the usage,
then ``s1fast <command>: error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Range:
    """Which values an argument or setting takes: a finite int or float ``>= low`` (``> low`` when ``strict``; any
    when ``low`` is None), ``< below`` when given; or, for ``kind=str``, any non-empty string (a path, a name). The
    one checker of every command's numeric options (an argparse ``type``) and of the same settings given through the
    Python API (:meth:`check`)."""

    kind: type
    low: float | None = 0
    strict: bool = False
    below: float | None = None

    def describe(self) -> str:
        if self.kind is str:
            return "a non-empty string"
        rule = "" if self.low is None else f" {'>' if self.strict else '>='} {self.low:g}"
        rule += f" and < {self.below:g}" if self.below is not None else ""
        return f"{'an integer' if self.kind is int else 'a finite number'}{rule}"

    def holds(self, value) -> bool:
        if self.kind is str:
            return isinstance(value, str) and bool(value.strip())
        kinds = (int, float) if self.kind is float else (int,)
        return (isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
                and (self.low is None or (value > self.low if self.strict else value >= self.low))
                and (self.below is None or value < self.below))

    def check(self, name: str, value) -> None:
        """A ValueError ``NAME must be ..., got VALUE`` unless ``value`` holds."""
        if not self.holds(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")

    def __call__(self, text: str):
        """An argparse type: the value of ``text``, or ArgumentTypeError (nothing silently means a default)."""
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if value is None or not self.holds(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return value


COUNT, AT_LEAST_0, TEXT = Range(int, 1), Range(int, 0), Range(str)
THREADS = Range(int, 1, below=(os.cpu_count() or 1) + 1)  # --threads: more than the machine's CPUs crashes torch
PORT = Range(int, 1, below=65536)
POSITIVE, NON_NEGATIVE, FRACTION = Range(float, 0, strict=True), Range(float, 0), Range(float, 0, below=1)


def budget_or_none(text: str) -> int | None:
    """An argparse type: a thinking budget, an integer >= 0 (:data:`AT_LEAST_0`), or ``none`` (no cap)."""
    return None if text.strip().lower() == "none" else AT_LEAST_0(text)


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
    text = value.strip()
    unit = next((u for u in _UNITS if text.endswith(u)), None)
    try:
        number = float(text[: -len(unit)] if unit else text)
    except ValueError:
        number = float("nan")
    if unit and 0 < number < math.inf and number * _UNITS[unit] >= 1:
        return {"kv_cache_bytes": int(number * _UNITS[unit])}
    if not unit and 0 < number <= 1:
        return {"kv_cache_fraction": number}
    raise argparse.ArgumentTypeError(
        f"expected a size with a unit ({', '.join(_UNITS)}, e.g. 8GiB) or a share of free GPU memory in (0, 1], "
        f"got {value!r}")


def free_memory(device: torch.device) -> int:
    """Bytes free for a new allocation on ``device``: the GPU's free memory (``torch.cuda.mem_get_info``), or the
    host's available memory (``MemAvailable`` in /proc/meminfo, else its free pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: int) -> str:
    """``n`` bytes in the largest binary unit of :data:`_UNITS` that fits (``10 TiB``, ``1 KiB``)."""
    unit = next((u for u in reversed(_UNITS) if n >= _UNITS[u]), "KiB")
    return f"{n / _UNITS[unit]:.3g} {unit}"


def check_kv_cache(budget: dict, device: torch.device) -> None:
    """A ``--kv-cache`` budget, checked before anything loads: a share of free GPU memory needs a CUDA device, and a
    size must fit in the memory free on ``device`` now (:func:`free_memory`)."""
    if "kv_cache_fraction" in budget and device.type != "cuda":
        raise ValueError(f"--kv-cache {budget['kv_cache_fraction']:g}: a share of free GPU memory needs a CUDA device; "
                         "give a size instead (e.g. 1GiB)")
    size, free = budget.get("kv_cache_bytes"), None
    if size is not None and size > (free := free_memory(device)):
        raise ValueError(f"--kv-cache {_size(size)} is more than the {_size(free)} free on {device} now; give a "
                         "smaller size")


def check_kv_pages(budget: dict, config, dtype: torch.dtype) -> None:
    """A ``--kv-cache`` size against the model's ``config`` (:func:`read_model_config`) in the compute ``dtype``,
    before the weights load: it must hold two KV pages of the decoder's smallest size (its trash page and one
    page for a row; the decoder checks its own page size again once the model is loaded)."""
    from s1fast.decode.decoder import PAGE_SIZE
    from s1fast.decode.kv_cache import KVCache

    size = budget.get("kv_cache_bytes")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    page = KVCache(layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads, head_dim=head_dim,
                   dtype=dtype, device="cpu", page_size=PAGE_SIZE).page_bytes  # sizes only: it allocates nothing
    if size is not None and size < 2 * page:
        raise ValueError(f"--kv-cache {_size(size)} holds fewer than 2 KV pages of this model ({_size(page)} each: "
                         f"{PAGE_SIZE} tokens in {str(dtype).removeprefix('torch.')}); raise it")


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


def read_model_config(path: str, name: str = "--model"):
    """The transformers config of the model ``path`` (a directory, or a Hugging Face name that
    :func:`check_hub_model` accepted), read without its weights: a Qwen2 / Qwen2.5 / Qwen3 causal LM, or a one-line
    ValueError naming ``name``."""
    from transformers import AutoConfig

    from s1fast.model.patch import CAUSAL_LMS

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{name} {path!r}: its config.json does not load ({type(e).__name__}: {reason})") from e
    supported = sorted(cls.config_class.model_type for cls in CAUSAL_LMS)
    if config.model_type not in supported:
        raise ValueError(f"{name} {path!r}: model_type {config.model_type!r}; s1fast runs Qwen2, Qwen2.5 and Qwen3 "
                         f"({', '.join(supported)})")
    return config


def check_max_seq_len(config, max_seq_len: int | None) -> None:
    """``--max-seq-len`` at most the model's positions (``max_position_embeddings`` of its ``config``)."""
    if max_seq_len is not None and max_seq_len > config.max_position_embeddings:
        raise ValueError(f"--max-seq-len {max_seq_len} is more than the model's {config.max_position_embeddings} "
                         "positions (max_position_embeddings in its config.json)")


def check_positions(config, prompts: list[list[int]], max_new_tokens: int, max_seq_len: int | None) -> None:
    """Tokenised prompts against the model's positions, before it loads: none empty, ``--max-seq-len`` (None: the
    model's ``max_position_embeddings``) at most the model's, and the longest prompt plus ``--max-new-tokens``
    within it (:func:`check_max_seq_len`); one-line ValueErrors naming the argument."""
    positions = config.max_position_embeddings
    empty = next((i for i, p in enumerate(prompts) if not p), None)
    if empty is not None:
        which = f"prompt {empty}" if len(prompts) > 1 else "the prompt"
        raise ValueError(f"{which} is empty (no tokens): give text to decode from")
    check_max_seq_len(config, max_seq_len)
    longest = max(map(len, prompts))
    if max_seq_len is not None and longest + max_new_tokens > max_seq_len:
        raise ValueError(f"--max-seq-len {max_seq_len}: the longest prompt ({longest} tokens) plus --max-new-tokens "
                         f"{max_new_tokens} exceeds it (raise --max-seq-len or lower --max-new-tokens)")
    if longest + max_new_tokens > positions:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: the longest prompt ({longest} tokens) plus "
                         f"{max_new_tokens} new tokens exceeds the model's {positions} positions "
                         "(max_position_embeddings); lower --max-new-tokens or shorten the prompt")


HUB_PROBE_S = 10.0  # how long check_hub_model waits for the Hugging Face Hub


def check_hub_model(name: str, flag: str = "--model") -> None:
    """``name`` as a local directory, or a Hugging Face name (owner/name) in the local cache or known to the Hub,
    which is asked once with a :data:`HUB_PROBE_S`-second timeout; anything else is a one-line ValueError naming
    ``flag``, at once (a download offline would retry for minutes before failing)."""
    if os.path.isdir(name):
        return
    if os.path.exists(name):
        raise ValueError(f"{flag} {name!r} is a file; expected a directory or a Hugging Face name (owner/name)")
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ValueError(f"{flag} {name!r}: no such directory, and not a Hugging Face name (owner/name)")
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except HFValidationError as e:
        raise ValueError(f"{flag} {name!r}: not a valid Hugging Face name ({str(e).splitlines()[0]})") from e
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{flag} {name!r}: no such directory, and not in the Hugging Face cache (HF_HUB_OFFLINE is "
                         "set); give a local directory")
    try:
        HfApi().model_info(name, timeout=HUB_PROBE_S)
    except RepositoryNotFoundError as e:
        raise ValueError(f"{flag} {name!r}: no such directory, and no such model on the Hugging Face Hub (or a "
                         "private one: log in with `hf auth login`)") from e
    except Exception as e:  # no network, a timeout, a proxy's error page: httpx's and the hub's many errors
        raise ValueError(f"{flag} {name!r}: no such directory, not in the Hugging Face cache, and the Hub did not "
                         f"answer within {HUB_PROBE_S:g} s ({type(e).__name__}); give a local directory, or set "
                         "HF_HUB_OFFLINE=1 to use the cache only") from e



def check_local_decoding(args, command: str):
    """The checks of a command that decodes a local model (``s1fast generate``, ``s1fast serve``), before anything
    loads: ``--device``, ``--kv-cache`` (free memory, then KV pages of the model), ``--dtype``, ``--model`` (a local
    directory of a supported model), ``--tokenizer``. Returns (device, dtype, the model's config); one-line
    ValueErrors."""
    device = check_device(args.device)
    check_kv_cache(args.kv_cache, device)
    dtype = check_dtype(args.dtype, device)
    check_model_dir(args.model, f"--model (s1fast {command} loads local models only)")
    if args.tokenizer is not None:  # a directory, or a Hugging Face name the cache or the Hub knows
        check_hub_model(args.tokenizer, "--tokenizer")
    config = read_model_config(args.model)  # what the config tells, before the weights load
    check_kv_pages(args.kv_cache, config, dtype)
    return device, dtype, config

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


class DeferredInterrupt:
    """Ctrl-C and SIGTERM held until a safe point: inside :meth:`deferred` the first one only sets
    :attr:`signum`, so that the loop can finish its step, save and stop (``raise self.interrupt()``); a second one
    interrupts at once, as usual."""

    def __init__(self):
        self.signum: int | None = None

    def interrupt(self) -> KeyboardInterrupt:
        """What :func:`sigterm_as_interrupt`'s handler raises for the held signal."""
        return KeyboardInterrupt(f"signal {self.signum}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[DeferredInterrupt]:
        if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
            yield self
            return

        def hold(signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt(f"signal {signum}")
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                  "(again: stop at once)", file=sys.stderr, flush=True)

        previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


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
