"""``s1fast bench inspect``: compile every Triton kernel for Hopper and Ampere without a GPU and read the machine
code: registers, spills, shared memory and the widest global load and store.

Each kernel module in ``s1fast.kernels`` that defines ``kernel_specs(shape) -> list[KernelSpec]`` describes
its launches at a model shape (``QWEN25_SHAPES[m]`` plus ``tokens`` and ``dtype``) with the same config
function its launcher uses. Every spec is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``; the
resource usage comes from ``cuobjdump --dump-resource-usage`` on the cubin and the load/store widths from
its SASS (``cuobjdump -sass``), both tools shipped in the Triton wheel. Works on Triton 3.6 and 3.9.

Specialisation: at launch Triton's JIT marks every pointer whose address is a multiple of 16 and every
integer argument that is a multiple of 16 with ``tt.divisibility=16``, which is what lets it vectorise.
Specs carry types, not values, so inspection applies the same marks to every pointer (PyTorch's allocator
aligns tensors to at least 256 bytes) and every integer argument: true for the Qwen2.5 shapes inspected,
whose dimensions and token counts are all multiples of 16. ``spill_bytes`` is the local memory per thread
(what Triton itself reports as ``n_spills``; register spills are its only source in these kernels).

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` yields interpreter objects that cannot be compiled, so the
inspection then runs in a child process without that variable.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from s1fast.model.shapes import QWEN25_SHAPES

ARCHS = {"sm_90": 90, "sm_80": 80}
INSPECT_TOKENS = 4096
_INT_TYPES = {"i1", "i8", "i16", "i32", "i64", "u1", "u8", "u16", "u32", "u64"}
_RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_GLOBAL_MEM = re.compile(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)")
_WIDTH_WORDS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16}


def _tool(name: str) -> str:
    """Path of an NVIDIA tool from the Triton wheel (``knobs`` exists on Triton >= 3.4)."""
    from triton import knobs

    path = getattr(knobs.nvidia, name).path
    if not path or not os.path.exists(path):
        raise RuntimeError(f"inspect: {name} not found (the Triton wheel ships it under backends/nvidia/bin)")
    return path


def access_bits(modifiers: str) -> int:
    """Width in bits of one SASS global access from its modifiers (``.E.128`` -> 128, ``.E.U16`` -> 16,
    none -> 32). Cache hints such as ``LTC128B`` are not widths."""
    for word in modifiers.strip(".").split("."):
        if word.isdigit():
            return int(word)
        if word in _WIDTH_WORDS:
            return _WIDTH_WORDS[word]
    return 32


def sass_widths(sass: str) -> tuple[int, int]:
    """(widest global load, widest global store) in bits in a SASS listing; 0 when there is none.
    ``LDGSTS`` (global -> shared asynchronous copy) counts as a global load."""
    loads, stores = [0], [0]
    for op, mods in _GLOBAL_MEM.findall(sass):
        (stores if op == "STG" else loads).append(access_bits(mods))
    return max(loads), max(stores)


def _full_signature(spec) -> tuple[dict[str, str], dict]:
    """Signature over all of the kernel's arguments in order (constexprs typed ``constexpr``) and the
    divisibility attributes Triton's JIT would attach at launch (see the module docstring)."""
    missing = [a for a in spec.fn.arg_names if a not in spec.signature and a not in spec.constexprs]
    if missing:
        raise ValueError(f"inspect: spec {spec.name!r} gives no type or value for arguments {missing}")
    signature, attrs = {}, {}
    for i, arg in enumerate(spec.fn.arg_names):
        ty = "constexpr" if arg in spec.constexprs else spec.signature[arg]
        signature[arg] = ty
        if ty.startswith("*") or ty in _INT_TYPES:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_spec(spec, arch: str) -> dict:
    """Compile one ``KernelSpec`` for ``arch`` ("sm_90" / "sm_80") and read its resources and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, attrs = _full_signature(spec)
    src = triton.compiler.ASTSource(spec.fn, signature, dict(spec.constexprs), attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Triton 3.9's TRITON_DEFAULT_FP_FUSION notice
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    found = _RESOURCE.search(usage)
    if found is None:
        raise RuntimeError(f"inspect: no resource usage for {spec.name} in cuobjdump output:\n{usage}")
    _, regs, _stack, static_shared, local = found.groups()
    load_bits, store_bits = sass_widths(sass)
    meta = compiled.metadata
    dynamic_shared = meta["shared"] if isinstance(meta, dict) else meta.shared
    return {
        "kernel": spec.name,
        "function": getattr(spec.fn, "fn", spec.fn).__name__,
        "constexprs": {k: repr(v) for k, v in spec.constexprs.items()},
        "arch": arch,
        "config": spec.config or f"warps={spec.num_warps} stages={spec.num_stages}",
        "registers": int(regs),
        "spill_bytes": int(local),
        "shared_bytes": int(static_shared) + int(dynamic_shared),
        "widest_global_load_bits": load_bits,
        "widest_global_store_bits": store_bits,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
    }


def kernel_modules(names: list[str] | None = None) -> list:
    """Modules to inspect: the given dotted names or ``.py`` paths, else every ``s1fast.kernels`` module
    that defines ``kernel_specs``."""
    if names:
        modules = []
        for name in names:
            if name.endswith(".py"):
                spec = importlib.util.spec_from_file_location(Path(name).stem, name)
                if spec is None:
                    raise ValueError(f"inspect: --module {name!r} is not a loadable Python file")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(name)
            if not hasattr(module, "kernel_specs"):
                raise ValueError(f"inspect: module {name!r} defines no kernel_specs(shape)")
            modules.append(module)
        return modules
    import s1fast.kernels as pkg

    found = (importlib.import_module(f"s1fast.kernels.{m.name}") for m in pkgutil.iter_modules(pkg.__path__))
    return [m for m in found if hasattr(m, "kernel_specs")]


def _build_key(spec, arch: str) -> tuple:
    return (arch, id(spec.fn), tuple(sorted(spec.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())), spec.num_warps, spec.num_stages)


def inspect_kernels(
    models: list[str], archs: list[str], *, modules: list[str] | None = None, progress: bool = False
) -> list[dict]:
    """One record per distinct build (identical builds across models are compiled once and list every
    model they serve under ``models``)."""
    for m in models:
        if m not in QWEN25_SHAPES:
            raise ValueError(f"inspect: model must be one of {list(QWEN25_SHAPES)}, got {m!r}")
    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"inspect: arch must be one of {list(ARCHS)}, got {a!r}")
    from s1fast.kernels._common import interpreting

    if interpreting():
        return _inspect_in_child(models, archs, modules)
    builds: dict[tuple, tuple] = {}
    for module in kernel_modules(modules):
        for model in models:
            shape = dict(QWEN25_SHAPES[model], tokens=INSPECT_TOKENS, dtype=torch.bfloat16)
            for spec in module.kernel_specs(shape):
                for arch in archs:
                    key = _build_key(spec, arch)
                    served = builds.setdefault(key, (spec, arch, []))[2]
                    if model not in served:
                        served.append(model)
    items = list(builds.values())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="inspect", unit="build", leave=False)
    return [dict(compile_spec(spec, arch), models=served) for spec, arch, served in items]


def _inspect_in_child(models: list[str], archs: list[str], modules: list[str] | None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "s1fast.bench.inspect", "--json", "--no-model", "--models", ",".join(models),
           "--arch", ",".join(archs)]
    for m in modules or ():
        cmd += ["--module", m]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"inspect: child process failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)["builds"]


def performance_model(models: list[str], builds: list[dict] | None = None, tokens=None, *, decode: bool = True) -> dict:
    """``bench.perf_model`` for ``models`` (those of ``perf_model.MODELS`` among them): ``{"model": rows,
    "decode": launches per decode step}``. ``builds``: sm_90 records to reuse (compiled here if missing)."""
    from s1fast.bench import perf_model

    models = [m for m in models if m in perf_model.MODELS]
    if not models:
        return {"model": [], "decode": None}
    if builds is None or not all(any(b["arch"] == "sm_90" and m in b["models"] for b in builds) for m in models):
        builds = inspect_kernels(models, ["sm_90"])
    counts = perf_model.run_counts(models, tokens or perf_model.MODEL_TOKENS, decode=decode)
    sm90 = [b for b in builds if b["arch"] == "sm_90"]
    return {"model": perf_model.model_rows(sm90, counts["counts"]), "decode": counts["decode"]}


def available() -> str | None:
    """None when kernels can be inspected here, else the reason they cannot."""
    try:
        import triton.backends.nvidia  # noqa: F401

        _tool("cuobjdump")
    except (ImportError, RuntimeError, AttributeError) as e:
        return f"Triton's NVIDIA backend or its tools are missing ({e})"
    return None


def run(*, device: str, quick: bool, peers: list[str], headline: bool = False) -> list[dict]:
    """Bench-suite entry point: quick inspects the 1.5B shapes for sm_90 without the performance model (CPU
    CI's mode: tests/test_inspect.py runs the model and asserts its bounds); otherwise every shape and arch, and
    the model. (No device is used; ``device``, ``peers`` and ``headline`` do not apply: the GPU kit leaves this
    CPU work to CI.)"""
    reason = available()
    if reason:
        return [{"suite": "inspect", "skipped": reason}]
    models, archs = (["1.5B"], ["sm_90"]) if quick else (list(QWEN25_SHAPES), list(ARCHS))
    builds = inspect_kernels(models, archs, progress=True)
    rows = [dict(suite="inspect", **r) for r in builds]
    if quick:
        return rows + [{"suite": "inspect", "kernel": "performance model", "skipped": "--quick (run without it)"}]
    try:
        model = performance_model(models, builds)
    except RuntimeError as e:  # e.g. a Triton interpreter that this numpy breaks (triton 3.6 with numpy >= 2.3)
        return rows + [{"suite": "inspect", "kernel": "performance model", "skipped": str(e)[-300:]}]
    for r in model["model"]:
        rows.append({"suite": "inspect", "kernel": f"model: {r['family']}", "model": r["model"], "tokens": r["tokens"],
                     **{k: r[k] for k in ("bytes_ratio", "bytes_bound", "predicted_pct_of_copy_bw", "predicted_us")},
                     "launches": len(r["launches"])})
    if model["decode"]:
        rows.append({"suite": "inspect", "kernel": "decode step launches", **model["decode"]})
    return rows


COLUMNS = ("kernel", "arch", "registers", "spill_bytes", "shared_bytes", "widest_global_load_bits",
           "widest_global_store_bits", "config", "models")


def format_table(records: list[dict]) -> str:
    """A fixed-width table, one line per build."""
    rows = [[",".join(r[c]) if c == "models" else str(r[c]) for c in COLUMNS] for r in records]
    header = ["kernel", "arch", "regs", "spill B", "smem B", "ld bits", "st bits", "config", "models"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="s1fast bench inspect",
        description="Compile every Triton kernel for sm_90 / sm_80 (no GPU needed) and report registers, "
        "spills, shared memory and the widest global load/store in the SASS.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--models", type=_csv, default=list(QWEN25_SHAPES),
                        help=f"comma-separated Qwen2.5 shapes (default: {','.join(QWEN25_SHAPES)})")
    parser.add_argument("--arch", type=_csv, default=list(ARCHS), help="comma-separated: sm_90,sm_80")
    parser.add_argument("--module", action="append",
                        help="inspect this module (dotted name or .py path) instead of s1fast.kernels; repeatable")
    parser.add_argument("--no-model", action="store_true",
                        help="skip the static performance model (bytes counted under Triton's interpreter, "
                        "occupancy, predicted %% of copy bandwidth, launches per decode step; ~3 min on 2 cores)")
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        print(f"s1fast bench inspect: {reason}", file=sys.stderr)
        return 1
    try:
        records = inspect_kernels(args.models, args.arch, modules=args.module, progress=not args.json)
    except ValueError as e:
        parser.error(str(e))
    result = {"builds": records}
    if not args.no_model and not args.module:
        result.update(performance_model(args.models, records))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(format_table(records))
    if result.get("model"):
        from s1fast.bench import perf_model

        print(f"\nStatic performance model on a {perf_model.GPU['name']} (formula: s1fast/bench/perf_model.py), "
              "forward + backward in bf16:\n")
        print(perf_model.format_model(result["model"]))
        over = [r for r in result["model"] if r["bytes_ratio"] > r["bytes_bound"]]
        for r in over:
            where = f"{r['family']} {r['model']} {r['tokens']}"
            print(f"ABOVE BOUND: {where}: bytes/min {r['bytes_ratio']} > {r['bytes_bound']}")
    if result.get("decode"):
        d = result["decode"]
        print(
            f"\nDecode step (s1fast Decoder, tiny Qwen2 on CPU): {d['triton_launches_per_layer']} Triton launches and "
            f"{d['torch_ops_per_layer']} PyTorch operators per layer, {d['triton_launches_constant']:+d} and "
            f"{d['torch_ops_constant']:+d} per step (one CUDA graph replays them all on a GPU)."
        )
    return 1 if result.get("model") and over else 0


if __name__ == "__main__":
    raise SystemExit(main())
