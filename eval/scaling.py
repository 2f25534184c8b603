"""``s1fast eval``: test-time scaling, s1's curve of accuracy against thinking tokens under budget forcing.

For every point of a sweep (``--budgets``: maximum thinking budgets; ``--waits``: numbers of forced "Wait"s),
every problem of a dataset is decoded with budget forcing, graded with math-verify and written to
``OUT/points/<point>.json``; reruns resume; ``OUT/results.json``, ``OUT/results.md`` and ``OUT/scaling.png`` are
rebuilt from every finished point. ``--samples N`` adds parallel scaling (pass@k, cons@k). With ``--endpoint URL``
(repeatable) instead of ``--model``, the decodes go to ``s1fast serve`` instances (one per GPU), the budget fields in
each request's body, and the point files are those of the local run (greedy decoding), timings aside.

This module is the command (its arguments, :class:`EvalConfig`, the checks before anything loads, the model and
the local decoder, or the client of the servers); the parts live beside it and are re-exported here: the run loop
(``eval.run``: :func:`run_points`, which takes any ``generate(point, problem_indices)`` callable, and the rows of
the local decoder, :func:`decode_batch`, or of the servers, :func:`endpoint_batch`), the point files and reports
(``eval.records``: :class:`SweepPoint`, :func:`sweep`, :func:`write_reports`), the numbers (``eval.metrics``:
:func:`parallel_metrics`, ...) and the figure (``eval.plots``). Entry point: :func:`evaluate` (an
:class:`EvalConfig`; ``main`` parses one from the command line).

    s1fast eval --model ckpt/ --problems eval/data/example_problems.jsonl --out runs/scaling \\
        --budgets 512 1024 2048 4096 --waits 0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from s1fast.client import add_client_arguments
from s1fast.commands import (
    AT_LEAST_0,
    COUNT,
    TEXT,
    THREADS,
    add_device_arguments,
    add_kv_cache_argument,
    budget_or_none,
    check_device,
    check_dtype,
    check_hub_model,
    check_kv_cache,
    check_kv_pages,
    check_model_dir,
    check_sampling,
    default_device,
    load_model,
    read_model_config,
    sigterm_as_interrupt,
)
from s1fast.eval.metrics import majority_correct, parallel_metrics, pass_at_k, sample_ks
from s1fast.eval.plots import plot
from s1fast.eval.problems import EXAMPLE_PROBLEMS, load_problems
from s1fast.eval.records import (
    SweepPoint,
    check_settings,
    exclusive,
    markdown_table,
    point_path,
    sweep,
    write_reports,
)
from s1fast.eval.run import decode_batch, endpoint_batch, run_points
from s1fast.model.chat import FORMAT_CHOICES, load_tokenizer, resolve_format

# the eval API, wherever each part lives
__all__ = ["EXAMPLE_PROBLEMS", "EvalConfig", "SweepPoint", "decode_batch", "endpoint_batch", "evaluate",
           "load_problems", "main", "majority_correct", "markdown_table", "parallel_metrics", "parse_args",
           "pass_at_k", "plot", "run_points", "sample_ks", "sweep", "write_reports"]

MAX_POINT_ROWS = 1_000_000  # decodes (problems x samples) of one point: each is a request held in memory
SAMPLED = {"temperature": 0.6, "top_p": 0.95}  # with --samples > 1, unless given: DeepSeek-R1's recommended sampling


@dataclass
class EvalConfig:
    model: str | None  # a local model, or None with endpoint
    problems: str
    out: str
    budgets: list  # ints, None = no cap
    waits: list
    tokenizer: str | None = None
    question_field: str | None = None  # None: found by name (s1fast.eval.problems)
    answer_field: str | None = None
    limit: int | None = None
    split: str = "test"
    max_rows: int = 16  # problems (samples) decoded at once
    max_new_tokens: int = 32768
    max_answer_tokens: int = 2048
    temperature: float | None = None  # None: 0 (greedy) for one sample, SAMPLED's for several
    top_k: int | None = None
    top_p: float | None = None  # None: no cut for one sample, SAMPLED's for several
    seed: int | None = 0
    samples: int = 1  # per problem and point: pass@1 is their mean; cons@k and pass@k over them
    choice_seed: int = 0  # shuffles GPQA's options
    dtype: str | None = None  # a key of commands.DTYPES; None: commands.default_dtype(device)
    device: str = field(default_factory=default_device)
    progress: bool = True
    s1_compat: bool = False  # BudgetForcing.s1_compat: s1's evaluation code, quirks included
    format: str = "s1"  # reasoning format (s1fast.model.chat.FORMAT_CHOICES)
    threads: int | None = None  # CPU threads (None: set_cpu_threads' default)
    kv_cache: dict = field(default_factory=dict)  # Decoder's KV budget (commands.kv_cache_budget); not a result setting
    # instead of model: s1fast serve instances (s1fast.client.Client's settings; none of them a result setting)
    endpoint: list = field(default_factory=list)
    model_name: str | None = None  # None: the first model the first endpoint lists
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 600.0
    retries: int = 5
    backoff: float = 1.0


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Run every missing point of the sweep and rebuild the reports; returns the point summaries.

    For every point of a sweep (a maximum thinking budget and a number of forced "Wait"s), every problem of a JSONL /
    parquet / Hugging Face dataset (MATH-500, AIME, GPQA Diamond: :mod:`s1fast.eval.problems`) is decoded ``--samples``
    times with budget forcing on ``--max-rows`` rows of one reused :class:`s1fast.decode.Decoder` (continuous batching),
    each answer is extracted and graded with math-verify (:mod:`s1fast.eval.grading`), and the point is written
    atomically to ``OUT/points/<point>.json`` with the settings it was computed with. A rerun with the same settings
    skips finished points, so a crashed or extended sweep only computes what is missing; a point file computed with
    other settings is refused, naming it and what differs (the model is known by its path: evaluate new weights saved
    over old ones in a new ``OUT``), as is a corrupt one.
    """
    if importlib.util.find_spec("matplotlib") is None:  # before hours of decoding, not after
        raise ImportError("s1fast eval draws scaling.png with matplotlib: pip install matplotlib")
    if importlib.util.find_spec("math_verify") is None:
        raise ImportError("s1fast eval grades answers with math-verify: pip install math-verify")
    COUNT.check("samples", cfg.samples)
    sampled = cfg.samples > 1
    temperature = cfg.temperature if cfg.temperature is not None else SAMPLED["temperature"] if sampled else 0.0
    top_p = cfg.top_p if cfg.top_p is not None else SAMPLED["top_p"] if sampled else None
    if sampled and temperature == 0:
        raise ValueError(f"samples: {cfg.samples} greedy samples (temperature 0) would all be the same; "
                         "give --temperature > 0 or leave it to the default")
    COUNT.check("max_rows", cfg.max_rows)
    if cfg.threads is not None:
        THREADS.check("threads", cfg.threads)
    check_sampling(max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_k=cfg.top_k, top_p=top_p,
                   seed=cfg.seed)
    device = check_device(cfg.device)
    check_kv_cache(cfg.kv_cache, device)
    dtype = check_dtype(cfg.dtype, device)
    COUNT.check("max_answer_tokens", cfg.max_answer_tokens)
    if (cfg.model is None) == (not cfg.endpoint):
        raise ValueError("give --model PATH (decode here) or --endpoint URL (s1fast serve instances), not both"
                         if cfg.endpoint else "give --model PATH or --endpoint URL")
    client = None
    if cfg.endpoint:
        client = _client(cfg)
        model = client.model  # the served model's name (recorded as the model)
    else:
        check_hub_model(cfg.model)  # a local directory, or a Hugging Face name the cache or the Hub knows
        if os.path.isdir(cfg.model):
            check_model_dir(cfg.model)
        check_kv_pages(cfg.kv_cache, read_model_config(cfg.model), dtype)
        model = cfg.model
    points = sweep(cfg.budgets, cfg.waits)
    problems = load_problems(cfg.problems, question_field=cfg.question_field, answer_field=cfg.answer_field,
                             limit=cfg.limit, split=cfg.split, choice_seed=cfg.choice_seed)
    if len(problems) * cfg.samples > MAX_POINT_ROWS:
        raise ValueError(f"samples: {cfg.samples:,} samples of {len(problems):,} problems are "
                         f"{len(problems) * cfg.samples:,} decodes per point, more than s1fast eval holds "
                         f"({MAX_POINT_ROWS:,}); lower --samples or --limit")
    def where(name: str | None) -> str | None:  # local paths absolute, so a rerun from elsewhere matches
        return os.path.abspath(name) if name is not None and os.path.exists(name) else name

    settings = {
        "model": where(model), "tokenizer": where(cfg.tokenizer), "problems": where(cfg.problems),
        "problems_sha256": hashlib.sha256(json.dumps(problems, sort_keys=True).encode()).hexdigest(),
        "num_problems": len(problems), "max_new_tokens": cfg.max_new_tokens,
        "max_answer_tokens": cfg.max_answer_tokens, "temperature": temperature, "top_k": cfg.top_k,
        "top_p": top_p, "seed": cfg.seed,  # dtype: float32, bfloat16, ...; the servers' as --dtype says, else None
        "dtype": str(dtype).removeprefix("torch.") if cfg.dtype is not None or client is None else None,
        "grader": f"math-verify {importlib.metadata.version('math-verify')}",
        **({"samples": cfg.samples} if sampled else {}),
        **({"s1_compat": True} if cfg.s1_compat else {}),  # absent when off: runs from before it still resume
        **({"format": cfg.format} if cfg.format != "s1" else {}),  # likewise
    }
    try:
        os.makedirs(os.path.join(cfg.out, "points"), exist_ok=True)
    except OSError as e:  # a file in the way, no permission: name the argument, not errno
        raise ValueError(f"--out {cfg.out!r}: cannot create the output directory ({e.strerror or e})") from e
    with exclusive(cfg.out):
        return _run(cfg, settings, points, problems, device, dtype, client)


def _client(cfg: EvalConfig):
    """The ``Client`` of ``cfg.endpoint``, its model name asked of the first endpoint unless given, or a one-line
    ValueError (a bad setting, a server that does not answer)."""
    from s1fast.client import Client  # its settings checked first thing

    if cfg.s1_compat:
        raise ValueError("--s1-compat: s1fast serve forces budgets its own way, not with s1's quirks; decode "
                         "locally with --model")
    client = Client(cfg.endpoint, model=cfg.model_name, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                    timeout=cfg.timeout, retries=cfg.retries, backoff=cfg.backoff)
    try:
        client.model  # noqa: B018  (asks the first endpoint now: a server that does not answer is one line)
    except Exception as e:  # noqa: BLE001  (any failure to reach the server is one line)
        raise ValueError(f"--endpoint {cfg.endpoint[0]}: cannot list its models ({type(e).__name__}: "
                         f"{str(e)[:200]}); check the server or give --model-name") from None
    return client


def _run(cfg: EvalConfig, settings: dict, points: list[SweepPoint], problems: list[dict], device: torch.device,
         dtype: torch.dtype, client=None) -> list[dict]:
    """``evaluate`` once ``cfg.out`` is held: check the finished points, decode the missing ones, report.

    Prompts are those of the reasoning format (``--format``, ``s1fast.model.chat``): s1's by default, the ChatML turns
    followed by ``<|im_start|>think``; ``r1`` / ``qwen3`` (the chat template, the \\boxed{} instruction, ``<think>\\n``)
    or ``auto`` (read from the tokenizer); budget cuts append the format's end of thinking. With ``client``
    (``--endpoint``), the same prompts' token ids go to the servers (:func:`endpoint_batch`), whose budget forcing is
    their own ``--format``'s: give the servers' format, and their tokenizer when the served model's name is not its
    directory.
    """
    from s1fast.decode import BudgetForcing, Decoder
    from s1fast.decode.decoder import set_cpu_threads
    from s1fast.env import environment

    check_settings(cfg.out, settings)
    pending = [p for p in points if not os.path.exists(point_path(cfg.out, p))]
    if len(pending) < len(points):
        print(f"s1fast eval: {len(points) - len(pending)} of {len(points)} points already in {cfg.out}, skipped")

    if pending:  # a first line at once: loading a large model takes a while
        backend = f"on {', '.join(cfg.endpoint)}" if client is not None else f"loading {cfg.model}"
        print(f"s1fast eval: {len(pending)} point(s) of {len(problems)} problem(s) x {settings.get('samples', 1)} "
              f"sample(s) to decode; {backend}", flush=True)
        tokenizer = load_tokenizer(settings["model"], cfg.tokenizer, cfg.format)
        fmt = resolve_format(cfg.format, tokenizer)
        prompts = [tokenizer(fmt.think_prompt(p["question"], tokenizer), add_special_tokens=False)["input_ids"]
                   for p in problems]
        stop_ids = fmt.stop_ids(tokenizer)
        base = BudgetForcing.from_tokenizer(tokenizer, s1_compat=cfg.s1_compat, format=fmt)  # before the weights
        room = base.longest_injection()  # the injected end of thinking (with s1's newline) on top of the budget
        sampling = {k: settings[k] for k in ("temperature", "top_k", "top_p")}

        def new_tokens(point: SweepPoint) -> int:
            if point.max_thinking_tokens is None:
                return cfg.max_new_tokens
            return min(cfg.max_new_tokens, point.max_thinking_tokens + room + cfg.max_answer_tokens)

        if client is not None:
            batch = partial(endpoint_batch, client)  # cfg.concurrency requests in flight over the endpoints
        else:
            model = load_model(cfg.model, dtype=dtype, device=device)
            note = set_cpu_threads(model, cfg.threads)
            if note:
                print(f"s1fast eval: {note}", file=sys.stderr)
            needed = max(map(len, prompts)) + max(map(new_tokens, pending))
            if needed > model.config.max_position_embeddings:  # rows that run so long would decode past them
                print(f"s1fast eval: warning: the longest prompt plus the tokens a point may decode (--max-new-tokens, "
                      f"or a budget plus --max-answer-tokens) is {needed:,} tokens, more than the model's "
                      f"{model.config.max_position_embeddings:,} positions (max_position_embeddings)", file=sys.stderr)
            # s1_compat decodes past the budget as s1 does, up to the model's length (vLLM's max_model_len)
            decoder = Decoder(
                model,
                max_seq_len=max(needed, model.config.max_position_embeddings) if cfg.s1_compat else needed,
                **cfg.kv_cache,
            )
            # cfg.max_rows rows, each refilled as soon as its row finishes
            batch = partial(decode_batch, decoder, max_rows=cfg.max_rows)

        def generate(point: SweepPoint, indices: list[int]) -> list[dict]:
            forcing = replace(base, max_thinking_tokens=point.max_thinking_tokens, num_waits=point.num_waits)
            return batch([prompts[i] for i in indices], forcing, max_new_tokens=new_tokens(point),
                         stop_token_ids=stop_ids, tokenizer=tokenizer, sampling={**sampling, "seed": cfg.seed})

        run_points(cfg.out, pending, problems, generate, max_new_tokens=new_tokens, settings=settings,
                   progress=cfg.progress)
    return write_reports(cfg.out, settings, {"endpoints": list(cfg.endpoint)} if client else environment(device))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="s1fast eval", description=__doc__.split("\n\n")[0],
                                epilog="example:\n" + __doc__.split("\n\n")[-1].rstrip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or Hugging Face name, decoded here (or --endpoint)")
    p.add_argument("--problems", required=True,
                   help=f"problems: .jsonl/.json/.parquet, or a dataset name; MATH-500, AIME and GPQA Diamond "
                        f"fields are recognised (samples of each: {os.path.dirname(EXAMPLE_PROBLEMS)})")
    p.add_argument("--out", type=TEXT, required=True, help="output directory (reruns resume in it)")
    p.add_argument("--budgets", nargs="+", type=budget_or_none, default=[],
                   help="maximum thinking tokens per point ('none' = no cap); default: no cap")
    p.add_argument("--waits", nargs="+", type=AT_LEAST_0, default=[],
                   help="numbers of forced 'Wait's when the model ends thinking early; default: 0")
    p.add_argument("--tokenizer", help="tokenizer path or name (default: the model's, else Qwen's)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="s1",
                   help="reasoning format: prompt and thinking delimiters (default: s1; auto: read from the tokenizer)")
    p.add_argument("--question-field", help="field of the question (default: question or problem, in any case)")
    p.add_argument("--answer-field", help="field of the answer (default: answer, in any case; GPQA's own fields)")
    p.add_argument("--choice-seed", type=int, default=0, help="seed of the shuffle of GPQA's options")
    p.add_argument("--limit", type=COUNT, help="use only the first N problems")
    p.add_argument("--split", default="test", help="split of a dataset given by name")
    p.add_argument("--max-rows", type=COUNT, default=16, help="problems (samples) decoded at once (default 16)")
    p.add_argument("--max-new-tokens", type=COUNT, default=32768,
                   help="cap on generated tokens (thinking, injected and answer) for every point")
    p.add_argument("--max-answer-tokens", type=COUNT, default=2048,
                   help="answer tokens allowed after a capped thinking budget")
    p.add_argument("--samples", type=COUNT, default=1,
                   help="samples per problem and point: accuracy is pass@1 (their mean), with cons@k (majority vote) "
                        "and pass@k for k = 1, 2, 4, ... N")
    p.add_argument(
        "--temperature",
        type=float,
        help=f"0 = greedy; default: 0 (as s1 evaluates) for one sample, {SAMPLED['temperature']} for several",
    )
    p.add_argument("--top-k", type=COUNT)
    p.add_argument("--top-p", type=float, help=f"default: none for one sample, {SAMPLED['top_p']} for several")
    p.add_argument("--seed", type=int, default=0)
    add_device_arguments(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--s1-compat", action="store_true",
                   help="budget forcing exactly as s1's evaluation code, its two quirks included (see the README)")
    p.add_argument(
        "--threads", type=THREADS, help="CPU threads (default on CPU: 1 for a model under 100M parameters)"
    )
    add_kv_cache_argument(p)
    g = p.add_argument_group("instead of --model: s1fast serve instances (one per GPU), each point's requests spread "
                             "over them with its budget fields; --dtype: the servers' (recorded), --tokenizer and "
                             "--format: theirs")
    add_client_arguments(g)
    return p


def parse_args(argv: list[str]) -> EvalConfig:
    return EvalConfig(**vars(_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    cfg = EvalConfig(**vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv))))
    try:
        with sigterm_as_interrupt():  # SIGTERM as Ctrl-C: temporary files are removed on the way out
            summaries = evaluate(cfg)
    except (ValueError, OSError, ImportError) as e:  # bad problems, model, tokenizer, settings or output directory
        parser.error(str(e))
    except KeyboardInterrupt:
        print(f"s1fast eval: interrupted; finished points are kept in {cfg.out}: rerun to resume", file=sys.stderr)
        return 130
    print(markdown_table(summaries), end="")
    print(f"s1fast eval: results in {os.path.join(cfg.out, 'results.json')}, results.md, scaling.png")
    return 0
