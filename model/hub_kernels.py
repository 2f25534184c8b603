"""s1fast's kernels as Hub kernels: transformers' ``use_kernels=True`` / ``kernels.kernelize`` pick them, offline.

transformers marks the layers a kernel may replace (``RMSNorm`` and ``rotary_pos_emb`` on Qwen2 / Qwen3, ``SiLU`` on
the activation) and the ``kernels`` package swaps their ``forward`` for a layer from a repository. s1fast ships a
local repository (``KERNEL_REPO``, this package's ``hub_kernel`` folder: ``metadata.json`` and ``layers``) with
``RMSNorm`` (``s1fast.kernels.rms_norm``), ``RotaryPosEmb`` (``apply_rope``, q and k in one launch) and ``SwiGLU``
(the MLP as ``down_proj(swiglu(gate_proj(x), up_proj(x)))``; Qwen's MLP is no Hub layer, so :func:`kernel_config`
and :func:`kernelize` first register ``Qwen2MLP`` / ``Qwen3MLP`` under the name ``SwiGLU``). The forwards are
``s1fast.model.patch``'s own, so the numbers are patch()'s and ``unpatch`` removes them too. ``SiLU`` alone is not
mapped (s1fast fuses it into SwiGLU); the loss is not a Hub layer (``patch(model, ...)`` or TRL's head,
``s1fast.train.trl_head``, provide it)::

    model = AutoModelForCausalLM.from_pretrained(path, use_kernels=True, kernel_config=kernel_config())
    kernelize(model)                       # or on a model you built, in its current mode (training / inference)

Like ``patch()``, per instance (each attention holds its own rotary function module). Differences: transformers'
``KernelConfig`` maps GPU device types only (on CPU, load plainly and call :func:`kernelize`) and only the mode the
model is in at load time (``from_pretrained`` gives an eval-mode model: call :func:`kernelize` after ``train()``);
transformers re-kernelizes on ``model.train()`` / ``model.eval()``. ``SwiGLU`` is registered on transformers'
``Qwen2MLP`` / ``Qwen3MLP`` classes (:func:`register_swiglu`), the one class-level change.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

from torch import nn
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3

from s1fast.model.patch import _apply_rotary_pos_emb, _mlp_forward, _rms_norm_forward, causal_lm

KERNEL_REPO = Path(os.path.dirname(os.path.abspath(__file__))) / "hub_kernel"
"""The local kernel repository (``kernels.LocalLayerRepository`` / ``KernelConfig(use_local_kernel=True)``)."""

_MLPS = (qwen2.Qwen2MLP, qwen3.Qwen3MLP)


class RMSNorm(nn.Module):
    """``Qwen2RMSNorm`` / ``Qwen3RMSNorm`` through ``s1fast.kernels.rms_norm``."""

    forward = _rms_norm_forward


class RotaryPosEmb(nn.Module):
    """transformers' ``apply_rotary_pos_emb`` through ``s1fast.kernels.apply_rope``."""

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return _apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


class SwiGLU(nn.Module):
    """Qwen's gated MLP through ``s1fast.kernels.swiglu``."""

    forward = _mlp_forward


layers = types.SimpleNamespace(RMSNorm=RMSNorm, RotaryPosEmb=RotaryPosEmb, SwiGLU=SwiGLU)
"""What the ``kernels`` package reads from a kernel repository."""

MAPPED = {"RMSNorm": "RMSNorm", "rotary_pos_emb": "RotaryPosEmb", "SwiGLU": "SwiGLU"}
"""transformers' layer names -> this repository's layers."""


def register_swiglu() -> None:
    """Name Qwen2's and Qwen3's MLP classes ``SwiGLU`` for the kernels package (an attribute on those transformers
    classes; a model kernelized without a ``SwiGLU`` mapping keeps its MLP)."""
    from kernels import replace_kernel_forward_from_hub

    for cls in _MLPS:
        if getattr(cls, "kernel_layer_name", None) != "SwiGLU":
            replace_kernel_forward_from_hub(cls, "SwiGLU")


def kernel_config():
    """transformers' ``KernelConfig`` mapping the layers in ``MAPPED`` to this local repository, for
    ``from_pretrained(..., use_kernels=True, kernel_config=kernel_config())``."""
    from transformers import KernelConfig

    register_swiglu()
    return KernelConfig({name: f"{KERNEL_REPO}:{layer}" for name, layer in MAPPED.items()}, use_local_kernel=True)


def kernel_mapping(device: str) -> dict:
    """The ``kernels`` mapping (``kernels.use_kernel_mapping``) of the layers in ``MAPPED`` on ``device`` (a device
    type such as "cuda" or "cpu"), for training and inference."""
    from kernels import LocalLayerRepository, Mode

    modes = (Mode.TRAINING, Mode.INFERENCE)
    return {name: {device: {mode: LocalLayerRepository(KERNEL_REPO, layer_name=layer, check_arch=False)
                            for mode in modes}}
            for name, layer in MAPPED.items()}


def kernelize(model: nn.Module, *, training: bool | None = None) -> nn.Module:
    """Replace the RMSNorm, rotary and MLP forwards of ``model`` (a Qwen2 / Qwen3 causal LM, or a PEFT model around
    one) by s1fast's through the kernels package, for training or inference (default: the model's mode). Returns
    ``model``."""
    from kernels import Mode, use_kernel_mapping
    from kernels import kernelize as kernels_kernelize

    lm = causal_lm(model)
    register_swiglu()
    training = lm.training if training is None else training
    device = next(lm.parameters()).device.type
    with use_kernel_mapping(kernel_mapping(device), inherit_mapping=False):
        kernels_kernelize(lm, mode=Mode.TRAINING if training else Mode.INFERENCE, device=device)
    return model
