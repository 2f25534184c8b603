"""``s1fast eval``'s run loop: every pending point of a sweep decoded, graded (``metrics``) and written
(``records``). Decoding is a callable, ``generate(point, problem_indices) -> rows`` (one row per index, in order:
:func:`decode_batch`'s fields), so that the loop does not depend on where the model runs: the local decoder
(:func:`decode_batch` on a ``s1fast.decode.Decoder``) or any other backend that returns the same rows.
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
    # the decoder's answer starts after `<|im_start|>answer`; when the budget cut thinking, the rest of the
    # injected budget_end ("\nFinal Answer:") comes first and is not the model's (s1_compat can end a cut with
    # the bare delimiter instead, as s1 does); when budget_end does not start with the delimiter, the decoder
    # starts the answer after the whole budget_end
    starts = tuple(forcing.budget_end[: len(forcing.end_think)]) == tuple(forcing.end_think)
    forced_tail = list(forcing.budget_end[len(forcing.end_think) :]) if starts else []
    rows = []
    for r in result.rows:
        answer = r.tokens[r.answer_start :] if r.thinking_ended else []
        own = answer[:-1] if answer and answer[-1] in stop_token_ids else answer
        forced_prefix = len(forced_tail) if r.budget_cut and answer[: len(forced_tail)] == forced_tail else 0
        rows.append({
            "thinking_tokens": r.thinking_tokens,
            "answer_tokens": max(0, len(own) - forced_prefix),
            "forced_waits": r.forced_waits,
            "budget_cut": r.budget_cut,
            "thinking_ended": r.thinking_ended,
            "finish_reason": r.finish_reason,
            "output": tokenizer.decode(r.tokens, skip_special_tokens=False),
            "answer_text": tokenizer.decode(answer, skip_special_tokens=True) if r.thinking_ended else None,
        })
    return rows
