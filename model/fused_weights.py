"""Fused projection weights without a second copy: each decoder layer's q/k/v weights (and biases) and its
gate/up weights become consecutive views of one contiguous buffer, so a decode step runs q/k/v as one GEMM
(``F.linear(x, qkv, qkv_bias)``) and gate/up as another.

``fuse_projections(model)`` changes only where the parameters' values live: each buffer is the concatenation of
the tensors it replaces, and every parameter is pointed at its rows of it (``param.data = view``), so the model
keeps the same ``Parameter`` objects, names, shapes, values, dtypes and ``requires_grad``. ``state_dict()``,
``parameters()``, optimizers holding the parameters, ``load_state_dict`` (it copies into the views),
``unpatch`` and ``save_pretrained`` see nothing new: safetensors accepts tensors that share a storage as long as
they do not overlap, and writes each view's own bytes (no ``unfuse`` is needed to save; a round trip through
``save_pretrained`` / ``from_pretrained`` gives the same logits, see tests/test_fused_weights.py). The old
storages are freed as each layer is fused, so the weights' bytes do not change; the peak is one layer's
projections more.

``fused_projections(layer)`` gives the views spanning each buffer, or None when the layer's parameters are not
(or no longer) consecutive in one storage: anything that gives each parameter its own storage again
(``model.to(other dtype or device)``, FSDP sharding) just turns the fusion off, and a stale buffer is never
used, because nothing but the parameters' own storages and offsets is consulted.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from s1fast.model.patch import causal_lm

_FN = "fuse_projections"


class FusedProjections(NamedTuple):
    """Views of one decoder layer's fused buffers: ``qkv`` ``[(Hq + 2 Hkv) * D, hidden]`` (q rows, then k, then
    v), ``qkv_bias`` (``[(Hq + 2 Hkv) * D]``, None when the layer has no q/k/v biases, as Qwen3) and ``gate_up``
    ``[2 * intermediate, hidden]`` (gate rows, then up)."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor


def _groups(layer: nn.Module) -> tuple[list, list, list]:
    """(q/k/v weights, q/k/v biases or [], gate/up weights) of a decoder layer; a clear error unless the
    projections are plain ``nn.Linear`` with all three q/k/v biases or none."""
    att, mlp = layer.self_attn, layer.mlp
    qkv = [att.q_proj, att.k_proj, att.v_proj]
    gate_up = [mlp.gate_proj, mlp.up_proj]
    if not all(type(m) is nn.Linear for m in qkv + gate_up):
        kinds = sorted({type(m).__name__ for m in qkv + gate_up if type(m) is not nn.Linear})
        raise TypeError(f"{_FN}: the q/k/v and gate/up projections must be plain nn.Linear, found {kinds} "
                        "(merge adapters first, e.g. PEFT's merge_and_unload())")
    biases = [m.bias for m in qkv]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise ValueError(f"{_FN}: q/k/v must all have biases (Qwen2) or none (Qwen3), got "
                         f"{[b is not None for b in biases]}")
    return [m.weight for m in qkv], [b for b in biases if b is not None], [m.weight for m in gate_up]


def _span(params: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over ``params`` when they are consecutive contiguous rows of one storage (same dtype, device and
    trailing shape), else None. Detached: an inference view, not a parameter."""
    first = params[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in params:
        same = (p.dtype, p.device, p.shape[1:], p.untyped_storage().data_ptr(), p.storage_offset()) == (
            first.dtype, first.device, first.shape[1:], storage, offset)
        if not (same and p.is_contiguous()):
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in params)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _fuse(params: list[nn.Parameter]) -> None:
    """Point ``params`` at consecutive rows of one new contiguous buffer holding their values."""
    if _span(params) is not None:
        return  # already fused
    for p in params:
        if p.device.type == "meta" or type(p.data) is not torch.Tensor:
            raise TypeError(f"{_FN}: parameters must be plain tensors holding values (not meta or sharded), got "
                            f"{type(p.data).__name__} on {p.device}")
        if p.dtype != params[0].dtype or p.device != params[0].device:
            raise ValueError(f"{_FN}: projections of one layer must share one dtype and device, got "
                             f"{sorted({f'{q.dtype} on {q.device}' for q in params})}")
    buffer = torch.cat([p.detach() for p in params])
    offset = 0
    for p in params:
        p.data = buffer[offset : offset + p.shape[0]]
        offset += p.shape[0]


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """Make every decoder layer's q/k/v weights, q/k/v biases and gate/up weights views of one buffer each (see
    the module docstring), in place; returns ``model``. ``model``: a transformers Qwen2/2.5/3 causal LM or a PEFT
    model wrapping one (adapters merged). Fusing a fused model changes nothing."""
    for layer in causal_lm(model).model.layers:
        for group in _groups(layer):
            if group:
                _fuse(group)
    return model


def fused_projections(layer: nn.Module) -> FusedProjections | None:
    """The fused views of decoder layer ``layer``, or None unless all its groups are fused (module docstring)."""
    weights, biases, gate_up = _groups(layer)
    spans = _span(weights), _span(biases) if biases else None, _span(gate_up)
    if spans[0] is None or spans[2] is None or (biases and spans[1] is None):
        return None
    return FusedProjections(*spans)
