"""``s1fast data`` on CPU with real HTTP on loopback: a tiny teacher served by ``s1fast serve`` (a subprocess: the
server is used over HTTP only), a stand-in server that answers 429 / 500 / hangs / malformed JSON when told to,
8-gram decontamination, ``kill -9`` in the middle of ``distill``, and ``select`` replayed step by step."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("math_verify")

from s1fast.client import MAX_RETRY_AFTER_S, Client, retry_after, split_thinking  # noqa: E402
from s1fast.data.classify import domains, parse_domain  # noqa: E402
from s1fast.data.cli import main  # noqa: E402
from s1fast.data.collect import collect  # noqa: E402
from s1fast.data.select import Item, diversity_draw, formatting_problems, select  # noqa: E402
from s1fast.data.store import Records, question_id  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


# ------------------------------------------------------------------------------------------ the stand-in server


class StandIn:
    """An OpenAI-compatible stand-in on a free loopback port. ``script[question]`` lists what the successive
    requests of that question get: ``429`` (Retry-After: ``retry_after``), ``500``, ``hang`` (no reply for 3 s),
    ``malformed`` (a 200 whose body is cut JSON), ``400``; then ``ok``: ``content(question)``, by default thinking
    in ``<think>`` tags and the answer ``Answer: 42``. Every request is logged as (time, question, action)."""

    def __init__(self, script=None, delay: float = 0.0, retry_after: str = "1", content=None):
        self.script, self.delay, self.retry_after = dict(script or {}), delay, retry_after
        self.content = content or (lambda q: f"<think>\nthinking about: {q}\n</think>\n\nAnswer: 42")
        self.log: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body: bytes, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                models = {"object": "list", "data": [{"id": "stand-in", "object": "model"}]}
                self.reply(200, json.dumps(models).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][-1]["content"]
                with standin.lock:
                    steps = standin.script.get(question, [])
                    action = steps.pop(0) if steps else "ok"
                    standin.log.append((time.monotonic(), question, action))
                time.sleep(standin.delay)
                if action == "429":
                    wait = [("Retry-After", standin.retry_after)]
                    return self.reply(429, b'{"error": {"message": "slow down"}}', wait)
                if action in ("500", "400"):
                    return self.reply(int(action), b'{"error": {"message": "no"}}')
                if action == "hang":
                    time.sleep(3)
                    return
                if action == "malformed":
                    return self.reply(200, b'{"id": "x", "choices": [{"message": ')
                content = standin.content(question)
                self.reply(200, json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": "stand-in",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}}).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def asked(self, action: str | None = None) -> Counter:
        return Counter(q for _, q, a in self.log if action is None or a == action)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin():
    servers = []
    yield lambda **kw: servers.append(StandIn(**kw)) or servers[-1]
    for s in servers:
        s.close()


def pipeline_dir(tmp_path, questions: list[str], answers=None) -> str:
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"question": q, "answer": a} for q, a in
                                                 zip(questions, answers or ["42"] * len(questions))])
    out = str(tmp_path / "run")
    assert main(["collect", "--out", out, "--pool", f"pool={pool}", "--no-progress"]) == 0
    return out


def read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


QUESTIONS = [f"What is the value of question number {i} in this set of problems?" for i in range(8)]


@pytest.mark.parametrize("headers, pause", [
    ({"retry-after": "2"}, 2.0), ({"retry-after-ms": "1500"}, 1.5), ({}, None), (None, None),
    ({"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}, None),  # an HTTP date: no hint
    ({"retry-after-ms": "-500"}, 0.0), ({"retry-after": "-3"}, 0.0),  # time.sleep raises on a negative pause
    ({"retry-after": "nan"}, None), ({"retry-after-ms": "nan"}, None),  # ... and on NaN
    ({"retry-after": "inf"}, MAX_RETRY_AFTER_S), ({"retry-after": "1e9"}, MAX_RETRY_AFTER_S)])
def test_retry_after_gives_a_pause_time_sleep_takes(headers, pause):
    assert retry_after(headers) == pause


def test_client_chat_takes_messages_or_prompt():
    client = Client(["http://127.0.0.1:9/v1"], model="m", retries=0)
    for kwargs in ({}, {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}):
        with pytest.raises(ValueError, match="Client.chat: give messages .* or prompt .*, one of the two"):
            client.chat(**kwargs)


def test_client_retries_429_500_hang_and_malformed_honouring_retry_after(standin):
    s = standin(script={"q": ["429", "500", "hang", "malformed"]}, retry_after="1")
    client = Client([s.url], timeout=0.5, retries=4, backoff=0.01, concurrency=2)
    t0 = time.monotonic()
    reply = client.chat([{"role": "user", "content": "q"}], max_tokens=8)
    assert reply.error is None and reply.tries == 5, reply
    assert reply.thinking == "thinking about: q" and reply.answer == "Answer: 42" and reply.source == "think_tags"
    assert reply.tokens == 7
    times = [t for t, q, _ in s.log if q == "q"]
    assert [a for _, _, a in s.log] == ["429", "500", "hang", "malformed", "ok"]
    assert times[1] - times[0] >= 0.95  # Retry-After: 1 was honoured (the backoff alone is 0.01 s)
    assert times[3] - times[2] >= 0.45  # the hang ran into the 0.5 s timeout before the retry
    assert time.monotonic() - t0 < 10
    # out of retries: the error is returned, not raised; a 400 is not retried
    s.script.update({"r": ["500"] * 3, "b": ["400"]})
    failed = Client([s.url], retries=2, backoff=0.01).chat([{"role": "user", "content": "r"}])
    assert failed.answer is None and failed.tries == 3 and "HTTP 500" in failed.error
    bad = Client([s.url], retries=3, backoff=0.01).chat([{"role": "user", "content": "b"}])
    assert bad.tries == 1 and "HTTP 400" in bad.error


def test_client_spreads_over_endpoints_with_bounded_concurrency(standin):
    a, b = standin(delay=0.2), standin(delay=0.2)
    client = Client([a.url, b.url], concurrency=3, backoff=0.01)
    jobs = {q: [{"role": "user", "content": q}] for q in QUESTIONS}
    active, peak, lock = [0], [0], threading.Lock()
    chat = client.chat

    def counting(messages, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return chat(messages, **kw)
        finally:
            with lock:
                active[0] -= 1

    client.chat = counting
    got = dict(client.map(jobs, max_tokens=4))
    assert set(got) == set(QUESTIONS) and all(r.error is None for r in got.values())
    assert peak[0] == 3
    assert len(a.log) == len(b.log) == 4  # round robin


def test_split_thinking_sources():
    msg = openai.types.chat.ChatCompletionMessage.model_validate(
        {"role": "assistant", "content": "x = 2", "reasoning_content": "think hard"})
    assert split_thinking(msg) == ("think hard", "x = 2", "reasoning_content")
    msg = openai.types.chat.ChatCompletionMessage.model_validate({"role": "assistant", "content": "<think>\nhalf"})
    assert split_thinking(msg) == ("half", "", "think_tags")  # unclosed: all thinking, no answer
    msg = openai.types.chat.ChatCompletionMessage.model_validate({"role": "assistant", "content": "just 4"})
    assert split_thinking(msg) == (None, "just 4", None)


def test_distill_records_errors_and_asks_them_again(standin, tmp_path):
    s = standin(script={QUESTIONS[0]: ["500"] * 2, QUESTIONS[1]: ["malformed", "429"], QUESTIONS[2]: ["hang"]},
                retry_after="0")
    out = pipeline_dir(tmp_path, QUESTIONS[:4])
    args = ["distill", "--out", out, "--endpoint", s.url, "--retries", "1", "--backoff", "0.01", "--timeout", "1",
            "--concurrency", "4", "--no-progress"]
    assert main(args) == 0
    recs = {r["id"]: r for r in read(os.path.join(out, "distill.jsonl"))}
    ids = {question_id(q): q for q in QUESTIONS[:4]}
    assert set(recs) == set(ids)
    assert recs[question_id(QUESTIONS[0])]["error"] and recs[question_id(QUESTIONS[0])]["thinking"] is None
    assert recs[question_id(QUESTIONS[1])]["error"] and "HTTP 429" in recs[question_id(QUESTIONS[1])]["error"]
    for q in QUESTIONS[2:4]:  # the hang was retried and answered
        r = recs[question_id(q)]
        assert r["error"] is None and r["thinking"] == f"thinking about: {q}" and r["format"] == "r1"
        assert r["predicted"] == "42" and r["correct"] is True
    before = s.asked()
    assert main(args) == 0  # the rerun asks only the two that failed
    assert s.asked() - before == Counter({QUESTIONS[0]: 1, QUESTIONS[1]: 1})
    final = Records(os.path.join(out, "distill.jsonl"), key=("id", "sample"))
    assert all(r["error"] is None for r in final.values()) and len(final.latest) == 4


def test_a_rerun_with_other_settings_is_refused(standin, tmp_path, capsys):
    """Answers made with other settings are never mixed into a stage's records: the settings an answer depends on
    are kept per teacher / student / classifier (``<stage>.settings.json``) and a rerun that changes them is refused
    in one line, before anything is asked; where and how fast it asks may change."""
    s = standin(script={QUESTIONS[1]: ["500"]})
    out = pipeline_dir(tmp_path, QUESTIONS[:2])
    common = ["--out", out, "--endpoint", s.url, "--retries", "0", "--no-progress"]
    assert main(["distill", *common, "--temperature", "0.5"]) == 0
    asked = s.asked()
    refused = [(["distill", "--temperature", "0.7"], "temperature 0.5 before, 0.7 now"),
               (["distill", "--temperature", "0.5", "--name", "other"], "teacher 'stand-in' before, 'other' now"),
               (["distill", "--temperature", "0.5", "--max-tokens", "99"], "max_tokens 32768 before, 99 now"),
               (["distill", "--temperature", "0.5", "--model-name", "other", "--name", "stand-in"],
                "model 'stand-in' before, 'other' now")]
    for argv, said in refused:
        with pytest.raises(SystemExit) as e:
            main([argv[0], *common, *argv[1:]])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and "distill.jsonl holds answers of teacher" in err, err
    assert s.asked() == asked  # nothing was sent
    assert main(["distill", *common, "--temperature", "0.5", "--concurrency", "3", "--timeout", "30"]) == 0
    assert s.asked() - asked == Counter({QUESTIONS[1]: 1})  # the failed one, asked again
    # attempt: an entry per student; another student may use other settings, the same one may not
    assert main(["attempt", *common, "--max-tokens", "10"]) == 0
    assert main(["attempt", *common, "--name", "s2", "--max-tokens", "20"]) == 0
    with pytest.raises(SystemExit):
        main(["attempt", *common, "--name", "s2", "--max-tokens", "30"])
    assert "answers of s2 made with other settings (max_tokens 20 before, 30 now)" in capsys.readouterr().err
    kept = json.loads(open(os.path.join(out, "attempt.settings.json")).read())
    assert {k: v["max_tokens"] for k, v in kept.items()} == {"stand-in": 10, "s2": 20}
    os.rename(os.path.join(out, "attempt.settings.json"), os.path.join(out, "lost.json"))  # answers, no settings
    with pytest.raises(SystemExit):
        main(["attempt", *common, "--max-tokens", "10"])
    assert "has no record of their settings; give another --out" in capsys.readouterr().err
    # classify: questions added later are not classified another way than the first ones
    assert main(["classify", "--out", out, "--endpoint", s.url, "--tries", "1"]) == 0
    out = pipeline_dir(tmp_path, QUESTIONS[:3])
    with pytest.raises(SystemExit):
        main(["classify", "--out", out, "--field", "domain"])
    assert "field None before, 'domain' now" in capsys.readouterr().err


def test_settings_may_change_while_no_answer_exists_and_a_refusal_lets_the_lock_go(standin, tmp_path, capsys):
    """Failed requests are asked again on a rerun, so a run whose every request failed (a --max-tokens the server
    refuses) may be rerun with other settings; a stage stopped by an error (a server that cannot be reached) lets
    its lock go, so the same process can run it again."""
    s = standin(script={q: ["400"] for q in QUESTIONS[:2]})
    out = pipeline_dir(tmp_path, QUESTIONS[:2])
    common = ["--out", out, "--endpoint", s.url, "--retries", "0", "--no-progress"]
    assert main(["distill", *common, "--max-tokens", "50"]) == 0
    assert all(r["error"] for r in read(os.path.join(out, "distill.jsonl")))
    assert main(["distill", *common, "--max-tokens", "40"]) == 0
    assert all(r["error"] is None for r in Records(os.path.join(out, "distill.jsonl"), key=("id", "sample")).values())
    assert json.load(open(os.path.join(out, "distill.settings.json")))["teacher"]["max_tokens"] == 40
    with pytest.raises(SystemExit) as e:
        main(["classify", "--out", out, "--endpoint", "http://127.0.0.1:9/v1", "--retries", "0", "--timeout", "2"])
    assert e.value.code == 2 and "cannot list its models" in capsys.readouterr().err
    assert main(["classify", "--out", out, "--field", "domain"]) == 0  # e still holds the failed call's frames


def test_kill_9_mid_distill_then_rerun(standin, tmp_path):
    s = standin(delay=0.3)
    questions = [f"Question {i}: how many ways are there to pick {i} items from a set of ten?" for i in range(12)]
    out = pipeline_dir(tmp_path, questions)
    args = [sys.executable, "-m", "s1fast", "data", "distill", "--out", out, "--endpoint", s.url, "--concurrency",
            "2", "--no-progress"]
    path = os.path.join(out, "distill.jsonl")

    def lines():
        return len(open(path).readlines()) if os.path.exists(path) else 0

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while lines() < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # as Ctrl-C: exit 130 at once, records kept
    assert proc.wait(20) == 130 and "interrupted" in proc.stderr.read().decode()
    assert 2 <= lines() < len(questions)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while lines() < 4:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(path, "a") as f:  # as if the kill had cut a write short
        f.write('{"id": "cut sho')
    finished = {r["id"] for r in read_lines(path)}
    assert 4 <= len(finished) < len(questions)
    first = s.asked()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    second = s.asked() - first
    ids = [r["id"] for r in read(path)]
    assert sorted(ids) == sorted(question_id(q) for q in questions)  # every question once, the cut line gone
    assert not {question_id(q) for q in second} & finished  # finished ones not asked again
    assert all(n == 1 for n in second.values())


def read_lines(path):
    out = []
    for line in open(path):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_collect_decontaminates_with_8_grams_and_deduplicates(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [
        {"problem": "Find the number of ordered pairs of positive integers whose product equals the sum of both",
         "answer": "1"}])
    planted = ("Alice wonders: find the number of ordered pairs of positive integers whose product is at most nine")
    near_miss = "Bob asks us to find the number of ordered pairs of real numbers with a fixed product"
    pool = write_jsonl(tmp_path / "pool.jsonl", [
        {"question": planted, "answer": "3"},  # shares the 8-gram "find ... integers whose" with the eval question
        {"question": near_miss, "answer": "4"},  # shares only 7 consecutive words
        {"question": "Compute  the SUM of 2 and 3.", "answer": "5"},
        {"question": "compute the sum of 2 and 3", "answer": "5"},  # exact duplicate (case, spacing, punctuation)
        {"question": "A farmer has 17 sheep and all but 9 run away; how many sheep does the farmer have left now?",
         "answer": "9"},
        {"question": "A farmer has 17 sheep and all but 9 run away; how many sheep does the farmer have left?",
         "answer": "9"},  # near duplicate: 8-gram Jaccard 12/13
    ])
    kept, report = collect([("p", pool)], eval_sets=[evals])
    assert [r["question"] for r in kept] == [near_miss, "Compute  the SUM of 2 and 3.", json.loads(
        open(pool).readlines()[4])["question"]]
    assert report["sources"]["p"] == {"read": 6, "contaminated": 1, "duplicate": 1, "near_duplicate": 1, "kept": 3}
    assert [d["reason"] for d in report["dropped"]] == ["contaminated", "duplicate", "near_duplicate"]
    kept, report = collect([("p", pool)], eval_sets=[evals], near_dup=0.95)
    assert report["sources"]["p"]["near_duplicate"] == 0


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_near_duplicates_as_every_pair_compared(tmp_path, threshold):
    """The prefix-filtered search keeps exactly what comparing every pair keeps (templated questions with a few
    words changed, so similarities spread around the threshold)."""
    from s1fast.data.collect import ngrams

    rng = random.Random(5)
    words = "the a number of ways to pick ball red blue from bag find value sum integer prime".split()
    base = [" ".join(rng.choice(words) for _ in range(rng.randrange(6, 20))) for _ in range(6)]
    rows = []
    for _ in range(150):
        w = rng.choice(base).split()
        for _ in range(rng.randrange(0, 4)):
            w[rng.randrange(len(w))] = rng.choice(words + ["7", "11", "x"])
        rows.append({"question": " ".join(w) + "?", "answer": "1"})
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    kept, report = collect([("p", pool)], eval_sets=[], near_dup=threshold)
    expected, seen = [], set()
    for r in rows:
        g, key = ngrams(r["question"]), question_id(r["question"])
        if key in seen or any(len(g & h) / len(g | h) >= threshold for h in expected):
            continue
        seen.add(key)
        expected.append(g)
    assert [ngrams(r["question"]) for r in kept] == expected
    assert 0 < report["sources"]["p"]["near_duplicate"] and len(kept) > 6


def test_records_cut_a_partial_line_only_under_the_lock(tmp_path):
    path = tmp_path / "r.jsonl"
    text = '{"id": "a", "v": 1}\n{"id": "b", "v"'  # the line may be one a live writer is still writing
    path.write_text(text)
    r = Records(str(path))
    assert list(r.latest) == [("a",)] and path.read_text() == text  # a reader cuts nothing
    path.write_text(text + ': 2}\n{"id": "c')  # the writer went on, then died mid-line
    r.lock()
    assert path.read_text() == '{"id": "a", "v": 1}\n{"id": "b", "v": 2}\n'
    r.close()


def test_records_drop_a_partial_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "v": 1}\n{"id": "b", "v": 2}\n{"id": "a", "v": 3}\n{"id": "c", "v"')
    r = Records(str(path))
    assert {k: v["v"] for (k,), v in r.latest.items()} == {"a": 3, "b": 2}
    r.add({"id": "c", "v": 4})
    r.close()
    assert read(path)[-1] == {"id": "c", "v": 4} and len(read(path)) == 4
    first = Records(str(path))
    first.lock()
    with pytest.raises(ValueError, match="being written by another process"):
        Records(str(path)).lock()
    first.close()
    Records(str(path)).lock()  # free again


def test_formatting_problems_and_domains():
    assert formatting_problems("Look at the\n+---+---+\n|   |   |\n+---+---+\nHow many squares?") == ["ascii_art"]
    assert formatting_problems("In the figure below, find angle ABC.") == ["missing_image"]
    assert formatting_problems("Steps:\n1. add\n2. multiply\n4. divide") == ["numbering"]
    assert formatting_problems("Steps:\n1. add\n2. multiply\n3. a - b = 2.5\n\nThen:\n1. again") == []
    assert formatting_problems("Compute 3.5 + 2 - 1 and a figure of speech") == []
    codes = domains()
    assert len([c for c in codes if c.isdigit()]) == 63 and codes["11"] == "Number theory"
    assert parse_domain("It is about primes.\nDomain: 11") == "11"
    assert parse_domain("**Domain:** chem") == "CHEM"
    assert parse_domain("Either 11 or 05") is None and parse_domain("Domain: 99") is None


# --------------------------------------------------------------------------------------------------- select


def synthetic_pool(seed: int = 3) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(120):
        items.append(Item(id=f"q{i:03d}", source=rng.choice(["aime", "math", "other"]),
                          domain=rng.choice(["05", "11", "14", "60", "PHYS"]), length=rng.randrange(50, 5000),
                          teacher_correct=rng.random() < 0.6, solved_by=["s7"] if rng.random() < 0.3 else [],
                          unattempted_by=["s32"] if rng.random() < 0.05 else [],
                          problems=["ascii_art"] if rng.random() < 0.1 else []))
    return items


def replay_s1(items: list[Item], size: int, seed: int, hq: dict) -> list[str]:
    """s1's Algorithm 1 written out as the paper has it, one random draw at a time (random.Random's primitives:
    ``choice`` -> ``_randbelow``, weighted ``choices`` -> ``bisect`` over cumulative weights of ``random()``)."""
    import bisect

    rng = random.Random(seed)
    q = sorted((it for it in items if not it.problems and not it.solved_by and not it.unattempted_by),
               key=lambda it: it.id)
    chosen = [it.id for it in q if it.source in hq and it.teacher_correct and it.length >= hq[it.source]]
    domain_pool = sorted({it.domain for it in q})
    while len(chosen) < size and domain_pool:
        d = domain_pool[rng._randbelow(len(domain_pool))]
        qd = sorted((it for it in q if it.domain == d), key=lambda it: (-it.length, it.id))
        cum, total = [], 0.0
        for rank in range(len(qd)):
            total += 2.0**-rank
            cum.append(total)
        pick = qd[bisect.bisect(cum, rng.random() * total, 0, len(qd) - 1)]
        if pick.id not in chosen:
            chosen.append(pick.id)
        q.remove(pick)
        if not any(it.domain == d for it in q):
            domain_pool.remove(d)
    return chosen


@pytest.mark.parametrize("seed", [0, 7])
def test_select_replays_s1_algorithm(seed):
    items = synthetic_pool()
    hq = {"aime": 0, "math": 4000}
    chosen, counts = select(items, size=40, seed=seed, high_quality=hq)
    assert chosen == replay_s1(items, 40, seed, hq)
    n_quality = sum(bool(it.problems) for it in items)
    after_q = [it for it in items if not it.problems]
    assert counts["quality_removed"] == {"ascii_art": n_quality}
    assert counts["difficulty_removed"] == {"solved": sum(bool(it.solved_by and not it.unattempted_by)
                                                          for it in after_q),
                                            "unattempted": sum(bool(it.unattempted_by) for it in after_q)}
    assert counts["selected"] == 40 and len(set(chosen)) == 40
    # every selected question passed every filter
    by_id = {it.id: it for it in items}
    assert all(not by_id[i].problems and not by_id[i].solved_by for i in chosen)


def test_diversity_draw_probabilities():
    """The first draw: domain uniform (1/2), then 2^-rank inside it; 20,000 seeded draws within 4 sigma."""
    pool = [Item(id=f"a{i}", source="s", domain="A", length=100 - i, teacher_correct=True) for i in range(3)]
    pool += [Item(id="b0", source="s", domain="B", length=5, teacher_correct=True)]
    n = 20000
    firsts = Counter(diversity_draw(pool, 1, random.Random(s))[0] for s in range(n))
    expected = {"a0": 0.5 * 4 / 7, "a1": 0.5 * 2 / 7, "a2": 0.5 * 1 / 7, "b0": 0.5}
    for k, p in expected.items():
        assert abs(firsts[k] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (k, firsts[k] / n, p)


def test_select_without_quality_still_removes_what_cannot_be_trained_on():
    items = synthetic_pool()
    items[0].problems, items[1].problems = ["error"], ["missing_fields", "ascii_art"]
    chosen, counts = select(items, size=len(items), quality=False, difficulty=False)
    assert counts["quality_removed"] == {"error": 1, "missing_fields": 1}
    assert set(chosen) == {it.id for it in items[2:]}  # formatting problems are kept without the quality step


def test_select_ablations():
    items = synthetic_pool()
    ok = [it for it in items if not it.problems]
    longest, _ = select(items, method="longest", size=10)
    assert longest == [it.id for it in sorted(ok, key=lambda it: (-it.length, it.id))[:10]]
    rand, counts = select(items, method="random", size=10, seed=1)
    assert rand == [it.id for it in random.Random(1).sample(sorted(ok, key=lambda it: it.id), 10)]
    assert "difficulty_removed" not in counts
    diverse, _ = select(items, method="diversity", size=100, seed=2)
    assert len(set(diverse)) == len(diverse) == min(100, len(ok)) and set(diverse) <= {it.id for it in ok}


def test_layering():
    """data may import kernels, model, decode, train, eval and the top-level modules (client included); nothing
    imports data but the router cli.py; client.py imports no room (eval can use it later without importing data)."""
    from test_layout import ALLOWED, _imports

    rooms = set(ALLOWED) | {"data"}
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            if not name.endswith(".py") or rel.startswith(("tests", ".")):
                continue
            imports = _imports(path)
            if rel.startswith("data" + os.sep):
                assert imports <= rooms - {"bench"} | {"files", "commands", "env", "client"}, (rel, imports)
            elif "data" in imports and rel != "cli.py":
                found[rel] = imports
    assert found == {}
    assert _imports(os.path.join(ROOT, "client.py")) == set()


def test_classify_with_a_model_retries_then_unknown(standin, tmp_path):
    replies = {QUESTIONS[0]: "It counts primes.\nDomain: 11", QUESTIONS[1]: "Domain: 05, or maybe 11"}
    s = standin(content=lambda prompt: next((r for q, r in replies.items() if q in prompt), "no idea"))
    out = pipeline_dir(tmp_path, QUESTIONS[:3])
    assert main(["classify", "--out", out, "--endpoint", s.url, "--tries", "2", "--backoff", "0"]) == 0
    got = {r["id"]: r for r in read(os.path.join(out, "classify.jsonl"))}
    assert got[question_id(QUESTIONS[0])]["domain"] == "11" and got[question_id(QUESTIONS[0])]["tries"] == 1
    assert got[question_id(QUESTIONS[1])]["domain"] == "05"  # the Domain: mark wins
    assert got[question_id(QUESTIONS[2])]["domain"] == "unknown" and got[question_id(QUESTIONS[2])]["tries"] == 2
    assert sum(s.asked().values()) == 4  # 3, then the one that did not parse once more
    assert main(["classify", "--out", out, "--endpoint", s.url]) == 0 and sum(s.asked().values()) == 4


@pytest.mark.parametrize("argv, message", [
    (["collect", "--pool", "missing.jsonl"], "pool missing 'missing.jsonl': no such file"),
    (["collect", "--pool", "POOL", "--near-dup", "0"], "--near-dup must be in (0, 1]"),
    (["distill"], "give --endpoint URL or --teacher PATH"),
    (["distill", "--endpoint", "ftp://x"], "--endpoint 'ftp://x': expected an http(s) URL"),
    (["distill", "--endpoint", "http://127.0.0.1:9/v1", "--concurrency", "0"], "--concurrency must be >= 1"),
    (["distill", "--endpoint", "http://127.0.0.1:9/v1", "--teacher", "."], "give --endpoint or --teacher, not both"),
    (["attempt", "--student", "nowhere"], "--student: 'nowhere' is not a directory"),
    (["distill", "--endpoint", "http://127.0.0.1:9/v1", "--retries", "0", "--timeout", "2"],
     "--endpoint http://127.0.0.1:9/v1: cannot list its models"),
    (["select", "--high-quality", ":3"], "--high-quality ':3': expected SOURCE or SOURCE:MIN_TOKENS"),
    # issue 28's probe round: these loaded the model, or failed later with another option's name
    (["attempt", "--student", "GPT2"], "--student 'GPT2': model_type 'gpt2'; s1fast runs Qwen2"),
    (["attempt", "--student", "QWEN", "--max-tokens", "64"], "--max-tokens 64: the model has 64 positions"),
    (["distill", "--endpoint", "http://127.0.0.1:9/v1", "--timeout", "1e300"], "--timeout must be > 0 and at most"),
    (["distill", "--endpoint", "http://127.0.0.1:9/v1", "--backoff", "nan"], "--backoff must be >= 0 and at most"),
    (["distill", "--endpoint", "http://127.0.0.1:9/v1", "--temperature", "inf"],
     "argument --temperature: expected a finite number >= 0, got 'inf'"),
    (["select"], "holds no distilled traces; run `s1fast data distill` first"),
    (["classify", "--field", "x", "--endpoint", "http://h/v1"], "give --field or --endpoint, not both"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    from transformers import GPT2Config, Qwen2Config

    pool = write_jsonl(tmp_path / "pool.jsonl", [{"question": QUESTIONS[0], "answer": "1"}])
    models = {"GPT2": GPT2Config(n_layer=1), "QWEN": Qwen2Config(max_position_embeddings=64)}  # configs, no weights
    for name, config in models.items():
        config.save_pretrained(tmp_path / name)
    out = str(tmp_path / "run")
    if argv[0] != "collect":
        assert main(["collect", "--out", out, "--pool", pool]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--out", out, *[pool if a == "POOL" else str(tmp_path / a) if a in models else a
                                         for a in argv[1:]], "--no-progress"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1].replace(str(tmp_path / "GPT2"), "GPT2")
    assert last.startswith(f"s1fast data {argv[0]}: error: ") and message in last, last
