"""What one request asks for: ``SamplingParams`` (its settings, one frozen object that checks itself, as vLLM's
``SamplingParams``) and ``Request`` (a prompt with its settings and random key, what the engine queues).

``Decoder.generate`` / ``stream``, ``Engine.submit`` / ``post`` keep taking the settings as keywords and build a
``SamplingParams`` from them (``SamplingParams.of``, whose errors name the calling function); the vocabulary
check of the token ids is the decoder's (``Decoder.check_requests``), the object knows no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from s1fast.decode.budget import BudgetForcing
from s1fast.decode.sampling import Sampling, request_key


@dataclass(frozen=True)
class SamplingParams:
    """One request's settings, checked when built (a ValueError or TypeError naming the field).

    ``max_new_tokens``: generated plus injected tokens; ``temperature`` 0 is greedy; ``top_k`` / ``top_p``
    (transformers' rules, ``s1fast.decode.sampling``); ``seed`` (None: a fresh random key per request);
    ``stop_token_ids`` end a row (the stop token is kept), or its thinking while it thinks, as in s1 (held as a
    frozenset); ``budget``: s1 budget forcing (``BudgetForcing``) or None.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    budget: BudgetForcing | None = None

    def __post_init__(self) -> None:
        fn, n = "SamplingParams", self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{fn}: max_new_tokens must be an int >= 1, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"{fn}: temperature must be a number >= 0, got {t!r}")
        if not math.isfinite(t):
            raise ValueError(f"{fn}: temperature must be finite, got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"{fn}: top_k must be None or an int >= 1, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"{fn}: top_p must be None or a number in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"{fn}: seed must be None or an int, got {self.seed!r}")
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes, int)) or not isinstance(stop, (Sequence, set, frozenset)):
            raise TypeError(f"{fn}: stop_token_ids must be a list of token ids, got {type(stop).__name__}")
        for t in stop:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"{fn}: stop_token_ids must be ints >= 0 (token ids), got {t!r}")
        object.__setattr__(self, "stop_token_ids", frozenset(stop))  # frozen: normalised once here
        if self.budget is not None and not isinstance(self.budget, BudgetForcing):
            raise TypeError(f"{fn}: budget must be None or a BudgetForcing, got {type(self.budget).__name__}")

    @classmethod
    def of(cls, fn: str, **settings) -> SamplingParams:
        """``SamplingParams(**settings)`` whose errors name ``fn`` (the public function the settings came to)."""
        try:
            return cls(**settings)
        except (TypeError, ValueError) as e:
            message = str(e)
            if not message.startswith("SamplingParams: "):
                raise
            raise type(e)(f"{fn}: {message.removeprefix('SamplingParams: ')}") from None

    def sampling(self, stream: int = 0) -> Sampling:
        """The device-side settings, with the random key of ``stream`` of the seed (``request_key``)."""
        key = request_key(self.seed, stream)
        if self.temperature == 0:
            return Sampling(key=key)
        return Sampling(float(self.temperature), self.top_k, self.top_p, key)


@dataclass(frozen=True)
class Request:
    """One prompt (token ids, checked against the vocabulary) and how to decode it; ``sampling`` carries its
    random key."""

    prompt: list[int]
    params: SamplingParams
    sampling: Sampling

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def stop(self) -> frozenset[int]:
        return self.params.stop_token_ids

    @property
    def budget(self) -> BudgetForcing | None:
        return self.params.budget

    def positions(self, max_seq_len: int) -> int:
        """Cache positions the request may touch: prompt, new tokens (with s1_compat's overshoot), one edit."""
        feed, over = (self.budget.longest_injection(), self.budget.compat_overshoot()) if self.budget else (1, 0)
        p = len(self.prompt)
        return max(p + self.max_new_tokens, min(max_seq_len, p + over)) + feed
