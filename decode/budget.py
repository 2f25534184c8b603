"""s1 budget forcing, at token level, as a per-row state machine the decoder runs inside its decode loop.

s1 (Muennighoff et al., 2025) controls how long a reasoning model thinks: a budget cut ends thinking at
``max_thinking_tokens``, forced waits ("Wait") make it think on. Entry points:

- :class:`BudgetForcing`: the settings, in token ids (``BudgetForcing.from_tokenizer`` builds them from a
  reasoning format's texts, ``s1fast.model.chat``).
- :class:`RowState`: one sequence's state; the decoder feeds it each sampled token (``RowState.step``).

Each rule is documented next to the code that runs it: a thinking step (``RowState.step``), which tokens end
thinking (``BudgetForcing.thinking_enders``), s1's newline rule (``BudgetForcing.budget_end_after``), and the
quirks of s1's own code that ``s1_compat`` reproduces (``RowState._past_budget``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from s1fast.model.chat import FORMATS, ReasoningFormat, resolve_format

_S1 = FORMATS["s1"]
S1_END_THINK, S1_WAIT, S1_BUDGET_END = _S1.end_think, _S1.wait, _S1.budget_end
# s1 also ends thinking on the end of the turn (plus the tokenizer's eos_token, see from_tokenizer, and the model's
# generation-config eos ids, which the decoder adds to every request's stop tokens as vLLM does)
S1_END_THINK_TOKENS = _S1.end_think_tokens


def _ids(name: str, value: object, *, allow_empty: bool = False, unordered: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, set, frozenset) if unordered else Sequence):
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
    """s1 budget forcing settings (token ids). ``RowState.step`` has the exact semantics.

    ``end_think_tokens``: tokens that end thinking besides ``end_think[0]`` (which always does).
    ``s1_compat``: reproduce the two quirks of s1's evaluation code (``RowState._past_budget``); off by default.
    """

    end_think: Sequence[int]
    wait: Sequence[int]
    budget_end: Sequence[int]
    max_thinking_tokens: int | None = None
    num_waits: int = 0
    min_thinking_tokens: int = 0
    newline: Sequence[int] = ()
    newline_ending: frozenset[int] = field(default_factory=frozenset)
    end_think_tokens: frozenset[int] = field(default_factory=frozenset)
    s1_compat: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once here
        set_(self, "end_think", _ids("end_think", self.end_think))
        set_(self, "wait", _ids("wait", self.wait))
        set_(self, "budget_end", _ids("budget_end", self.budget_end))
        set_(self, "newline", _ids("newline", self.newline, allow_empty=True))
        for name in ("newline_ending", "end_think_tokens"):
            set_(self, name, frozenset(_ids(name, getattr(self, name), allow_empty=True, unordered=True)))
        _count("max_thinking_tokens", self.max_thinking_tokens, optional=True)
        _count("num_waits", self.num_waits)
        _count("min_thinking_tokens", self.min_thinking_tokens)
        if self.max_thinking_tokens is not None and self.min_thinking_tokens > self.max_thinking_tokens:
            raise ValueError(
                f"BudgetForcing: min_thinking_tokens ({self.min_thinking_tokens}) must not exceed "
                f"max_thinking_tokens ({self.max_thinking_tokens})"
            )
        if not isinstance(self.s1_compat, bool):
            raise TypeError(f"BudgetForcing: s1_compat must be a bool, got {self.s1_compat!r}")

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        *,
        max_thinking_tokens: int | None = None,
        num_waits: int = 0,
        min_thinking_tokens: int = 0,
        end_think: str | None = None,
        wait: str | None = None,
        budget_end: str | None = None,
        end_think_tokens: Sequence[str] | None = None,
        s1_compat: bool = False,
        format: str | ReasoningFormat = "s1",
    ) -> BudgetForcing:
        """The texts of a reasoning ``format`` (``s1fast.model.chat.FORMATS`` by name, or ``"auto"`` to read it
        from the tokenizer), each overridable: s1's end_think "<|im_start|>answer", wait "Wait", budget_end
        "<|im_start|>answer\\nFinal Answer:"; r1's and qwen3's end_think "</think>", wait "Wait", budget_end
        "</think>\\n\\n"; with the newline rule (scans the vocabulary once, about a second for Qwen's 151K
        tokens). ``end_think_tokens``: the texts of single tokens that also end thinking; default: the format's
        (s1: ``S1_END_THINK_TOKENS``) and the tokenizer's ``eos_token``, those the vocabulary has (the model's
        generation-config eos ids end thinking too, as stop tokens of every request: ``Decoder.eos_token_ids``)."""
        fmt = resolve_format(format, tokenizer if format == "auto" else None)  # the prompt's tokens are not needed
        end_think = fmt.end_think if end_think is None else end_think
        wait = fmt.wait if wait is None else wait
        budget_end = fmt.budget_end if budget_end is None else budget_end

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        if end_think_tokens is None:
            texts = [t for t in (*fmt.end_think_tokens, tokenizer.eos_token) if t]
            enders = [ids[0] for ids in map(encode, texts) if len(ids) == 1]
        elif isinstance(end_think_tokens, (str, bytes)) or not isinstance(end_think_tokens, Sequence):
            raise TypeError(
                f"BudgetForcing: end_think_tokens must be a list of token texts, got {type(end_think_tokens).__name__}"
            )
        else:
            enders = []
            for text in end_think_tokens:
                ids = encode(text) if isinstance(text, str) else ()
                if len(ids) != 1:
                    raise ValueError(f"BudgetForcing: end_think_tokens must be texts of single tokens, {text!r} is "
                                     f"{len(ids) or 'not a text of'} tokens")
                enders.append(ids[0])
        settings = cls(  # validated before the vocabulary scan
            end_think=encode(end_think),
            wait=encode(wait),
            budget_end=encode(budget_end),
            max_thinking_tokens=max_thinking_tokens,
            num_waits=num_waits,
            min_thinking_tokens=min_thinking_tokens,
            end_think_tokens=enders,
            s1_compat=s1_compat,
        )
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ending = frozenset(i for i, t in enumerate(texts) if t.endswith("\n"))
        return dataclasses.replace(settings, newline=encode("\n"), newline_ending=ending)

    @property
    def thinking_enders(self) -> frozenset[int]:
        """The tokens that end thinking (with a request's stop tokens).

        s1's thinking phase stops on ``<|im_start|>`` and on the task's stop strings, the tokenizer's end of sequence
        (``<|im_end|>``) among them; it then forces a wait or appends ``<|im_start|>answer`` and decodes an answer. So a
        stop token inside thinking ends the thinking, not the row. ``from_tokenizer`` puts the end-of-turn and
        end-of-sequence tokens in ``end_think_tokens`` so that this holds without stop tokens too (``format="r1"`` /
        ``"qwen3"`` give those formats' own: ``end_think="</think>"``, their end tokens,
        ``budget_end="</think>\\n\\n"``; ``s1fast.model.chat``).
        """
        return self.end_think_tokens | {self.end_think[0]}

    @property
    def forces_waits(self) -> bool:
        return self.num_waits > 0 or self.min_thinking_tokens > 0

    def token_ids(self) -> set[int]:
        """Every id these settings use (the decoder checks them against the vocabulary)."""
        return {*self.end_think, *self.wait, *self.budget_end, *self.newline, *self.end_think_tokens}

    def longest_injection(self) -> int:
        """The most tokens one edit feeds: a wait cut by the budget comes with the budget's end."""
        return max(len(self.end_think), len(self.wait), len(self.wait) - 1 + len(self.newline) + len(self.budget_end))

    def compat_overshoot(self) -> int:
        """The most tokens a row may decode past the budget and drop (``s1_compat``; 0 otherwise): the round in
        progress and each remaining one may run a whole budget, as in s1."""
        if not self.s1_compat or self.max_thinking_tokens is None or not self.forces_waits:
            return 0
        return (self.num_waits + 2) * (self.max_thinking_tokens + len(self.wait))

    def budget_end_after(self, last_token: int) -> tuple[int, ...]:
        """``budget_end`` with s1's newline rule applied after ``last_token``.

        s1's newline rule ("a newline first if the text does not end with one") at token level: ``newline`` (the ids
        of "\\n") is put before ``budget_end`` unless the last token kept (the prompt's last token when nothing was
        generated yet) is in ``newline_ending``, the ids whose text ends with a newline. ``from_tokenizer`` fills both;
        with ``newline=()`` ``budget_end`` is appended as it is. One difference from s1 is inherent to editing tokens
        instead of text: s1 re-tokenizes the edited text, where a trailing "." and the new "\\n" may merge into one
        token; here the newline is its own token after the "." token.
        """
        if self.newline and last_token not in self.newline_ending:
            return (*self.newline, *self.budget_end)
        return self.budget_end


class RowState:
    """One sequence's generation state: the tokens it emitted and where budget forcing stands.

    ``step(token)`` takes the model's next token and returns the tokens to feed the model next (``[token]``
    when nothing is edited, the injected tokens otherwise, None when the row is finished); the emitted tokens
    are appended to ``tokens`` (cut at ``max_new_tokens``), and what budget forcing put there (waits, the
    delimiter, the budget's end) to ``injected``. After each step, ``mask_enders`` says whether the
    next token must not be one that ends thinking (the first of a round), and ``rewind`` how many fed tokens
    the returned ones replace (``s1_compat`` dropping what it decoded past the budget; 0 otherwise).
    ``room``: the tokens the sequence may hold after the prompt (``max_seq_len`` minus the prompt).
    """

    __slots__ = (
        "budget", "max_new_tokens", "room", "stop", "enders", "tokens", "last", "thinking", "waits", "round_len",
        "budget_cut", "thinking_ended", "think_end", "answer_start", "finish_reason", "mask_enders", "rewind",
        "past", "past_waits", "past_last", "injected",
    )

    def __init__(self, last_prompt_token: int, budget: BudgetForcing | None, max_new_tokens: int, stop: frozenset,
                 room: int | None = None):
        self.budget = budget
        self.max_new_tokens = max_new_tokens
        self.room = max_new_tokens if room is None else room
        self.stop = stop
        self.enders = frozenset() if budget is None else budget.thinking_enders | stop
        self.tokens: list[int] = []
        self.last = last_prompt_token
        self.thinking = 0  # the model's thinking tokens plus injected wait tokens (kept ones)
        self.waits = 0
        self.round_len = 0  # the model's tokens since thinking started or the last wait
        self.budget_cut = False
        self.thinking_ended = budget is None
        self.think_end = 0  # index in tokens where thinking stops (the delimiter starts)
        self.answer_start = 0  # index in tokens where the answer starts (after the delimiter)
        self.finish_reason: str | None = None
        self.mask_enders = budget is not None and budget.forces_waits
        self.rewind = 0
        self.past: int | None = None  # s1_compat, past the budget: tokens fed beyond the kept ones
        self.past_waits = 0
        self.past_last = 0  # ... and the last of them
        self.injected: list[tuple[int, list[int]]] = []  # (index in tokens, the tokens budget forcing put there)

    def step(self, token: int) -> list[int] | None:
        """Take the model's next ``token``; return the tokens to feed next (class docstring).

        The prompt ends with the think delimiter (``<|im_start|>think``); thinking starts with the first generated
        token. ``thinking`` counts the model's thinking tokens plus the injected wait tokens. At every thinking step:

        1. if ``max_thinking_tokens`` is reached (``thinking >= max_thinking_tokens``): the model's token is dropped,
           ``budget_end`` is appended and thinking is over (``budget_cut``);
        2. else if the token ends thinking (``end_think[0]``, one of ``end_think_tokens``, or a stop token of the
           request): it is dropped; if fewer than ``num_waits`` waits were injected, or ``thinking <
           min_thinking_tokens``, ``wait`` is appended (one forced wait; its tokens count as thinking, and those past
           the budget are cut as in 1, ``budget_end`` following the last one kept); otherwise ``end_think`` is appended
           and thinking is over;
        3. else the token is a thinking token.

        Thinking thus runs in rounds: the first, and one after each forced wait. When waits can be forced
        (``num_waits`` or ``min_thinking_tokens`` > 0), the first token of a round is never one that ends thinking
        (``RowState.mask_enders``: the decoder masks those tokens before sampling), as s1 runs its rounds with vLLM's
        ``min_tokens=1``. After thinking the row decodes normally until a stop token or ``max_new_tokens``, which
        bounds generated plus injected tokens: an injection that does not fit is cut, and the row ends.
        """
        self.mask_enders, self.rewind = False, 0
        if self.thinking_ended:
            return self._emit([token], stop=token in self.stop)
        b = self.budget
        if self.past is not None or (b.max_thinking_tokens is not None and self.thinking >= b.max_thinking_tokens):
            return self._past_budget(token) if b.s1_compat else self._cut(self.last)
        if token in self.enders:
            if self.waits < b.num_waits or self.thinking < b.min_thinking_tokens:
                return self._wait()
            return self._end_thinking(b.end_think, len(b.end_think))
        self.thinking += 1
        self.round_len += 1
        return self._emit([token])

    def _wait(self) -> list[int] | None:
        b = self.budget
        self.waits += 1
        self.round_len = 0
        room = len(b.wait) if b.max_thinking_tokens is None else b.max_thinking_tokens - self.thinking
        kept = list(b.wait[:room])
        self.thinking += len(kept)
        if len(kept) < len(b.wait) and not b.s1_compat:
            return self._cut(kept[-1], kept)
        if self._inject(kept) is None:
            return None
        if len(kept) < len(b.wait):  # s1_compat: the whole wait goes on to the model, the cut comes later
            self.past, self.past_waits, self.past_last = len(b.wait) - len(kept), 0, b.wait[-1]
        self.mask_enders = True
        return list(b.wait)

    def _past_budget(self, token: int) -> list[int] | None:
        """``s1_compat`` past the budget: decode s1's remaining rounds without keeping them, until its last
        round ends, then rewind to the budget and append what s1 appends.

        s1's own code (the thinking branch of ``_model_generate`` in its lm-evaluation-harness fork) runs every round as
        a new vLLM call allowed the whole budget, joins the rounds and cuts them to the budget afterwards. For greedy
        decoding the rules of ``step`` give the tokens of that algorithm (the tests run it on transformers against the
        decoder), but for two quirks of that code:

        (a) when the budget is crossed in a round that then stops by itself (the model ends thinking with no waits
            left), s1 cuts the tokens to the budget yet appends ``end_think`` (``<|im_start|>answer``): no newline, no
            "Final Answer:";
        (b) when the last round stops at its length limit (the whole budget in that round, or the sequence filling
            the model's length, ``max_seq_len`` here), s1's newline rule looks at that round's last token, which the
            cut removed, instead of the last token kept.

        ``s1_compat=True`` reproduces both, so that s1's own evaluations can be matched token for token: past the
        budget it decodes on as s1 does (each remaining round may run a whole budget), keeps none of it, and rewinds
        the row to the cut (``RowState.rewind``) once it knows how s1's last round ended. That costs the extra
        decoding and its KV cache (``compat_overshoot``), so it is off by default; the default rule is also the
        cleaner one: a budget cut always ends with ``budget_end``, and the newline rule looks at the text the model
        goes on from. Where a round ends thinking on its last allowed token, it counts as ended (stopped), as in vLLM,
        which checks a stop token before the length limit (V0's stop checker; V1's ``check_stop`` in current
        releases, 0.32 among them: eos, then stop token ids, then the length; some early V1 releases checked the
        length first).
        """
        b = self.budget
        if self.past is None:
            self.past, self.past_waits, self.past_last = 0, 0, self.last
        if self.round_len >= b.max_thinking_tokens or len(self.tokens) + self.past >= self.room:
            return self._cut(self.past_last)  # the round stopped at its length: quirk (b)
        if token in self.enders:
            if self.waits + self.past_waits < b.num_waits:
                self.past_waits += 1
                self.round_len = 0
                self.past += len(b.wait)
                self.past_last = b.wait[-1]
                self.mask_enders = True
                return list(b.wait)
            self.budget_cut = True
            return self._end_thinking(b.end_think, len(b.end_think))  # it stopped by itself: quirk (a)
        self.round_len += 1
        self.past += 1
        self.past_last = token
        return [token]

    def _cut(self, last: int, kept: Sequence[int] = ()) -> list[int] | None:
        """The budget is spent: ``kept`` (the wait tokens that fit), then ``budget_end`` with the newline rule
        after ``last``."""
        b = self.budget
        self.budget_cut = True
        end = b.budget_end_after(last)
        delimiter = len(end) - len(b.budget_end)
        delimiter += len(b.end_think) if b.budget_end[: len(b.end_think)] == b.end_think else len(b.budget_end)
        return self._end_thinking(end, delimiter, kept)

    def _end_thinking(self, inject: Sequence[int], delimiter_len: int, kept: Sequence[int] = ()) -> list[int] | None:
        self.rewind, self.past = self.past or 0, None
        self.thinking_ended = True
        self.think_end = min(len(self.tokens) + len(kept), self.max_new_tokens)
        self.answer_start = min(self.think_end + delimiter_len, self.max_new_tokens)
        return self._inject([*kept, *inject])

    def _inject(self, tokens: list[int]) -> list[int] | None:
        """``_emit`` of tokens budget forcing puts in the text, recorded in ``injected`` (as far as they fit)."""
        start = len(self.tokens)
        feed = self._emit(tokens)
        if len(self.tokens) > start:
            self.injected.append((start, self.tokens[start:]))
        return feed

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
