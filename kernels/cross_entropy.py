"""Cross-entropy (placeholder: PyTorch path only; the Triton kernel is being written)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_reference(logits, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    x = logits.float()
    loss = F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = labels != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(x, -1).pow(2) * valid
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total


def cross_entropy(logits, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    return cross_entropy_reference(logits, labels, ignore_index, reduction, label_smoothing, z_loss)
