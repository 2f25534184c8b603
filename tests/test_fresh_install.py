"""What a new user gets from the repository root: the root is on sys.path there (``python -m pytest``, ``python -m``,
a script or notebook started in it), and the project's top-level folders must not hide installed packages of the
same name. transformers >= 5.25 imports Hugging Face's ``kernels`` package when it builds a model, while the
repository has a ``kernels/`` folder (``s1fast.kernels``)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root (sys.path[0] is then the root, as for a script there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")  # keep how s1fast itself is found (an editable install)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def _top_level_names() -> set[str]:
    """Names the repository root offers to ``import`` when it is on sys.path."""
    names = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names | {p.stem for p in ROOT.glob("*.py")}


def test_top_level_names_resolve_to_installed_distributions_from_the_root():
    """Every top-level name that an installed distribution also provides (``kernels`` today) imports the
    distribution's module from the root, not the repository's folder."""
    provided = importlib.metadata.packages_distributions()
    shared = sorted(_top_level_names() & provided.keys())
    for name in shared:
        result = _run_in_root(f"import {name}; print({name}.__file__)")
        assert result.returncode == 0, f"import {name} from the repository root failed:\n{result.stderr[-2000:]}"
        path = Path(result.stdout.strip().splitlines()[-1]).resolve()
        assert ROOT not in path.parents, f"import {name} in the root gave the repository's {path}, not {provided[name]}"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="the `kernels` package is not installed")
def test_script_in_the_root_builds_patches_and_trains_a_qwen_with_the_kernels_package():
    """A user's script in the root: transformers builds a Qwen2 (importing Hub kernels), s1fast patches it, and the
    fused loss trains; `import kernels` is Hugging Face's package and `s1fast.kernels` is ours."""
    result = _run_in_root(
        "import torch, kernels, transformers\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "from s1fast.model import patch, patched\n"
        "import s1fast.kernels\n"
        "assert hasattr(kernels, 'CUDAProperties') and hasattr(s1fast.kernels, 'rms_norm')\n"
        "cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=1)\n"
        "model = patch(Qwen2ForCausalLM(cfg)).train()\n"
        "ids = torch.randint(0, 64, (2, 8))\n"
        "model(input_ids=ids, labels=ids).loss.backward()\n"
        "print(patched(model))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("{'rms_norm': 3, 'rope': 1, 'swiglu': 1, 'loss': 1}"), result.stdout
