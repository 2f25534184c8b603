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
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

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
            raise ValueError(f"{fn}: {name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
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
