"""From a global batch to the rows the model runs: the example order of an epoch, the micro-batch plan (padding-free
packing), collation, and document-masked attention with FlexAttention for packed rows on GPUs without flash-attn.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from s1fast.train.data import IGNORE_INDEX

# The name under which the document-masked attention below is registered in transformers' AttentionInterface.
FLEX_ATTENTION = "s1fast_flex_document"
FLEX_BLOCK = 128  # FlexAttention's block size: a FlexAttention row is padded to a multiple of it


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of ``epoch`` (the same on every rank and every resume)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def plan_micro_batches(lengths: Sequence[int], *, world_size: int, max_tokens: int,
                       pack: bool) -> list[list[list[int]]]:
    """Split one global batch into micro-batches, per rank: ``plan[rank][m]`` lists positions into ``lengths``.

    Packing is first-fit decreasing into rows of at most ``max_tokens`` tokens (an example longer than that gets
    a row alone), so examples of similar length share rows and no token is padding. Rows go to the rank with
    the fewest tokens so far (longest first), and every rank gets the same number of micro-batches (FSDP needs
    the same collectives on every rank): a rank short of rows gets empty ones, which contribute nothing.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        slot = next((r for r, free in enumerate(room) if pack and free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(max_tokens - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    plan: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for row in sorted(rows, key=lambda r: -sum(lengths[i] for i in r)):
        rank = min(range(world_size), key=lambda r: (load[r], len(plan[r]), r))
        plan[rank].append(row)
        load[rank] += sum(lengths[i] for i in row)
    count = max(len(p) for p in plan)
    for p in plan:
        p.extend([] for _ in range(count - len(p)))
    return plan


def collate(examples: Sequence[dict], pad_id: int = 0, *, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row ``[1, T]`` with ``position_ids`` restarting at 0 for each example.

    Each example's first label becomes -100: the model shifts labels, so the last token of one example would
    otherwise be trained to predict the first token of the next. Attention stays inside each example because
    transformers reads the restarting ``position_ids`` (flash-attn varlen, or sdpa's block-diagonal mask) or, with
    FlexAttention, :func:`document_mask` does; the model must be called with ``use_cache=False``. ``multiple_of``
    pads the row to a multiple of that many tokens with one more document of ``pad_id`` tokens, all labels -100.
    No examples: one ignored token (padded likewise).
    """
    ids, labels, positions = [], [], []
    for ex in examples:
        ids.extend(ex["input_ids"])
        labels.append(IGNORE_INDEX)
        labels.extend(ex["labels"][1:])
        positions.extend(range(len(ex["input_ids"])))
    pad = -len(ids) % multiple_of if ids else multiple_of
    ids.extend([pad_id] * pad)
    labels.extend([IGNORE_INDEX] * pad)
    positions.extend(range(pad))
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }


def num_items(examples: Sequence[dict]) -> int:
    """Tokens that carry a loss after the shift: transformers' ``num_items_in_batch`` of these examples."""
    return sum(sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX) for ex in examples)


# --- FlexAttention: packed rows without flash-attn ---------------------------------------------------------------
# sdpa's mask for a packed row is dense ([T, T] booleans, and every block of the product is computed), so without
# flash-attn `--packing auto` used to give each example its own row on GPUs. FlexAttention computes only the blocks
# of the document mask that hold an allowed pair: a row of n examples costs about what the n examples cost apart.


def document_mask(position_ids: torch.Tensor, *, compile: bool | None = None):
    """The FlexAttention ``BlockMask`` of one packed row (``position_ids`` ``[1, T]``, restarting at 0 at each
    document, as :func:`collate` writes them): causal attention inside each document, none across. Built on the
    device of ``position_ids``; ``compile`` (default: on CUDA) builds it with torch.compile rather than eagerly
    (eager evaluates all ``T x T`` pairs at once)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if position_ids.ndim != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"position_ids must be one packed row [1, T], got shape {tuple(position_ids.shape)}")
    doc = (position_ids[0] == 0).cumsum(0)

    def same_document_causal(batch, head, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    t = doc.numel()
    compile = position_ids.device.type == "cuda" if compile is None else compile
    return create_block_mask(same_document_causal, None, None, t, t, device=position_ids.device, _compile=compile)


@functools.cache
def _compiled_flex_attention():
    """FlexAttention compiled, once per process (torch.compile compiles it for the first row length, then once more
    with dynamic shapes at the first other length). Uncompiled, FlexAttention materialises the scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_document_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """A transformers attention function (``AttentionInterface``): with a ``BlockMask`` (:func:`document_mask`),
    FlexAttention, compiled on CUDA, eager elsewhere (torch 2.13 has no FlexAttention backward on CPU: there it
    serves forward passes only); with any other mask (a call without a packed row's mask), sdpa as usual."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout or kwargs.get("sliding_window") is not None:
        raise ValueError("FlexAttention packing supports neither attention dropout nor a sliding window")
    flex = _compiled_flex_attention() if query.device.type == "cuda" else flex_attention
    out = flex(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def use_flex_attention(model: nn.Module) -> None:
    """Give ``model`` (a transformers model, this instance only) :func:`flex_document_attention`: registered under
    :data:`FLEX_ATTENTION` in transformers' attention and mask interfaces (sdpa's mask for calls without a
    ``BlockMask``), then selected with the model's ``set_attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLEX_ATTENTION, flex_document_attention)
    AttentionMaskInterface.register(FLEX_ATTENTION, sdpa_mask)
    model.set_attn_implementation(FLEX_ATTENTION)
