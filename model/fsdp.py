"""FSDP2 sharding of a (patched or not) Qwen causal LM: one ``fully_shard`` unit per decoder layer plus the root.

This is the s1 recipe's FSDP layout (full shard, each decoder layer wrapped). The root unit holds the
embedding, the final norm and ``lm_head`` (tied or not), so the fused loss reads the all-gathered
``lm_head.weight`` inside the root's forward. Patching works before or after sharding: ``fully_shard`` keeps
every module and only swaps the classes of the modules it wraps, while the patch lives in instance attributes.
"""

from __future__ import annotations

import torch
from torch import nn

from s1fast.model.patch import causal_lm


def shard_model(
    model: nn.Module,
    *,
    mesh=None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every decoder layer of ``model`` and then to ``model`` itself; return it.

    ``model`` is a ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` or a PEFT model around one (the root unit is
    then the PEFT wrapper). ``mesh`` is a 1-D ``DeviceMesh`` (default: all ranks of the default process group
    on the current device type). ``param_dtype`` is the compute dtype of the all-gathered parameters (None:
    the stored dtype); ``reduce_dtype`` the dtype of the gradient reduce-scatter (fp32 by default, so bf16
    training averages gradients in fp32). The process group must already be initialised.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in causal_lm(model).model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
