"""s1fast's fused loss inside TRL: TRL's fused-LM-head protocol served by ``s1fast.kernels.fused_linear_cross_entropy``.

TRL's ``SFTTrainer`` (s1's own training script) wraps ``model.forward`` with ``trl.trainer.utils.add_fused_lm_head``
and calls ``model(..., labels=labels, fused_lm_head=True)``: the backbone, then per-token ``log_probs``,
``entropy``, ``is_top1`` and ``label_mask`` (a ``FusedCausalLMOutput``) without the ``[tokens, vocab]`` logits.
On a model patched with ``s1fast.model.patch``, s1fast's RMSNorm / RoPE / SwiGLU kernels run inside TRL's wrapper
but TRL's own chunked log-prob kernel computes the loss. :func:`add_fused_lm_head` (same arguments as TRL's) and
:func:`use_s1fast_lm_head` (one call after the trainer is built) route ``fused_lm_head=True`` to s1fast's kernel
instead::

    trainer = SFTTrainer(model=patch(model), args=SFTConfig(...), train_dataset=...)
    use_s1fast_lm_head(trainer)
    trainer.train()

TRL's semantics are kept: labels are shifted inside (``shift_labels`` are used as given), only positions whose label
is not -100 are scored (their log-prob, entropy and top-1 are 0 elsewhere; ``label_mask`` marks them), ``loss`` is
``-sum(log_probs) / num_items_in_batch`` (their count when not passed, at least 1), and ``temperature`` divides the
logits (s1fast divides the hidden states and bias instead: the same logits, one [tokens, H] pass). ``entropy`` and
``is_top1`` come from the kernel's first sweep (per-row scalars, no gradient); ``log_sum_sq_probs`` and
``mean_logits`` are not provided (None).

Why it is faster for SFT (measured in ``bench/README.md``): the SFT loss sums the log-probs with one weight, so
:func:`use_s1fast_lm_head` asks the kernel for ``uniform_grad``: the gradients are finished in the forward (one
logits GEMM, two gradient GEMMs, three in all), where TRL's kernel recomputes the logits in backward (four). A
loss that weights tokens differently (e.g. ``loss_type="dft"``) gets the exact recomputing path instead.
"""

from __future__ import annotations

import functools
import types

from torch import nn
from trl import SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput

from s1fast.commands import POSITIVE
from s1fast.kernels import fused_linear_cross_entropy
from s1fast.model.patch import causal_lm

_FN = "s1fast.train.trl_head"


def add_fused_lm_head(model: nn.Module, temperature: float = 1.0, *, uniform_grad: bool = False) -> nn.Module:
    """Give ``model`` (a Qwen2 / Qwen3 causal LM, patched or not, possibly already wrapped by TRL's
    ``add_fused_lm_head``) TRL's ``fused_lm_head=True`` protocol computed by s1fast's fused linear cross-entropy.
    Calls without ``fused_lm_head`` go to the forward the model had (generation and TRL's other paths unchanged).

    ``uniform_grad``: the caller only ever backpropagates ``log_probs`` summed with one weight (SFT's loss; the
    gradients are then computed in the forward); a gradient that differs between tokens gives NaN gradients.
    Returns ``model``.
    """
    lm = causal_lm(model)
    config = lm.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) is not None:
            raise ValueError(f"{_FN}: models with {name} are not supported (Qwen2 / Qwen3 have none)")
    POSITIVE.check(f"{_FN}: temperature", temperature)  # finite too: inf would flatten every logit to 0
    previous = lm.forward

    @functools.wraps(type(lm).forward)  # generate() and Trainer read the original signature, as with TRL's wrapper
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            passed = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return previous(*args, **kwargs, **{k: v for k, v in passed.items() if v is not None})
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor; the hidden states are plain tensors
            weight, bias = weight.full_tensor(), bias.full_tensor() if bias is not None else None
        labels = labels.to(weight.device)
        mask = labels != -100
        scored = hidden.to(weight.device)[mask]
        if temperature != 1.0:
            scored = scored / temperature
            bias = bias / temperature if bias is not None else None
        out = fused_linear_cross_entropy(scored, weight, labels[mask], bias, reduction="none",
                                         uniform_grad=uniform_grad, return_entropy=True, return_token_accuracy=True)
        # masked_scatter keeps an all-ignored batch connected to the graph (a differentiable zero), as TRL's
        log_probs = out.loss.new_zeros(mask.shape).masked_scatter(mask, -out.loss)
        entropy = out.entropy.new_zeros(mask.shape).masked_scatter(mask, out.entropy)
        is_top1 = mask.new_zeros(mask.shape).masked_scatter(mask, out.token_accuracy > 0.5)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    lm.forward = types.MethodType(forward, lm)
    return model


def use_s1fast_lm_head(trainer: SFTTrainer) -> SFTTrainer:
    """After ``SFTTrainer(...)`` is built: serve its fused LM head with s1fast's kernel (see the module docstring).
    The gradient-in-forward path is used when the trainer's loss sums the log-probs with one weight (``loss_type``
    "nll", no ``compute_loss_func``, no label smoothing); else the exact recomputing one. Returns ``trainer``."""
    if not isinstance(trainer, SFTTrainer):
        raise TypeError(f"{_FN}: use_s1fast_lm_head takes an SFTTrainer (TRL's other trainers read fields of the fused "
                        f"output s1fast does not compute, e.g. mean_logits), got {type(trainer).__name__}")
    uniform = (trainer.args.loss_type == "nll" and trainer.compute_loss_func is None
               and trainer.label_smoother is None)
    add_fused_lm_head(trainer.model, uniform_grad=uniform)
    return trainer
