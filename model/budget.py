"""s1 budget forcing, at token level, as a per-row state machine the decoder runs inside its decode loop.

s1 (Muennighoff et al., 2025) controls how long a reasoning model thinks. The prompt ends with the think
delimiter (``<|im_start|>think``); thinking starts with the first generated token. At every thinking step,
with ``thinking`` = the model's thinking tokens plus injected wait tokens so far:

1. if ``max_thinking_tokens`` is reached (``thinking >= max_thinking_tokens``): the model's token is dropped,
   ``budget_end`` is appended and thinking is over (``budget_cut``);
2. else if the model's token equals ``end_think[0]``: if fewer than ``num_waits`` waits were injected, or
   ``thinking < min_thinking_tokens``, the token is dropped and ``wait`` appended (one forced wait, its tokens
   count as thinking); otherwise all of ``end_think`` is appended (its first token is the model's) and
   thinking is over;
3. else the token is a thinking token.

After thinking the row decodes normally until a stop token or ``max_new_tokens``. s1 does each edit by
stopping its engine, editing the text and calling the engine again on the whole history; the decoder applies
the same edits in one decode loop, feeding the appended tokens to the KV cache in one multi-token step.

s1's newline rule ("a newline first if the text does not end with one") at token level: ``newline`` (the ids
of "\\n") is put before ``budget_end`` unless the last token of the sequence so far (the prompt's last token
when nothing was generated yet) is in ``newline_ending``, the ids whose text ends with a newline.
``from_tokenizer`` fills both; with ``newline=()`` ``budget_end`` is appended as it is. One difference from
s1 is inherent to editing tokens instead of text: s1 re-tokenizes the edited text, where a trailing "." and
the new "\\n" may merge into one token; here the newline is its own token after the "." token.

Stop tokens: in thinking, the ``end_think[0]`` rule comes first; any other stop token ends the row there
(the token is kept, ``thinking_ended`` stays False). ``max_new_tokens`` bounds generated plus injected
tokens: an injection that does not fit is cut, and the row ends.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field

S1_END_THINK = "<|im_start|>answer"
S1_WAIT = "Wait"
S1_BUDGET_END = "<|im_start|>answer\nFinal Answer:"


def _ids(name: str, value: object, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"BudgetForcing: {name} must be a list of token ids, got {type(value).__name__}")
    ids = tuple(value)
    if not allow_empty and not ids:
        raise ValueError(f"BudgetForcing: {name} must hold at least one token id, got an empty list")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"BudgetForcing: {name} must hold non-negative int token ids, got {t!r}")
    return ids


def _count(name: str, value: object, *, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        expected = "None or an int >= 0" if optional else "an int >= 0"
        raise ValueError(f"BudgetForcing: {name} must be {expected}, got {value!r}")
    return value


@dataclass(frozen=True)
class BudgetForcing:
    """s1 budget forcing settings (token ids). See the module docstring for the exact semantics."""

    end_think: Sequence[int]
    wait: Sequence[int]
    budget_end: Sequence[int]
    max_thinking_tokens: int | None = None
    num_waits: int = 0
    min_thinking_tokens: int = 0
    newline: Sequence[int] = ()
    newline_ending: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once here
        set_(self, "end_think", _ids("end_think", self.end_think))
        set_(self, "wait", _ids("wait", self.wait))
        set_(self, "budget_end", _ids("budget_end", self.budget_end))
        set_(self, "newline", _ids("newline", self.newline, allow_empty=True))
        set_(self, "newline_ending", frozenset(_ids("newline_ending", tuple(self.newline_ending), allow_empty=True)))
        _count("max_thinking_tokens", self.max_thinking_tokens, optional=True)
        _count("num_waits", self.num_waits)
        _count("min_thinking_tokens", self.min_thinking_tokens)
        if self.max_thinking_tokens is not None and self.min_thinking_tokens > self.max_thinking_tokens:
            raise ValueError(
                f"BudgetForcing: min_thinking_tokens ({self.min_thinking_tokens}) must not exceed "
                f"max_thinking_tokens ({self.max_thinking_tokens})"
            )

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        *,
        max_thinking_tokens: int | None = None,
        num_waits: int = 0,
        min_thinking_tokens: int = 0,
        end_think: str = S1_END_THINK,
        wait: str = S1_WAIT,
        budget_end: str = S1_BUDGET_END,
    ) -> BudgetForcing:
        """s1's defaults: end_think "<|im_start|>answer", wait "Wait", budget_end
        "<|im_start|>answer\\nFinal Answer:" with the newline rule (scans the vocabulary once, about a second
        for Qwen's 151K tokens)."""

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        settings = cls(  # validated before the vocabulary scan
            end_think=encode(end_think),
            wait=encode(wait),
            budget_end=encode(budget_end),
            max_thinking_tokens=max_thinking_tokens,
            num_waits=num_waits,
            min_thinking_tokens=min_thinking_tokens,
        )
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ending = frozenset(i for i, t in enumerate(texts) if t.endswith("\n"))
        return dataclasses.replace(settings, newline=encode("\n"), newline_ending=ending)

    def token_ids(self) -> set[int]:
        """Every id these settings can inject (the decoder checks them against the vocabulary)."""
        return {*self.end_think, *self.wait, *self.budget_end, *self.newline}

    def longest_injection(self) -> int:
        return max(len(self.end_think), len(self.wait), len(self.newline) + len(self.budget_end))

    def budget_end_after(self, last_token: int) -> tuple[int, ...]:
        """``budget_end`` with s1's newline rule applied after ``last_token``."""
        if self.newline and last_token not in self.newline_ending:
            return (*self.newline, *self.budget_end)
        return self.budget_end


class RowState:
    """One sequence's generation state: the tokens it emitted and where budget forcing stands.

    ``step(token)`` takes the model's next token and returns the tokens to feed the model next (``[token]``
    when nothing is edited, the injected tokens otherwise, None when the row is finished); the emitted tokens
    are appended to ``tokens`` (cut at ``max_new_tokens``).
    """

    __slots__ = (
        "budget", "max_new_tokens", "stop", "tokens", "last", "thinking", "waits", "budget_cut",
        "thinking_ended", "think_end", "answer_start", "finish_reason",
    )  # fmt: skip

    def __init__(self, last_prompt_token: int, budget: BudgetForcing | None, max_new_tokens: int, stop: frozenset):
        self.budget = budget
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.tokens: list[int] = []
        self.last = last_prompt_token
        self.thinking = 0  # the model's thinking tokens plus injected wait tokens
        self.waits = 0
        self.budget_cut = False
        self.thinking_ended = budget is None
        self.think_end = 0  # index in tokens where thinking stops (the delimiter starts)
        self.answer_start = 0  # index in tokens where the answer starts (after the delimiter)
        self.finish_reason: str | None = None

    def step(self, token: int) -> list[int] | None:
        b = self.budget
        if self.thinking_ended:
            return self._emit([token], stop=token in self.stop)
        if b.max_thinking_tokens is not None and self.thinking >= b.max_thinking_tokens:
            self.budget_cut = True
            inject = b.budget_end_after(self.last)
            keep = len(inject) - len(b.budget_end)
            keep += len(b.end_think) if b.budget_end[: len(b.end_think)] == b.end_think else len(b.budget_end)
            return self._end_thinking(inject, keep)
        if token == b.end_think[0]:
            if self.waits < b.num_waits or self.thinking < b.min_thinking_tokens:
                self.waits += 1
                self.thinking += len(b.wait)
                return self._emit(list(b.wait))
            return self._end_thinking(b.end_think, len(b.end_think))
        self.thinking += 1
        return self._emit([token], stop=token in self.stop)

    def _end_thinking(self, inject: Sequence[int], delimiter_len: int) -> list[int] | None:
        self.thinking_ended = True
        self.think_end = len(self.tokens)
        self.answer_start = min(self.think_end + delimiter_len, self.max_new_tokens)
        return self._emit(list(inject))

    def _emit(self, tokens: list[int], *, stop: bool = False) -> list[int] | None:
        room = self.max_new_tokens - len(self.tokens)
        tokens = tokens[:room]
        self.tokens += tokens
        if tokens:
            self.last = tokens[-1]
        if stop:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        return None if self.finish_reason else tokens
