"""Fused linear cross-entropy (placeholder: unchunked PyTorch; the real implementation is being written)."""

from __future__ import annotations

import torch.nn.functional as F

from s1fast.kernels.cross_entropy import cross_entropy_reference


def fused_linear_cross_entropy_reference(
    hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
    num_items_in_batch=None,
):
    logits = F.linear(hidden, weight, bias)
    if num_items_in_batch is not None:
        return cross_entropy_reference(logits, labels, ignore_index, "sum", label_smoothing, z_loss) / num_items_in_batch
    return cross_entropy_reference(logits, labels, ignore_index, reduction, label_smoothing, z_loss)


def fused_linear_cross_entropy(
    hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
    num_items_in_batch=None,
):
    return fused_linear_cross_entropy_reference(
        hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss, num_items_in_batch
    )
