"""s1K data: loading (parquet, JSONL or a Hugging Face dataset name), s1's exact text and loss mask, length checks.

s1K rows carry ``question``, ``thinking_trajectories`` (a list holding one string) and ``attempt``; s1K-1.1
rows carry ``{deepseek,gemini}_thinking_trajectory`` and ``{deepseek,gemini}_attempt`` instead. Both are
turned into the same training text, built here rather than by a tokenizer's chat template (which differs
between Qwen versions)::

    <|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n
    <|im_start|>think\\n{thinking}\\n<|im_start|>answer\\n{answer}<|im_end|>\\n

Labels are unshifted (the model shifts them): -100 up to and including ``<|im_start|>assistant\\n``, the token
ids after it.

``format="r1"`` (``s1fast train --format r1``, to fine-tune an R1-distill model on its own format) writes the
R1 chat instead: the tokenizer's chat template renders the user turn (no system prompt, the question as it is),
then ``<think>\\n{thinking}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>`` with the attempt as the answer; the loss
covers what follows ``<｜Assistant｜>``. ``format="qwen3"`` likewise, in Qwen3's template
(``s1fast.model.chat.FORMATS``).
"""

from __future__ import annotations

import array
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from s1fast.files import read_records
from s1fast.model.chat import ReasoningFormat, check_tokenizer, resolve_format

IGNORE_INDEX = -100
DEFAULT_BLOCK_SIZE = 32768
TRAJECTORY_SOURCES = ("deepseek", "gemini")
CURATED_FILE = "s1k.jsonl"  # what `s1fast data select` writes into its --out folder; `--data FOLDER` reads it
SAMPLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "s1k_sample.jsonl")


def completion_text(thinking: str, attempt: str, format: str | ReasoningFormat = "s1") -> str:
    """The trained part: thinking, then the answer (s1: prefixed with "Answer: " unless it already says so)."""
    return resolve_format(format).completion_text(thinking, attempt)


def _schema(columns: Sequence[str], trajectory: str | None, where: str) -> tuple[str, str]:
    """(thinking column, attempt column) for s1K or s1K-1.1 columns; clear error when neither fits."""
    columns = set(columns)
    if trajectory is not None and trajectory not in TRAJECTORY_SOURCES:
        raise ValueError(f"trajectory must be one of {TRAJECTORY_SOURCES} (s1K-1.1) or None, got {trajectory!r}")
    s1k_1_1 = any(f"{s}_{kind}" in columns for s in TRAJECTORY_SOURCES for kind in ("thinking_trajectory", "attempt"))
    if trajectory is None and ("thinking_trajectories" in columns or not s1k_1_1):  # s1K, unless only s1K-1.1 fits
        pair = ("thinking_trajectories", "attempt")
    else:
        source = trajectory or "deepseek"
        pair = (f"{source}_thinking_trajectory", f"{source}_attempt")
    missing = sorted(({"question", *pair}) - columns)
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; expected s1K columns (question, thinking_trajectories, attempt) "
            f"or s1K-1.1 columns (question, {{deepseek,gemini}}_thinking_trajectory, {{deepseek,gemini}}_attempt); "
            f"found {sorted(columns)}"
        )
    return pair


def example_text(record: dict, *, trajectory: str | None = None, index: int | None = None,
                 format: str | ReasoningFormat = "s1", tokenizer=None) -> tuple[str, str]:
    """(prompt, completion) of one s1K or s1K-1.1 record; ``trajectory`` picks s1K-1.1's deepseek/gemini trace;
    ``format``'s text (r1 and qwen3 render the prompt with ``tokenizer``'s chat template)."""
    row = "record" if index is None else f"row {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{row}: expected a record (columns by name), got {type(record).__name__} {record!r:.60}")
    think_col, attempt_col = _schema(record.keys(), trajectory, row)
    question, thinking, attempt = record["question"], record[think_col], record[attempt_col]
    if isinstance(thinking, str):  # s1K-1.1: one string; s1K: a list of strings
        thinking = [thinking]
    if thinking is None or not all(isinstance(t, str) for t in thinking) or not "\n".join(thinking).strip():
        raise ValueError(f"{row}: no thinking trajectory in column {think_col!r} (got {thinking!r:.80})")
    for name, value in (("question", question), (attempt_col, attempt)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{row}: column {name!r} is empty or not a string (got {value!r:.80})")
    fmt = resolve_format(format)
    return fmt.prompt_text(question, tokenizer, instruction=False), fmt.completion_text("\n".join(thinking), attempt)


def tokenize_example(record: dict, tokenizer, *, trajectory: str | None = None, index: int | None = None,
                     format: str | ReasoningFormat = "s1") -> dict:
    """``format``'s text of ``record`` (default s1's) as ``{"input_ids": [...], "labels": [...]}`` (no special
    tokens added; labels unshifted, -100 up to and including the assistant header, s1's
    ``<|im_start|>assistant\\n``)."""
    return tokenize_records([record], tokenizer, trajectory=trajectory, first_index=index or 0, format=format)[0]


def tokenize_records(records: Sequence[dict], tokenizer, *, trajectory: str | None = None, first_index: int = 0,
                     format: str | ReasoningFormat = "s1") -> list[dict]:
    """:func:`tokenize_example` for many records in one batched tokenizer call."""
    check_tokenizer(tokenizer, format)
    pairs = [example_text(r, trajectory=trajectory, index=first_index + i, format=format, tokenizer=tokenizer)
             for i, r in enumerate(records)]
    enc = tokenizer([p + c for p, c in pairs], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for i, ((prompt, _), ids, offsets) in enumerate(zip(pairs, enc["input_ids"], enc["offset_mapping"])):
        # Number of tokens inside the prompt; the prompt ends with "\n" after a special token, so a token boundary
        # falls exactly at len(prompt) (checked, not assumed).
        n_prompt = sum(1 for _, end in offsets if end <= len(prompt))
        if n_prompt == 0 or offsets[n_prompt - 1][1] != len(prompt) or n_prompt >= len(ids):
            raise ValueError(f"row {first_index + i}: no token boundary after the assistant header")
        out.append({"input_ids": list(ids), "labels": [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:])})
    return out


@dataclass
class Dataset:
    """Tokenised examples that fit the block, with their source row indices and the rows dropped for length."""

    examples: list[dict]
    indices: list[int]
    dropped: list[tuple[int, int]]  # (row index, length in tokens)

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        """A hash of every example's tokens and labels: equal for the same data, tokenizer, trajectory and
        block size (what a resumed run must keep)."""
        h = hashlib.sha256()
        for ex in self.examples:
            for key in ("input_ids", "labels"):
                h.update(len(ex[key]).to_bytes(8, "little"))
                h.update(array.array("q", ex[key]).tobytes())
        return h.hexdigest()[:16]


def load_dataset(
    source: str | None, tokenizer, *, trajectory: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
    drop_long: bool = True, split: str = "train", format: str | ReasoningFormat = "s1",
) -> Dataset:
    """Read, check and tokenise a dataset. Examples longer than ``block_size`` are never cut: they are dropped
    (``drop_long``) or raise; either way each is reported by row index and length."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    where = source or SAMPLE_PATH
    if os.path.isdir(where) and os.path.isfile(os.path.join(where, CURATED_FILE)):
        where = os.path.join(where, CURATED_FILE)  # a folder written by `s1fast data select`
    records = read_records(where, split=split)
    if not records:
        raise ValueError(f"data {where!r} is empty: no rows to train on")
    columns = set().union(*(r.keys() for r in records))
    _schema(columns, trajectory, f"data {where!r}")
    tokenized = tokenize_records(records, tokenizer, trajectory=trajectory, format=format)
    long = [(i, len(t["input_ids"])) for i, t in enumerate(tokenized) if len(t["input_ids"]) > block_size]
    if long and not drop_long:
        raise ValueError(
            f"{len(long)} example(s) longer than block_size={block_size} tokens (row, length): {long[:20]}; "
            "raise the block size or allow dropping them (examples are never cut)"
        )
    long_rows = {i for i, _ in long}
    keep = [i for i in range(len(tokenized)) if i not in long_rows]
    if not keep:
        raise ValueError(f"every example of {where!r} is longer than block_size={block_size} tokens")
    return Dataset([tokenized[i] for i in keep], keep, long)
