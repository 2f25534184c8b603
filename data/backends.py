"""Where ``distill`` and ``attempt`` get their answers: OpenAI-compatible servers (:class:`s1fast.client.Client`) or a
local model directory decoded by s1fast's request engine (:class:`LocalModel`). Both turn questions into
:class:`s1fast.client.Reply` objects, ``(key, reply)`` as each finishes, so a stage writes every answer the moment
it exists."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator

from s1fast.client import Client, Reply

DEFAULT_MAX_TOKENS = 32768  # new tokens per answer: s1's distillation and attempts


def ask_endpoints(client: Client, questions: dict, *, max_tokens: int | None, temperature: float,
                  seed: int | None = None, max_thinking_tokens: int | None = None,
                  num_waits: int | None = None) -> Iterator[tuple]:
    """``(key, Reply)`` for ``questions`` (key -> question text) asked as one user message each, with the seed
    :func:`request_seed` and ``max_tokens`` (None: ``DEFAULT_MAX_TOKENS``); budget forcing fields go in the body
    (``s1fast serve`` reads them, other servers ignore or refuse them: leave them unset there)."""
    jobs = ((key, {"messages": [{"role": "user", "content": text}], "seed": request_seed(seed, key)})
            for key, text in questions.items())
    yield from client.map(jobs, max_tokens=max_tokens or DEFAULT_MAX_TOKENS, temperature=temperature,
                          max_thinking_tokens=max_thinking_tokens, num_waits=num_waits)


def request_seed(seed: int | None, key) -> int | None:
    """The seed of one request: ``seed`` mixed with the request's key (question id, sample), so that no two
    requests share their sampling noise (s1fast's engine draws it from the seed, the position and the token, so
    equal seeds would sample different questions alike); None without a seed."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key!r}".encode()).digest()[:6], "big")


class LocalModel:
    """A local model directory served in this process: ``s1fast.decode``'s ``Decoder`` and ``Engine`` (continuous
    batching over ``max_rows`` rows) with budget forcing in the model's reasoning format."""

    def __init__(self, path: str, *, format: str = "s1", device: str = "cpu", dtype=None, max_rows: int = 16,
                 max_thinking_tokens: int | None = None, num_waits: int = 0):
        from s1fast.commands import load_model
        from s1fast.decode import BudgetForcing, Decoder, Engine
        from s1fast.decode.decoder import set_cpu_threads
        from s1fast.model.chat import load_tokenizer, resolve_format

        self.tokenizer = load_tokenizer(path, None, format)
        self.fmt = resolve_format(format, self.tokenizer)
        self.stop_ids = self.fmt.stop_ids(self.tokenizer)
        self.budget = BudgetForcing.from_tokenizer(self.tokenizer, max_thinking_tokens=max_thinking_tokens,
                                                   num_waits=num_waits, format=self.fmt)
        model = load_model(path, dtype=dtype, device=device)
        set_cpu_threads(model)
        self.engine = Engine(Decoder(model, tokenizer=self.tokenizer), max_rows=max_rows)

    def ask(self, questions: dict, *, max_tokens: int | None, temperature: float, seed: int | None = None,
            **_) -> Iterator[tuple]:
        """``(key, Reply)`` as each request finishes (the engine's loop runs on a thread; requests are posted
        to it and their results come back through a queue). ``max_tokens`` None: ``DEFAULT_MAX_TOKENS``, or what the
        model's positions leave after the question when that is less."""
        done: queue.Queue = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(target=self.engine.loop, args=(stop,), name="s1fast-data-engine", daemon=True)
        worker.start()
        try:
            for key, text in questions.items():
                ids = self.tokenizer(self.fmt.think_prompt(text, self.tokenizer), add_special_tokens=False)["input_ids"]
                room = self.engine.decoder.max_seq_len - len(ids)
                try:
                    self.engine.post(ids, on_tokens=lambda new, state: None,
                                     on_done=lambda row, key=key: done.put((key, row)),
                                     max_new_tokens=max_tokens or max(1, min(DEFAULT_MAX_TOKENS, room)),
                                     temperature=temperature, top_k=None, top_p=None,
                                     seed=request_seed(seed, key),
                                     stop_token_ids=self.stop_ids, budget=self.budget)
                except ValueError as e:  # e.g. prompt + max_tokens longer than the model's positions
                    done.put((key, str(e)))
            for _ in questions:
                key, row = done.get()
                if row is None or isinstance(row, str):
                    yield key, Reply(error=row or "the local engine failed", tries=1)
                    continue
                yield key, Reply(thinking=row.thinking, answer=row.answer, tokens=len(row.tokens),
                                 reasoning_tokens=row.thinking_tokens, finish_reason=row.finish_reason,
                                 source="engine", tries=1)
        finally:
            stop.set()
            worker.join()
