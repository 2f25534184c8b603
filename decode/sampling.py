"""Sampling the next token of each row: greedy, temperature with top-k / top-p (transformers' rules), and the
per-request random streams."""

from __future__ import annotations

import torch


def make_generator(device, temperature: float, seed: int | None) -> torch.Generator | None:
    """A request's random stream: None for greedy, seeded by ``seed`` (or at random) otherwise."""
    if temperature == 0:
        return None
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator) -> torch.Tensor:
    """Next token per row: argmax when ``temperature == 0``; else softmax(logits / temperature) restricted to
    the ``top_k`` largest and to the smallest set with probability >= ``top_p`` (transformers' rules), drawn
    with the exponential race (argmax of p / Exp(1) noise), which needs no host sync."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1.0 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def group_sample(logits: torch.Tensor, sampling: list[tuple]) -> torch.Tensor:
    """Next token of each logits row with its request's sampling settings ``(temperature, top_k, top_p,
    generator)``; rows that share settings (and a generator) are drawn together."""
    groups: dict[tuple, list[int]] = {}
    for s, key in enumerate(sampling):
        groups.setdefault(key, []).append(s)
    if len(groups) == 1:
        return sample(logits, *sampling[0])
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for key, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        out[index] = sample(logits[index], *key)
    return out
