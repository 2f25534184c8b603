"""Shared check for the kernels' ``kernel_specs``: a spec must describe its kernel's real arguments."""

import inspect


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
