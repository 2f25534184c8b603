"""``s1fast eval``'s run loop: every pending point of a sweep decoded, graded (``metrics``) and written
(``records``). Decoding is a callable, ``generate(point, problem_indices) -> rows`` (one row per index, in order:
:func:`decode_batch`'s fields), so that the loop does not depend on where the model runs: the local decoder
(:func:`decode_batch` on a ``s1fast.decode.Decoder``), ``s1fast serve`` instances behind a client
(:func:`endpoint_batch`, ``s1fast eval --endpoint``) or any other backend that returns the same rows
(:func:`row_fields` makes one from a decode's tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from s1fast.eval.metrics import grade, point_result
from s1fast.eval.records import SweepPoint, write_point

Generate = Callable[[SweepPoint, list[int]], list[dict]]


def run_points(out: str, pending: list[SweepPoint], problems: list[dict], generate: Generate, *,
               max_new_tokens: Callable[[SweepPoint], int], settings: dict, progress: bool = True) -> None:
    """Decode, grade and write each point of ``pending`` in turn (a point's file appears once it is whole); each
    problem is decoded ``settings["samples"]`` times (1 when absent), its samples together; a progress bar counts
    the decodes, with the point's accuracy so far."""
    from tqdm.auto import tqdm

    samples = settings.get("samples", 1)
    order = [(i, s) for i in range(len(problems)) for s in range(samples)]  # each problem's samples together
    bar = tqdm(total=len(pending) * len(order), unit="sample" if samples > 1 else "problem", disable=not progress)
    for point in pending:
        bar.set_description(point.key)
        t0 = time.perf_counter()
        rows = generate(point, [i for i, _ in order])  # one engine run per point, its rows refilled as they finish
        elapsed = time.perf_counter() - t0
        records = grade(problems, order, rows)
        bar.update(len(rows))
        bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}")
        write_point(out, point, point_result(point, records, problems=len(problems), samples=samples,
                                             max_new_tokens=max_new_tokens(point), elapsed=elapsed,
                                             settings=settings))
    bar.close()


def decode_batch(decoder, prompts: list[list[int]], forcing, *, max_new_tokens: int, stop_token_ids: list[int],
                 tokenizer, sampling: dict, max_rows: int | None = None) -> list[dict]:
    """One budget-forced ``Decoder.generate`` call; per row: thinking tokens (the decoder's count: the model's
    plus injected waits), answer tokens (what the model wrote after the end-of-thinking text, stop token
    excluded), forced waits, whether the budget cut thinking / thinking ended at all, the full output text,
    and the answer text (None when thinking never ended).

    Thinking tokens are the decoder's count (the model's thinking plus injected "Wait"s); answer tokens are what the
    model wrote after the end-of-thinking text. The answer is extracted from the text after thinking, or from the whole
    output when thinking never ended (``--max-new-tokens`` hit first).
    """
    # continuous batching on max_rows rows (all at once by default); prompt i samples with seed + i
    from s1fast.decode.engine import Engine

    engine = Engine(decoder, max_rows=max_rows or len(prompts))
    seed = sampling.get("seed")
    for i, p in enumerate(prompts):
        engine.submit(p, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, budget=forcing,
                      **{**sampling, "seed": None if seed is None else seed + i})
    result = engine.run()
    return [row_fields(r.tokens, r.answer_start if r.thinking_ended else None, thinking_tokens=r.thinking_tokens,
                       forced_waits=r.forced_waits, budget_cut=r.budget_cut, finish_reason=r.finish_reason,
                       forcing=forcing, stop_token_ids=stop_token_ids, tokenizer=tokenizer) for r in result.rows]


def endpoint_batch(client, prompts: list[list[int]], forcing, *, max_new_tokens: int, stop_token_ids: list[int],
                   tokenizer, sampling: dict) -> list[dict]:
    """:func:`decode_batch`'s rows, decoded by ``s1fast serve`` instances behind ``client`` (an
    ``s1fast.client.Client``: its endpoints in turn, its concurrency, its retries): one ``/v1/completions`` request
    per prompt (its token ids), with the point's budget fields and ``return_token_ids`` in the body; prompt i
    samples with seed + i, as locally. The server's budget forcing is its own (its ``--format``'s). A request that
    fails every try raises a ValueError naming the server and the error (the point is not written)."""
    seed = sampling.get("seed")
    jobs = [(i, {"prompt": p, "seed": None if seed is None else seed + i}) for i, p in enumerate(prompts)]
    replies = dict(client.map(jobs, max_tokens=max_new_tokens, temperature=sampling.get("temperature"),
                              top_p=sampling.get("top_p"), top_k=sampling.get("top_k"),
                              max_thinking_tokens=forcing.max_thinking_tokens, num_waits=forcing.num_waits,
                              return_token_ids=True))
    rows = []
    for i in range(len(prompts)):
        reply = replies[i]
        if reply.error is not None:
            raise ValueError(f"--endpoint: {reply.error}")
        extra = reply.extra or {}
        if not isinstance(extra.get("token_ids"), list) or not {"thinking_tokens", "forced_waits", "budget_cut"} <= (
                extra.keys()):
            raise ValueError("--endpoint: the server returned no token_ids / thinking_tokens (fields of s1fast "
                             "serve's return_token_ids); s1fast eval --endpoint needs s1fast serve")
        rows.append(row_fields(extra["token_ids"], extra.get("answer_start"), thinking_tokens=extra["thinking_tokens"],
                               forced_waits=extra["forced_waits"], budget_cut=extra["budget_cut"],
                               finish_reason=reply.finish_reason, forcing=forcing, stop_token_ids=stop_token_ids,
                               tokenizer=tokenizer))
    return rows


def row_fields(tokens: list[int], answer_start: int | None, *, thinking_tokens: int, forced_waits: int,
               budget_cut: bool, finish_reason: str, forcing, stop_token_ids: list[int], tokenizer) -> dict:
    """One decode's row (:func:`decode_batch`'s fields) from its tokens and where its answer starts (None when
    thinking never ended), whichever backend decoded it."""
    # the decoder's answer starts after `<|im_start|>answer`; when the budget cut thinking, the rest of the
    # injected budget_end ("\nFinal Answer:") comes first and is not the model's (s1_compat can end a cut with
    # the bare delimiter instead, as s1 does); when budget_end does not start with the delimiter, the decoder
    # starts the answer after the whole budget_end
    starts = tuple(forcing.budget_end[: len(forcing.end_think)]) == tuple(forcing.end_think)
    forced_tail = list(forcing.budget_end[len(forcing.end_think) :]) if starts else []
    ended = answer_start is not None
    answer = tokens[answer_start:] if ended else []
    own = answer[:-1] if answer and answer[-1] in stop_token_ids else answer
    forced_prefix = len(forced_tail) if budget_cut and answer[: len(forced_tail)] == forced_tail else 0
    return {
        "thinking_tokens": thinking_tokens,
        "answer_tokens": max(0, len(own) - forced_prefix),
        "forced_waits": forced_waits,
        "budget_cut": budget_cut,
        "thinking_ended": ended,
        "finish_reason": finish_reason,
        "output": tokenizer.decode(tokens, skip_special_tokens=False),
        "answer_text": tokenizer.decode(answer, skip_special_tokens=True) if ended else None,
    }
