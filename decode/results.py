"""What generation returns: one ``RowResult`` per prompt, the batch's ``GenerationResult`` and the
``GenerationStream`` iterator that ends with it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from s1fast.decode.budget import RowState


@dataclass
class RowResult:
    """One prompt's output. ``tokens[:think_end]`` is the thinking, ``tokens[answer_start:]`` the answer (the
    delimiter lies between; both are 0 without budget forcing, ``len(tokens)`` if thinking never ended).
    ``injected``: what budget forcing put in ``tokens``, as ``(index in tokens, token ids)`` in order: each forced
    wait, the delimiter appended when the model ended thinking, or the budget's end (s1: newline, delimiter,
    "Final Answer:") at a cut."""

    tokens: list[int]
    thinking_tokens: int
    forced_waits: int
    budget_cut: bool
    thinking_ended: bool
    finish_reason: str  # "stop" or "length"
    think_end: int
    answer_start: int
    text: str | None = None
    thinking: str | None = None
    answer: str | None = None
    injected: list[tuple[int, list[int]]] = field(default_factory=list)

    @classmethod
    def from_state(cls, st: RowState, tokenizer=None) -> RowResult:
        end = len(st.tokens)
        think_end, answer_start = (st.think_end, st.answer_start) if st.thinking_ended else (end, end)
        row = cls(tokens=st.tokens, thinking_tokens=st.thinking, forced_waits=st.waits, budget_cut=st.budget_cut,
                  thinking_ended=st.thinking_ended, finish_reason=st.finish_reason, think_end=think_end,
                  answer_start=answer_start, injected=list(st.injected))
        if tokenizer is not None:
            dec = tokenizer.decode
            row.text, row.thinking = dec(st.tokens), dec(st.tokens[:think_end])
            row.answer = dec(st.tokens[answer_start:])
        return row


class _PerRow:
    """``result.<name>``: the list of ``rows[i].<name>`` over the prompts."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else [getattr(row, self.name) for row in obj.rows]


@dataclass
class GenerationResult:
    rows: list[RowResult]
    prefill_s: float
    decode_s: float
    decode_tokens: int  # tokens emitted by the decode loop (all but each row's first)
    steps: int  # forward passes after the prefill
    memory: dict = field(default_factory=dict)
    preemptions: int = 0  # requests whose KV pages were taken back to let older ones grow (recomputed later)

    # per-prompt lists, one entry per row: result.tokens[i] is rows[i].tokens
    tokens = _PerRow()
    thinking_tokens = _PerRow()
    forced_waits = _PerRow()
    budget_cut = _PerRow()
    thinking_ended = _PerRow()
    think_end = _PerRow()
    answer_start = _PerRow()
    finish_reason = _PerRow()
    text = _PerRow()
    thinking = _PerRow()
    answer = _PerRow()
    injected = _PerRow()

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class GenerationStream:
    """Iterator of ``(row, new_token_ids)`` as tokens are decided; ``.result`` once it is exhausted."""

    def __init__(self, gen: Iterator[tuple[int, list[int]]]):
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        self.result = yield from self._gen
