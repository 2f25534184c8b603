"""``s1fast env``: the report a bug needs, and the patch check that can say "fails"."""

from __future__ import annotations

import importlib
import os

import torch
import transformers

from s1fast import env
from s1fast.cli import main

patch_module = importlib.import_module("s1fast.model.patch")


def test_env_reports_versions_paths_and_a_working_patch(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    printed = dict(line.split(None, 1) for line in out.splitlines() if line.strip() and " " in line.strip())
    # the installed version (package metadata) against the imported module's, without local suffixes: a PyPI CUDA
    # wheel's metadata says 2.11.0 where torch.__version__ says 2.11.0+cu130
    for name, module in (("torch", torch), ("transformers", transformers)):
        assert env.release(printed[name].strip()) == env.release(module.__version__), (name, printed[name])
    assert "flash-attn" in out and "GPUs" in out
    assert "kernels (RMSNorm" in out and "decoder attention of one-token steps: " in out
    assert f"patch(): works with transformers {transformers.__version__}" in out
    assert "kernels " in out and "`import kernels` from " in out and "WARNING" not in out


def test_env_says_where_import_kernels_resolves_from_the_repository_root(monkeypatch):
    """From the repository root, `import kernels` is Hugging Face's package when installed (s1fast's folder hands
    the name over), else s1fast's empty folder module, which is reported as shadowing."""
    monkeypatch.chdir(os.path.dirname(os.path.abspath(env.__file__)))
    where, shadowed = env.kernels_import()
    assert shadowed is (env.versions()["kernels"] is None), where


def test_patch_check_catches_a_wrong_kernel(monkeypatch):
    """A patch that computes something else (RMSNorm without its weight) is reported, naming the model."""
    monkeypatch.setattr(
        patch_module, "rms_norm", lambda x, weight, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    )
    problem = env.check_patch(torch.device("cpu"))
    assert problem is not None and problem.startswith("qwen2 (tied=True): "), problem
    assert "patched loss differs from transformers" in problem, problem


def test_patch_check_reports_an_exception(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("this transformers moved something")

    monkeypatch.setattr(patch_module, "patch", broken)
    assert main(["env"]) == 1
    assert "patch(): FAILS with transformers" in capsys.readouterr().out
    assert env.check_patch(torch.device("cpu")) == "qwen2: RuntimeError: this transformers moved something"
