"""The bodies of ``s1fast serve``'s OpenAI-compatible API as pydantic models (vLLM's ``protocol.py`` is the model):
requests with OpenAI's field names plus s1fast's extensions, every field checked with its bounds; responses with
OpenAI's shapes plus the thinking (``reasoning_content``) and the budget-forcing counts. ``/docs`` and
``/openapi.json`` show them.

Requests: ``CompletionRequest`` (``POST /v1/completions``) and ``ChatCompletionRequest`` (``POST
/v1/chat/completions``) share ``GenerationRequest``'s fields. ``parse(model, raw)`` validates the raw JSON bytes
(pydantic's own parser: ``Infinity``, ``NaN`` and numbers past float's range are refused, and so is nesting deeper
than its recursion limit, a few hundred levels), then ``request.check(limits)`` applies the bounds that depend on
the served model (``Limits``: its name, vocabulary, length, rows). Every refusal is a ``BadRequest`` naming the field,
which the server answers with OpenAI's error body, status 400.

Fields that no model of OpenAI's API has are refused with OpenAI's own message ("Unrecognized request argument
supplied: NAME"), as OpenAI does; vLLM accepts them and logs a warning instead. s1fast refuses them so that a
misspelt extension (``max_thinking_token``) cannot be dropped in silence. OpenAI fields s1fast does not implement
(``UNSUPPORTED``: tools, response formats, log-probabilities, penalties, ...) are refused naming the field unless
they hold the value that asks for nothing (``logprobs: false``, ``presence_penalty: 0``, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

INT64 = 2**63
MAX_STOP = 16  # stop entries (OpenAI takes 4 strings; s1fast also takes token ids)
MAX_STOP_CHARS = 1000  # characters per stop string

# OpenAI request fields s1fast does not implement -> (the values that ask for nothing, what is missing)
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "tools": ((None,), "tool calls"),
    "tool_choice": ((None, "none"), "tool calls"),
    "parallel_tool_calls": ((None,), "tool calls"),
    "functions": ((None,), "function calls"),
    "function_call": ((None, "none"), "function calls"),
    "response_format": ((None, {"type": "text"}), "structured output"),
    "logit_bias": ((None, {}), "logit biases"),
    "logprobs": ((None, False), "log-probabilities (the engine samples on the device and returns none)"),
    "top_logprobs": ((None,), "log-probabilities (the engine samples on the device and returns none)"),
    "presence_penalty": ((None, 0), "penalties"),
    "frequency_penalty": ((None, 0), "penalties"),
    "best_of": ((None, 1), "best-of sampling (use n)"),
    "echo": ((None, False), "echoing the prompt"),
    "suffix": ((None,), "suffixes (insertion)"),
    "audio": ((None,), "audio"),
    "modalities": ((None, ["text"]), "modalities but text"),
    "prediction": ((None,), "predicted outputs"),
}


class BadRequest(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body naming ``param``."""

    def __init__(self, param: str, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.message, self.status, self.kind = param, message, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param or None, "code": None}}


@dataclass(frozen=True)
class Limits:
    """What the served model bounds: its name, vocabulary size, length (prompt plus new tokens) and rows."""

    model: str
    vocab: int
    max_seq_len: int
    max_rows: int


def _same(value, ok) -> bool:
    """JSON equality: 0 and 0.0 alike, false and 0 not."""
    return value == ok and isinstance(value, bool) == isinstance(ok, bool)


class _Request(BaseModel):
    # strict: no "3" for 3, no true for 1, no 2.0 for 2; extra fields refused (module docstring)
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

class StreamOptions(_Request):
    include_usage: bool = Field(True, description="a last chunk with the usage (s1fast's default: true)")


class GenerationRequest(_Request):
    """The fields both endpoints share: OpenAI's, then s1fast's extensions."""

    model: str = Field(description="the served model's name (``GET /v1/models``)")
    max_tokens: int | None = Field(None, ge=1, description="an integer >= 1: generated plus injected tokens at "
                                   "most (default: --default-max-tokens past max_thinking_tokens, within the model's "
                                   "length)")
    max_completion_tokens: int | None = Field(None, ge=1, description="an integer >= 1: max_tokens by OpenAI's newer "
                                              "name (give one of them, or both equal)")
    temperature: float | None = Field(None, ge=0, le=2, description="a number in [0, 2] (default 1; 0: greedy)")
    top_p: float | None = Field(None, gt=0, le=1, description="a number in (0, 1]")
    top_k: int | None = Field(None, ge=-1, description="-1 (off) or an integer >= 1, at most the vocabulary size")
    seed: int | None = Field(None, ge=-INT64, lt=INT64, description="a 64-bit integer (choice i samples with seed + i)")
    n: int = Field(1, ge=1, description="an integer >= 1, at most the server's --max-rows: choices to generate")
    stop: str | int | list[str | int] | None = Field(
        None, description=f"a string or a token id, or a list of at most {MAX_STOP} of them: non-empty strings of at "
        f"most {MAX_STOP_CHARS} characters (matched on the answer's text), token ids in [0, vocab) (kept)")
    stream: bool = Field(False, description="a boolean: server-sent events, then data: [DONE]")
    stream_options: StreamOptions | None = Field(None, description="{include_usage: a boolean}, with stream only")
    user: str | None = Field(None, description="a string naming the end user (not used)")
    max_thinking_tokens: int | None = Field(None, ge=0, description="an integer >= 0, at most the model's length: "
                                            "the thinking budget (s1fast extension)")
    num_waits: int | None = Field(None, ge=0, description="an integer >= 0, at most the model's length: "
                                  "times 'Wait' replaces an early end of thinking (s1fast extension)")
    min_thinking_tokens: int | None = Field(None, ge=0, description="an integer >= 0, at most max_thinking_tokens: "
                                            "'Wait' replaces an end of thinking before it (s1fast extension)")
    return_token_ids: bool = Field(False, description="a boolean: each choice's token_ids (s1fast extension)")

    @field_validator("n", "stream", "return_token_ids", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """null asks for the default, as OpenAI's nullable fields do."""
        return cls.model_fields[info.field_name].default if value is None else value

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        """``UNSUPPORTED`` fields: refused, or dropped when they hold a value that asks for nothing."""
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            if name in UNSUPPORTED and not any(_same(value, ok) for ok in UNSUPPORTED[name][0]):
                allowed = " or ".join(json.dumps(ok) for ok in UNSUPPORTED[name][0])
                raise BadRequest(name, f"{name} is not supported: s1fast serve has no {UNSUPPORTED[name][1]}; "
                                       f"leave {name} out (or give {allowed})")
        return {k: v for k, v in data.items() if k not in UNSUPPORTED}

    @property
    def forcing(self) -> dict:
        """The budget-forcing fields given (BudgetForcing's names)."""
        names = ("max_thinking_tokens", "num_waits", "min_thinking_tokens")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    @property
    def stops(self) -> list:
        return [] if self.stop is None else self.stop if isinstance(self.stop, list) else [self.stop]

    @property
    def new_tokens(self) -> int | None:
        """max_tokens by either name (None: not given)."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def check(self, limits: Limits) -> None:
        """The bounds that depend on the served model, or a BadRequest naming the field."""
        if self.model != limits.model:
            raise BadRequest("model", f"model must be {limits.model!r} (the served model), got {self.model!r}")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise BadRequest("max_completion_tokens", f"max_completion_tokens ({self.max_completion_tokens}) and "
                                                      f"max_tokens ({self.max_tokens}) differ: give one of them")
        length = (limits.max_seq_len, "the model's length")
        new_tokens = (limits.max_seq_len - 1, "the model's length less one prompt token")
        bounds = {"max_tokens": new_tokens, "max_completion_tokens": new_tokens,
                  "max_thinking_tokens": length, "num_waits": length, "min_thinking_tokens": length,
                  "n": (limits.max_rows, "the server's --max-rows"), "top_k": (limits.vocab, "the vocabulary size")}
        for name, (high, why) in bounds.items():
            if (value := getattr(self, name)) is not None and value > high:
                raise BadRequest(name, f"{name} must be at most {high} ({why}), got {value}")
        if self.top_k == 0:
            raise BadRequest("top_k", "top_k must be -1 (off) or an integer >= 1, got 0")
        if self.max_thinking_tokens is not None and (self.min_thinking_tokens or 0) > self.max_thinking_tokens:
            raise BadRequest("min_thinking_tokens", f"min_thinking_tokens ({self.min_thinking_tokens}) must be at "
                                                    f"most max_thinking_tokens ({self.max_thinking_tokens})")
        stops = self.stops
        if len(stops) > MAX_STOP:
            raise BadRequest("stop", f"stop holds {len(stops)} entries; at most {MAX_STOP}")
        for s in stops:
            bad_text = isinstance(s, str) and not 0 < len(s) <= MAX_STOP_CHARS
            if bad_text or isinstance(s, int) and not 0 <= s < limits.vocab:
                raise BadRequest("stop", f"stop entries must be non-empty strings of at most {MAX_STOP_CHARS} "
                                         f"characters or token ids in [0, {limits.vocab}), got {s!r:.60}")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options", "stream_options needs stream: true")


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] = Field(description="a non-empty string, or a list of token ids in [0, vocab), decoded "
                                    "as it is (budget forcing applies when a budget field is given)")

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if not self.prompt:
            raise BadRequest("prompt", "prompt is empty")
        if isinstance(self.prompt, list) and not all(0 <= t < limits.vocab for t in self.prompt):
            raise BadRequest("prompt", f"prompt must be a string or a list of token ids in [0, {limits.vocab})")


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"] = Field(description="system, user or assistant")
    content: str = Field(description="a string")


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="a non-empty list of {role: system, user or "
                                        "assistant, content: a string} objects, one of them from the user")

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if not any(m.role == "user" for m in self.messages):
            raise BadRequest("messages", "messages must hold a user message")


def parse(model: type[GenerationRequest], raw: bytes, limits: Limits) -> GenerationRequest:
    """The request in the JSON bytes ``raw``, checked against ``limits``; a BadRequest naming the field."""
    try:
        request = model.model_validate_json(raw)
    except ValidationError as e:
        raise _bad_request(model, e.errors(include_url=False)[0]) from None
    request.check(limits)
    return request


def _bad_request(model: type[BaseModel], error: dict) -> BadRequest:
    """The BadRequest of pydantic's first error: the field (with the index of a list entry), what it must be."""
    loc = error["loc"]
    if error["type"] == "json_invalid":
        return BadRequest("body", f"the request body is not valid JSON ({error['ctx']['error']})")
    if not loc:
        return BadRequest("body", "the request body must be a JSON object")
    index = next((f"[{x}]" for x in loc[1:] if isinstance(x, int)), "")
    param = f"{loc[0]}{index}"
    if error["type"] == "extra_forbidden":
        name = f"{param}.{loc[-1]}" if len(loc) > 1 else loc[-1]
        return BadRequest(param, f"Unrecognized request argument supplied: {name}")
    if error["type"] == "missing":
        return BadRequest(param, f"{param} is required: {model.model_fields[loc[0]].description}")
    given = json.dumps(error["input"]) if isinstance(error["input"], (int, float, str, bool)) else "another value"
    return BadRequest(param, f"{param} must be {model.model_fields[loc[0]].description}, got {given:.80}")


# --- responses -----------------------------------------------------------------------------------------------------
_omit_none = dict(default=None, exclude_if=lambda v: v is None)  # in the output only when set


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: dict[str, int] = Field(description="reasoning_tokens: the thinking's tokens")


class _Counts(BaseModel):
    """The budget-forcing counts of a finished choice (s1fast extension) and, with return_token_ids, its tokens and
    where its answer starts in them."""

    thinking_tokens: int | None = Field(**_omit_none)
    forced_waits: int | None = Field(**_omit_none)
    budget_cut: bool | None = Field(**_omit_none)
    token_ids: list[int] | None = Field(**_omit_none)
    answer_start: int | None = Field(**_omit_none, description="with return_token_ids, once thinking ended: the "
                                     "index in token_ids where the answer starts (s1fast extension)")


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="the answer")
    reasoning_content: str = Field(description="the thinking")


class ChatChoice(_Counts):
    index: int
    message: ChatMessageOut
    finish_reason: str


class _Head(BaseModel):
    id: str
    created: int
    model: str


class ChatCompletion(_Head):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(**_omit_none)
    content: str | None = Field(**_omit_none)
    reasoning_content: str | None = Field(**_omit_none)


class ChatChunkChoice(_Counts):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None


class ChatCompletionChunk(_Head):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(**_omit_none)


class CompletionChoice(_Counts):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(_Head):
    """A completion; streamed, each chunk is one of these with a piece of the text (usage in the last only)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = Field(**_omit_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "s1fast"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    error: dict[str, Any] = Field(description="message, type, param (the field), code")
