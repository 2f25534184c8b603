"""Shared plumbing for the kernels: backend dispatch and input validation.

Dispatch rule (one place, used by every kernel):
- CUDA tensors run the Triton kernels;
- CPU tensors run the plain-PyTorch path, except when ``TRITON_INTERPRET=1`` was set before Triton was
  imported: then the Triton kernels run on CPU tensors through Triton's interpreter (how CI tests them).
``force_backend("torch" | "triton")`` overrides the rule inside a ``with`` block (tests use it to run both
paths in one process).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_state = threading.local()
_BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): Triton kernels accept CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run the kernels' ``name`` path ("auto", "torch" or "triton") inside the block."""
    if name not in _BACKENDS:
        raise ValueError(f"force_backend: name must be one of {_BACKENDS}, got {name!r}")
    previous = getattr(_state, "backend", "auto")
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernel handles tensor ``x`` (see the module docstring for the rule)."""
    backend = getattr(_state, "backend", "auto")
    if backend == "torch":
        return False
    if x.is_cuda or interpreting():
        return True
    if backend == "triton":
        raise RuntimeError(
            "force_backend('triton') on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return False


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@contextlib.contextmanager
def modelled_gpu(sms: int) -> Iterator[None]:
    """Inside the block, launchers size their grids for a GPU with ``sms`` SMs even on CPU / meta tensors
    (``s1fast bench inspect`` replays launches as an H100 would run them; tests use it too)."""
    previous = getattr(_state, "sms", None)
    _state.sms = int(sms)
    try:
        yield
    finally:
        _state.sms = previous


def sm_count(device: torch.device) -> int | None:
    """SMs of ``device`` if it is a GPU (or inside ``modelled_gpu``), else None."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return getattr(_state, "sms", None)


def persistent_programs(n_tiles: int, device: torch.device, per_sm: int, cpu_programs: int) -> int:
    """Grid of a grid-stride (persistent) kernel: ``per_sm`` programs per SM, at most one per tile; on CPU
    (the interpreter) ``cpu_programs``, few, so that each program's loop runs several tiles in the tests."""
    sms = sm_count(device)
    return max(1, min(n_tiles, per_sm * sms if sms is not None else cpu_programs))


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s CUDA device current for a kernel launch (Triton launches on the current device, not on
    the tensors' one: a model spread over GPUs would otherwise run kernels on the wrong GPU). Backward passes
    need nothing: autograd runs them with the gradients' device current."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_tensor(
    fn: str,
    name: str,
    t: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
) -> torch.Tensor:
    """Raise a clear error unless ``t`` is a tensor with an allowed rank and dtype; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            dims = " or ".join(map(str, allowed))
            raise ValueError(f"{fn}: {name} must have {dims} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        allowed_dtypes = tuple(dtypes)
        if t.dtype not in allowed_dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
            raise TypeError(f"{fn}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same_device(fn: str, **tensors: torch.Tensor | None) -> None:
    """Raise a clear error unless every given tensor is on the same device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{fn}: all tensors must be on one device, got {listing}")


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Activation dtypes the kernels accept (float64 runs the PyTorch path only, for references)."""

TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
"""torch dtype -> Triton type name, for ``KernelSpec.signature`` pointers (``"*" + name``)."""


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` viewed as ``[rows, width]`` with unit column stride (any row stride); copies only if it must."""
    return unit_last(t.reshape(-1, width))


def unit_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is unit-stride (any other strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_type(arg: object) -> str:
    """The ``KernelSpec.signature`` type of one launch argument: pointer by dtype, float, or 32/64-bit int."""
    if isinstance(arg, torch.Tensor):
        return "*" + {**TRITON_DTYPES, torch.int32: "i32", torch.int64: "i64"}[arg.dtype]
    if isinstance(arg, float):
        return "fp32"
    return "i32" if -(2**31) <= arg < 2**31 else "i64"


def spec_dtype(shape: dict) -> torch.dtype:
    """The activation dtype of a ``kernel_specs`` shape dict: a torch dtype or its name ("bf16", "bfloat16")."""
    dtype = shape.get("dtype", torch.bfloat16)
    if isinstance(dtype, str):
        names = {v: k for k, v in TRITON_DTYPES.items()}
        dtype = names.get(dtype) or getattr(torch, dtype)
    return dtype


@dataclass(frozen=True)
class KernelSpec:
    """One compilation of a Triton kernel exactly as its launcher would run it at some shape.

    Kernel modules return these from ``kernel_specs(shape)`` so ``s1fast bench inspect`` can compile every
    kernel ahead of time for a GPU target (no GPU needed) and read registers, spills and SASS. The launcher
    and ``kernel_specs`` must take their block sizes / warps from the same config function, so what is
    inspected is what runs.
    """

    name: str  # e.g. "rms_norm_fwd"
    fn: object  # the @triton.jit function
    signature: dict[str, str]  # every runtime argument, in order -> Triton type: "*bf16", "*fp32", "i32", "i64", "fp32"
    constexprs: dict[str, object]  # every tl.constexpr argument -> its value
    num_warps: int
    num_stages: int = 1
    config: str = ""  # human-readable, e.g. "BLOCK=1024 warps=4"


def launch_spec(name: str, fn, args: list, constexprs: dict, num_warps: int, num_stages: int = 1,
                config: str = "") -> KernelSpec:
    """The ``KernelSpec`` of a launch from the launcher's own runtime arguments ``args`` (meta tensors and
    numbers, in the kernel's order, from the same ``_*_args`` function the launcher calls): the signature is
    derived from them, never typed by hand."""
    names = [a for a in fn.arg_names if a not in constexprs]
    signature = {n: triton_type(a) for n, a in zip(names, args, strict=True)}
    return KernelSpec(name, fn, signature, dict(constexprs), num_warps, num_stages, config)


# ------------------------------------------------------------------------------ scaling by grad_output
# Elements per program and loop step: 16 per thread at 8 warps (128-bit accesses in bf16/fp32).
_SCALE_BLOCK = 4096
# Programs per SM of the grid-stride loop: 4 x 8 warps = 1,024 threads, half of what an sm_90 SM holds (not tuned).
_SCALE_PROGRAMS_PER_SM = 4


@triton.jit
def _scale_kernel(x_ptr, out_ptr, go_ptr, n, BLOCK: tl.constexpr, IN_PLACE: tl.constexpr):
    """out = x * go[0] (cast to out's dtype), grid-stride. In place, programs return at once when the scale
    is exactly 1 (``loss.backward()``): no byte of x is read or written, and no host sync decides it."""
    go = tl.load(go_ptr).to(tl.float32)
    if (go != 1.0) or (not IN_PLACE):
        offs = tl.arange(0, BLOCK)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            mask = start + offs < n
            x = tl.load(x_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + start + offs, (x * go).to(out_ptr.dtype.element_ty), mask=mask)


def _scale_args(x: torch.Tensor, out: torch.Tensor, go: torch.Tensor) -> list:
    """The scaling kernel's runtime arguments in order (shared by ``scaled`` and ``scale_kernel_specs``)."""
    return [x, out, go, x.numel()]


def scaled(x: torch.Tensor, grad_output: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x * grad_output`` (a 0-d device tensor) as ``dtype`` (default ``x``'s): in place when the dtype is
    ``x``'s, and then free when grad_output is 1 on the Triton path (see ``_scale_kernel``); else one pass that
    reads ``x`` once and writes the result (the scaling folded into the cast). Never syncs with the host."""
    dtype = dtype or x.dtype
    if not (x.is_contiguous() and x.dtype in FLOAT_DTYPES and dtype in FLOAT_DTYPES and use_triton(x)):
        return x.mul_(grad_output) if dtype == x.dtype else (x * grad_output).to(dtype)
    out = x if dtype == x.dtype else torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    if n:
        programs = persistent_programs(triton.cdiv(n, _SCALE_BLOCK), x.device, _SCALE_PROGRAMS_PER_SM, 4)
        with on_device(x):
            _scale_kernel[(programs,)](*_scale_args(x, out, grad_output.to(torch.float32).reshape(1)),
                                       BLOCK=_SCALE_BLOCK, IN_PLACE=out is x, num_warps=8)
    if out is x:
        torch.autograd.graph.increment_version(x)  # as mul_ would: autograd sees x was modified in place
    return out


def scale_kernel_specs(dtype: torch.dtype) -> list[KernelSpec]:
    """The scaling kernel as ``scaled`` launches it for an fp32 accumulator: in place, and cast to ``dtype``."""
    acc = torch.empty(_SCALE_BLOCK, dtype=torch.float32, device="meta")
    go = torch.empty(1, dtype=torch.float32, device="meta")
    config = f"BLOCK={_SCALE_BLOCK} warps=8"
    return [launch_spec(name, _scale_kernel, _scale_args(acc, out, go), {"BLOCK": _SCALE_BLOCK, "IN_PLACE": out is acc},
                        8, config=config)
            for name, out in (("scale_inplace", acc), (f"scale_cast_{TRITON_DTYPES[dtype]}", acc.to(dtype)))]
