"""Helpers shared by the kernel tests: tolerance checks, fresh random generators, NaN-poisoned allocations and
the check that a ``kernel_specs`` entry describes its kernel's real arguments."""

from __future__ import annotations

import contextlib
import inspect
import subprocess
import warnings
from collections.abc import Iterator

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """``actual`` within ``rel`` of ``expected`` (compared in float64): relative per element, with an absolute
    floor of ``rel`` times the largest ``|expected|`` (elements near zero carry the rounding of the large ones)."""
    expected = expected.detach().double()
    atol = rel * float(expected.abs().max()) + 1e-30 if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rel, atol=atol)


def generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with a fresh random seed (each run tests new inputs)."""
    return torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)


@contextlib.contextmanager
def nan_empty(monkeypatch) -> Iterator[None]:
    """Inside the block ``torch.empty`` returns NaN-filled tensors (signed integers: -1): a kernel that leaves an
    element of a buffer it allocated unwritten shows up as NaN (or an impossible index)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1) if t.dtype.is_signed else t

    monkeypatch.setattr(torch, "empty", poisoned)
    try:
        yield
    finally:
        monkeypatch.setattr(torch, "empty", empty)


def assert_spec_matches_kernel(spec) -> tuple[list[str], list[str]]:
    """``spec.signature`` names the kernel's runtime arguments in order and ``spec.constexprs`` its constexpr
    arguments; returns (runtime, constexpr) names. ``spec.fn`` is the @triton.jit object (an
    InterpretedFunction under TRITON_INTERPRET=1); its ``.fn`` is the Python function."""
    params = inspect.signature(spec.fn.fn).parameters.values()
    runtime = [p.name for p in params if "constexpr" not in str(p.annotation)]
    constexpr = [p.name for p in params if "constexpr" in str(p.annotation)]
    assert list(spec.signature) == runtime, (spec.name, list(spec.signature), runtime)
    assert sorted(spec.constexprs) == sorted(constexpr), (spec.name, sorted(spec.constexprs), sorted(constexpr))
    return runtime, constexpr


# A torchrun worker of gloo on this CPU machine very rarely aborts in native code ("terminate called without an
# active exception", SIGABRT; seen twice in about 20 CI runs, in different tests, not reproduced in reruns, with no
# Python frame in the faulthandler dump). A run that fails exactly so is started once more, with a warning; any other
# failure, or the same one twice, fails the test.
_GLOO_ABORT = "terminate called without an active exception"


def run_torchrun(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)`` of a torchrun command (see above)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0 and _GLOO_ABORT in proc.stderr + proc.stdout and "SIGABRT" in proc.stderr:
        warnings.warn(f"torchrun: a worker aborted ({_GLOO_ABORT!r}); running it once more", stacklevel=2)
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return proc
