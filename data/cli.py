"""``s1fast data``: the s1K curation pipeline, one stage per subcommand, all working in one directory (``--out``).

    s1fast data collect  --out DIR --pool math=pool.jsonl --pool olympiad=more.parquet
    s1fast data distill  --out DIR --endpoint http://gpu0:8000/v1 --endpoint http://gpu1:8000/v1 --concurrency 32
    s1fast data attempt  --out DIR --name qwen7b --endpoint http://gpu2:8000/v1      (once per student)
    s1fast data classify --out DIR --endpoint http://gpu3:8000/v1                    (or --field domain)
    s1fast data select   --out DIR --size 1000 --high-quality aime --high-quality gpqa
    s1fast train --data DIR

Files in DIR: ``questions.jsonl`` and ``collect_report.json`` (collect); ``distill.jsonl``, ``attempt.jsonl``,
``classify.jsonl`` (records keyed by the question's id, appended and fsynced one by one, so a rerun after a crash or
``kill -9`` asks only what is not finished; failed requests are recorded with their error and asked again on the
next run; what the answers depend on is kept in ``<stage>.settings.json``, and a rerun that changes it is refused);
``s1k.jsonl`` (s1K's columns) with ``s1k_report.json`` / ``.md`` / ``.png`` (select; an ablation
``--method M`` writes ``s1k_M.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

from s1fast.client import add_client_arguments
from s1fast.commands import (
    AT_LEAST_0,
    COUNT,
    NON_NEGATIVE,
    add_device_arguments,
    check_device,
    check_dtype,
    check_model_dir,
    read_model_config,
    sigterm_as_interrupt,
)
from s1fast.data.backends import DEFAULT_MAX_TOKENS
from s1fast.data.select import METHODS
from s1fast.data.store import Records
from s1fast.files import write_atomic
from s1fast.model.chat import FORMAT_CHOICES
from s1fast.train.data import CURATED_FILE

QUESTIONS, DISTILL, ATTEMPT, CLASSIFY = "questions.jsonl", "distill.jsonl", "attempt.jsonl", "classify.jsonl"


def _client_arguments(p, local: str | None) -> None:
    g = p.add_argument_group("model: OpenAI-compatible servers" + (f" or a local model ({local})" if local else ""))
    add_client_arguments(g)
    if local:
        g.add_argument(f"--{local}", metavar="PATH", help="local model directory decoded by s1fast's engine")
        g.add_argument("--format", choices=FORMAT_CHOICES, default="s1",
                       help="the local model's reasoning format (default: s1)")
        g.add_argument("--max-rows", type=COUNT, default=16, help="local: requests decoded at once (default: 16)")
        add_device_arguments(g)


def _generation_arguments(p) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=COUNT,
                   help=f"new tokens per answer (default: {DEFAULT_MAX_TOKENS}, s1's; a local model: at most what its "
                        "positions leave after the question)")
    g.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="default: %(default)s")
    g.add_argument("--seed", type=int, help="sampling seed (each request samples with a seed made of it, the question "
                   "and the sample)")
    g.add_argument("--max-thinking-tokens", type=AT_LEAST_0, help="budget forcing (s1fast serve and local models only)")
    g.add_argument("--num-waits", type=AT_LEAST_0,
                   help="budget forcing: forced 'Wait's (s1fast serve and local models)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="s1fast data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    c = sub.add_parser("collect", allow_abbrev=False,
                       help="read, normalise, deduplicate and decontaminate question pools")
    c.add_argument("--pool", action="append", required=True, metavar="[NAME=]PATH",
                   help="a question pool (.jsonl/.json/.parquet or a dataset name), its source named NAME "
                        "(default: the file name); repeatable")
    c.add_argument("--eval-set", action="append", metavar="NAME|PATH",
                   help="an evaluation set to decontaminate against (math500, aime2024, aime2025, gpqa_diamond: the "
                        "bundled samples; or a file or dataset name); repeatable (default: math500 aime2024 "
                        "gpqa_diamond)")
    c.add_argument("--near-dup", type=float, default=0.8,
                   help="8-gram Jaccard similarity at which a question is a near duplicate (default: %(default)s)")
    c.add_argument("--question-field", help="the pools' question field (default: found as s1fast eval does)")
    c.add_argument("--answer-field", help="the pools' answer field")
    for name, helptext in (("distill", "a teacher's reasoning trace and answer per question"),
                           ("attempt", "a student attempts every question; graded with math-verify")):
        s = sub.add_parser(name, allow_abbrev=False, help=helptext)
        _client_arguments(s, "teacher" if name == "distill" else "student")
        _generation_arguments(s)
        s.add_argument("--name", help=f"the {'teacher' if name == 'distill' else 'student'}'s name in the records "
                       "(default: the model name)")
        if name == "distill":
            s.add_argument("--samples", type=COUNT, default=1, help="traces per question (default: 1)")
    k = sub.add_parser("classify", allow_abbrev=False,
                       help="a domain per question: a field, or a model with the MSC 2020 rubric")
    k.add_argument("--field", help="take the domain from this field of the pools")
    _client_arguments(k, None)
    k.add_argument("--tries", type=COUNT, default=3, help="requests per question before 'unknown' (default: 3)")
    k.add_argument("--max-tokens", type=COUNT, default=4096, help="new tokens per reply (default: %(default)s)")
    s = sub.add_parser("select", allow_abbrev=False,
                       help="s1's quality / difficulty / diversity selection, or an ablation")
    s.add_argument("--method", choices=METHODS, default="s1",
                   help="s1 (default) or the paper's ablations")
    s.add_argument("--size", type=COUNT, default=1000, help="questions to select (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    s.add_argument("--no-quality", action="store_true",
                   help="skip the formatting checks (failed requests and missing traces are always removed)")
    s.add_argument("--no-difficulty", action="store_true", help="skip the difficulty filter (method s1)")
    s.add_argument("--high-quality", action="append", default=[], metavar="SOURCE[:MIN_TOKENS]",
                   help="select the teacher-correct questions of SOURCE first (with at least MIN_TOKENS of "
                        "thinking); repeatable")
    s.add_argument("--students", help="comma-separated student names for the difficulty filter (default: all)")
    for q in sub.choices.values():
        q.add_argument("--out", required=True, metavar="DIR", help="the pipeline's directory")
        q.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        q.set_defaults(parser=q)  # errors name the stage: `s1fast data distill: error: ...`
    return p


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return STAGES[args.stage](args, args.parser)
    except KeyboardInterrupt:
        print(f"s1fast data {args.stage}: interrupted; finished records are kept, rerun to continue", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------------ collect


def _pools(values: list[str]) -> list[tuple[str, str]]:
    pools = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or os.path.exists(value):
            name, path = os.path.splitext(os.path.basename(value))[0], value
        if not name or not path:
            raise ValueError(f"--pool {value!r}: expected [NAME=]PATH")
        pools.append((name, path))
    return pools


def collect_stage(args, parser) -> int:
    from s1fast.data.collect import DEFAULT_EVAL_SETS, collect

    try:
        pools = _pools(args.pool)
        _check_dir(args.out, create=True)
        kept, report = collect(pools, eval_sets=args.eval_set or list(DEFAULT_EVAL_SETS), near_dup=args.near_dup,
                               question_field=args.question_field, answer_field=args.answer_field)
        os.makedirs(args.out, exist_ok=True)  # with its parents
    except (ValueError, OSError, ImportError) as e:
        parser.error(str(e))
    write_atomic(os.path.join(args.out, QUESTIONS), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    write_atomic(os.path.join(args.out, "collect_report.json"), json.dumps(report, indent=1) + "\n")
    print(f"{'source':<24}{'read':>8}{'contaminated':>14}{'duplicate':>11}{'near dup':>10}{'kept':>8}")
    for source, c in report["sources"].items():
        print(f"{source:<24}{c['read']:>8}{c['contaminated']:>14}{c['duplicate']:>11}{c['near_duplicate']:>10}"
              f"{c['kept']:>8}")
    print(f"{len(kept)} questions -> {os.path.join(args.out, QUESTIONS)}")
    return 0


def _check_dir(path: str, create: bool = False) -> None:
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"--out {path!r}: no permission to write there")
        return
    if os.path.exists(path):
        raise ValueError(f"--out {path!r} is a file; give a directory")
    if not create:
        raise ValueError(f"--out {path!r} does not exist; run `s1fast data collect --out {path}` first")


def _questions(args, parser) -> dict[str, dict]:
    """The collected questions by id, or the stage's one-line error when there are none."""
    try:
        _check_dir(args.out)
        path = os.path.join(args.out, QUESTIONS)
        if not os.path.exists(path):
            raise ValueError(f"--out {args.out!r} holds no {QUESTIONS}; run `s1fast data collect --out {args.out}` "
                             "first")
        return {q["id"]: q for q in Records(path).values()}
    except ValueError as e:
        parser.error(str(e))


# ------------------------------------------------------------------------------------------- distill, attempt


def _writer(path: str, key: tuple[str, ...], parser) -> Records:
    """The stage's record file, locked against a second run writing it, or the stage's one-line error."""
    try:
        records = Records(path, key=key)
        records.lock()
        return records
    except ValueError as e:
        parser.error(str(e))


def _backend(args, parser, local: str | None):
    """(the stage's model's name, ``load``), every argument checked before anything loads or is sent; ``load()``
    loads a local model and gives (ask function, the local model's reasoning format or None)."""
    from s1fast.client import Client, check_client_settings

    path = getattr(args, local, None) if local else None
    try:
        if path is not None:
            if args.endpoint:
                raise ValueError(f"give --endpoint or --{local}, not both")
            check_model_dir(path, f"--{local}")
            positions = read_model_config(path, f"--{local}").max_position_embeddings  # before the weights load
            if args.max_tokens is not None and args.max_tokens >= positions:
                raise ValueError(f"--max-tokens {args.max_tokens}: the model has {positions} positions, which must "
                                 "hold the question too; lower it")
            device = check_device(args.device)
            dtype = check_dtype(args.dtype, device)
        elif not args.endpoint:
            raise ValueError("give --endpoint URL" + (f" or --{local} PATH" if local else ""))
        else:
            check_client_settings(args.endpoint, concurrency=args.concurrency, timeout=args.timeout,
                                  retries=args.retries, backoff=args.backoff)
    except ValueError as e:
        parser.error(str(e))
    if path is not None:

        def load():
            from s1fast.data.backends import LocalModel

            try:
                model = LocalModel(path, format=args.format, device=device, dtype=dtype, max_rows=args.max_rows,
                                   max_thinking_tokens=args.max_thinking_tokens, num_waits=args.num_waits or 0)
            except (ValueError, OSError, TypeError) as e:
                parser.error(str(e))
            return model.ask, model.fmt.name

        return os.path.basename(os.path.normpath(path)), load
    from s1fast.data.backends import ask_endpoints

    client = Client(args.endpoint, model=args.model_name, api_key_env=args.api_key_env,
                    concurrency=args.concurrency, timeout=args.timeout, retries=args.retries, backoff=args.backoff)
    try:
        name = client.model
    except Exception as e:  # noqa: BLE001  (any failure to reach the server is one line)
        parser.error(f"--endpoint {args.endpoint[0]}: cannot list its models ({type(e).__name__}: {e}); "
                     "give --model-name or check the server")
    return name, lambda: ((lambda questions, **kw: ask_endpoints(client, questions, **kw)), None)


def _settings(records: Records, maker: str, made: bool, parser, **settings) -> None:
    """``Records.check_settings``, or the stage's one-line error."""
    try:
        records.check_settings(maker, settings, made)
    except ValueError as e:
        parser.error(str(e))


def _generation_settings(args, local: str, model_name: str) -> dict:
    """What a distill or attempt answer depends on, not where or how fast it is asked: the model (a local one by its
    full path) and the generation settings; ``max_tokens`` None: a local model's room after each question."""
    path = getattr(args, local)
    return {"model": os.path.abspath(path) if path else model_name,
            "max_tokens": args.max_tokens or (None if path else DEFAULT_MAX_TOKENS), "temperature": args.temperature,
            "seed": args.seed, "max_thinking_tokens": args.max_thinking_tokens, "num_waits": args.num_waits,
            "format": args.format if path else None}


def _run(records: Records, todo: dict, ask, make, args, what: str) -> int:
    """Ask ``todo`` (key -> question text), write ``make(key, reply)`` for each answer as it comes; a progress bar
    with questions and tokens/s. Returns how many failed."""
    from tqdm import tqdm

    failed = tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="q", desc=what, file=sys.stderr, dynamic_ncols=True, disable=not args.progress)
    try:
        with sigterm_as_interrupt():
            for key, reply in ask(todo, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                  max_thinking_tokens=args.max_thinking_tokens, num_waits=args.num_waits):
                records.add(make(key, reply))
                failed += reply.error is not None
                tokens += reply.tokens or 0
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}", failed=failed, refresh=False)
                bar.update()
    finally:
        bar.close()
    return failed


def _grade(reply, question: dict) -> tuple[str | None, bool]:
    from s1fast.eval.grading import grade

    if reply.error is not None or not reply.answer:
        return None, False
    return grade(reply.answer, question["answer"], choices=question.get("choices"))


def distill_stage(args, parser) -> int:
    questions = _questions(args, parser)
    model_name, load = _backend(args, parser, "teacher")
    teacher = args.name or model_name
    with _writer(os.path.join(args.out, DISTILL), ("id", "sample"), parser) as records:  # locked until the stage ends
        _settings(records, "teacher", any(r["error"] is None for r in records.values()), parser, teacher=teacher,
                  **_generation_settings(args, "teacher", model_name))
        ask, local_format = load()
        done = {k for k, r in records.latest.items() if r["error"] is None}
        todo = {(i, s): q["question"] for i, q in questions.items() for s in range(args.samples) if (i, s) not in done}
        print(f"distill: {len(todo)} request(s) to send, {len(done)} finished before", file=sys.stderr)

        def make(key, reply):
            predicted, correct = _grade(reply, questions[key[0]])
            fmt = "r1" if reply.source == "think_tags" else local_format or "s1"
            return {"id": key[0], "sample": key[1], "teacher": teacher, "thinking": reply.thinking,
                    "answer": reply.answer, "tokens": reply.tokens,
                    "thinking_tokens": reply.reasoning_tokens if reply.reasoning_tokens is not None else reply.tokens,
                    "finish_reason": reply.finish_reason, "format": fmt, "predicted": predicted, "correct": correct,
                    "tries": reply.tries, "error": reply.error}

        failed = _run(records, todo, ask, make, args, "distill")
        print(f"distill: {len(todo) - failed} done, {failed} failed (recorded; rerun to ask them again) -> "
              f"{os.path.join(args.out, DISTILL)}")
    return 0


def attempt_stage(args, parser) -> int:
    questions = _questions(args, parser)
    model_name, load = _backend(args, parser, "student")
    student = args.name or model_name
    with _writer(os.path.join(args.out, ATTEMPT), ("id", "student"), parser) as records:  # locked until the stage ends
        made = any(r["student"] == student and r["error"] is None for r in records.values())
        _settings(records, student, made, parser, **_generation_settings(args, "student", model_name))
        ask, _ = load()
        todo = {(i, student): q["question"] for i, q in questions.items()
                if (r := records.get(i, student)) is None or r["error"] is not None}
        print(f"attempt ({student}): {len(todo)} question(s) to ask", file=sys.stderr)

        def make(key, reply):
            predicted, correct = _grade(reply, questions[key[0]])
            return {"id": key[0], "student": student, "answer": reply.answer, "tokens": reply.tokens,
                    "thinking_tokens": reply.reasoning_tokens, "predicted": predicted, "correct": correct,
                    "tries": reply.tries, "error": reply.error}

        failed = _run(records, todo, ask, make, args, f"attempt {student}")
        solved = sum(bool((r := records.get(i, student)) and r["correct"]) for i in questions)
        print(f"attempt ({student}): {solved} of {len(questions)} solved, {failed} failed -> "
              f"{os.path.join(args.out, ATTEMPT)}")
    return 0


# ----------------------------------------------------------------------------------------------------- classify


def classify_stage(args, parser) -> int:
    from s1fast.data.classify import UNKNOWN, field_domain, parse_domain, rubric

    if args.field is not None and args.endpoint:
        parser.error("give --field or --endpoint, not both")
    questions = _questions(args, parser)
    with _writer(os.path.join(args.out, CLASSIFY), ("id",), parser) as records:  # locked until the stage ends
        todo = {i: q for i, q in questions.items() if not records.has(i)}
        made = bool(records.latest)
        if args.field is not None:
            _settings(records, "classifier", made, parser, field=args.field)
            for i, q in todo.items():
                records.add({"id": i, "domain": field_domain(q, args.field), "how": f"field {args.field}"})
        elif todo:
            name, load = _backend(args, parser, None)
            _settings(records, "classifier", made, parser, model=name, max_tokens=args.max_tokens)
            ask, _ = load()
            for attempt in range(1, args.tries + 1):  # the lock is held across the tries
                for i, reply in ask({i: rubric(q["question"]) for i, q in todo.items()}, max_tokens=args.max_tokens,
                                    temperature=0.0 if attempt == 1 else 0.7, seed=attempt):
                    domain = parse_domain(reply.answer) or parse_domain(reply.thinking)
                    if domain is not None or attempt == args.tries:  # written as it arrives: a crash keeps it
                        records.add({"id": i, "domain": domain or UNKNOWN, "how": "model", "tries": attempt,
                                     "reply": (reply.answer or reply.error or "")[-500:]})
                        del todo[i]
                if not todo:
                    break
        counts = Counter(records.get(i)["domain"] for i in questions if records.has(i))
        print(f"classify: {len(counts)} domain(s): " + ", ".join(f"{d} {n}" for d, n in counts.most_common()))
    return 0


# ------------------------------------------------------------------------------------------------------ select


def select_stage(args, parser) -> int:
    from s1fast.data.report import write_report
    from s1fast.data.select import Item, formatting_problems, select

    questions = _questions(args, parser).values()
    try:
        high_quality = {}
        for value in args.high_quality:
            source, _, minimum = value.partition(":")
            if not source or (minimum and not minimum.isdigit()):
                raise ValueError(f"--high-quality {value!r}: expected SOURCE or SOURCE:MIN_TOKENS")
            high_quality[source] = int(minimum or 0)
        distill = Records(os.path.join(args.out, DISTILL), key=("id", "sample"))
        if not distill.latest:
            raise ValueError(f"--out {args.out!r} holds no distilled traces; run `s1fast data distill` first")
        attempts = Records(os.path.join(args.out, ATTEMPT), key=("id", "student"))
        domains = Records(os.path.join(args.out, CLASSIFY))
        students = sorted({r["student"] for r in attempts.values()})
        if args.students:
            wanted = [s.strip() for s in args.students.split(",") if s.strip()]
            missing = sorted(set(wanted) - set(students))
            if missing:
                raise ValueError(f"--students: no attempts by {missing} in {ATTEMPT} (students there: {students})")
            students = wanted
    except ValueError as e:
        parser.error(str(e))
    traces = {}
    for r in sorted(distill.values(), key=lambda r: r["sample"]):  # a question's first trace without an error
        if r["id"] not in traces or (traces[r["id"]]["error"] is not None and r["error"] is None):
            traces[r["id"]] = r
    items, rows = [], {}
    for q in questions:
        t = traces.get(q["id"])
        problems = ["error"] if t is None or t["error"] is not None else []
        if not problems and not ((t["thinking"] or "").strip() and (t["answer"] or "").strip()):
            problems.append("missing_fields")
        problems += formatting_problems(q["question"])
        by = {s: attempts.get(q["id"], s) for s in students}
        domain = (domains.get(q["id"]) or {}).get("domain", "unknown")
        items.append(Item(id=q["id"], source=q["source"], domain=domain, length=(t or {}).get("thinking_tokens") or 0,
                          teacher_correct=bool(t and t["correct"]),
                          solved_by=[s for s, r in by.items() if r and r["error"] is None and r["correct"]],
                          unattempted_by=[s for s, r in by.items() if r is None or r["error"] is not None],
                          problems=problems))
        rows[q["id"]] = (q, t, by, domain)
    chosen, counts = select(items, method=args.method, size=args.size, seed=args.seed, quality=not args.no_quality,
                            difficulty=not args.no_difficulty, high_quality=high_quality)
    stem = CURATED_FILE.removesuffix(".jsonl") + ("" if args.method == "s1" else f"_{args.method}")
    out = []
    for i in chosen:
        q, t, by, domain = rows[i]
        meta = {**q["metadata"], "id": i, "answer": q["answer"], "domain": domain, "teacher": t["teacher"],
                "teacher_format": t["format"], "teacher_correct": t["correct"], "thinking_tokens": t["thinking_tokens"],
                "students": {s: r["correct"] if r else None for s, r in by.items()}}
        out.append({"question": q["question"], "solution": q["solution"], "cot_type": q["cot_type"],
                    "source_type": q["source"], "metadata": json.dumps(meta, ensure_ascii=False), "cot": None,
                    "thinking_trajectories": [t["thinking"]], "attempt": t["answer"]})
    path = os.path.join(args.out, f"{stem}.jsonl")
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    formats = Counter(rows[i][1]["format"] for i in chosen)
    report = write_report(os.path.join(args.out, stem), args, counts, items, chosen, students, formats)
    print(report)
    fmt = formats.most_common(1)[0][0] if formats else "s1"
    flag = f" --format {fmt}" if fmt != "s1" else ""
    print(f"{len(out)} examples -> {path}\ntrain: s1fast train --data {path}{flag}")
    return 0


STAGES = {"collect": collect_stage, "distill": distill_stage, "attempt": attempt_stage, "classify": classify_stage,
          "select": select_stage}
