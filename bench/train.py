"""Training-step benchmark: one forward + backward + AdamW step of random-initialised Qwen2.5-shaped models,
transformers unpatched vs ``s1fast.model.patch`` vs Liger-Kernel.

    python -m s1fast.bench.train [--device cuda] [--quick] [--peers liger] [--json]

GPU: Qwen2.5-0.5B and 1.5B shapes (all layers, full vocabulary, tied embeddings) at 4K / 16K / 32K tokens per
step (one packed row, as padding-free SFT feeds it), bf16 weights, gradient checkpointing on (as the s1 recipe
trains, and without it 1.5B activations at 32K do not fit). Quick: 0.5B at 4K. CPU: 2 layers of 0.5B width
with the full vocabulary, fp32, 1024 tokens (enough for the logits to matter next to the 545 MB tied
embedding and its gradient), no checkpointing: the peak-memory ratio is what carries over to a GPU there, the
CPU times much less so (quick: 1 layer, 512 tokens, one timed step).

Per row: ``median_ms`` of the whole step after warm-up (optimizer state already allocated), ``tokens_per_s``,
``model_tflops`` and on CUDA ``mfu_pct`` (6 x matmul parameters x tokens plus causal attention, against the
measured matmul ceiling; recomputation not counted), ``static_mib`` (parameters + AdamW state), ``step_peak_mib``
(measured peak above that during one step: activations, logits, gradients; CUDA allocator counters, or the
CPU allocator's events under torch.profiler), ``peak_mem_mib`` (their sum), and on the patched and Liger rows
``speedup_vs_unpatched`` and ``peak_mem_vs_unpatched``. ``peers``: "liger" adds Liger-Kernel
(``apply_liger_kernel_to_qwen2``, CUDA only, when installed); other peers do not apply here. Liger patches
transformers' Qwen2 classes for the whole process, so its rows run last.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Iterator

import torch
from transformers import Qwen2ForCausalLM

from s1fast.bench.common import device_ceilings, memory_profile, synchronize, weight_grad_gemm
from s1fast.bench.profiling import region
from s1fast.commands import default_device
from s1fast.env import environment
from s1fast.model.patch import patch
from s1fast.model.shapes import QWEN25_SHAPES, random_qwen

IMPLS = ("unpatched", "s1fast", "liger")


def grid(device: str, quick: bool, headline: bool = False) -> list[dict]:
    """The configurations to run: model shape name, layers, tokens per step, dtype, gradient checkpointing
    (``headline``: 1.5B at 32K tokens on GPU; the full run on CPU)."""
    if torch.device(device).type == "cuda":
        models = ([("0.5B", 4096)] if quick else [("1.5B", 32768)] if headline
                  else [(m, t) for m in ("0.5B", "1.5B") for t in (4096, 16384, 32768)])
        return [dict(model=m, layers=QWEN25_SHAPES[m]["layers"], tokens=t, dtype=torch.bfloat16, grad_ckpt=True)
                for m, t in models]
    layers, tokens = (1, 512) if quick else (2, 1024)
    return [dict(model="0.5B", layers=layers, tokens=tokens, dtype=torch.float32, grad_ckpt=False)]


def build(model: str, layers: int, device: str, dtype: torch.dtype, grad_ckpt: bool) -> Qwen2ForCausalLM:
    lm = random_qwen(QWEN25_SHAPES[model], device=device, layers=layers, dtype=dtype).train()
    if grad_ckpt:
        lm.gradient_checkpointing_enable()
    return lm


def apply(impl: str, lm: Qwen2ForCausalLM) -> None:
    if impl == "s1fast":
        patch(lm)
    elif impl == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=lm
        )


def model_flops(model: str, layers: int, tokens: int) -> float:
    """Forward + backward FLOPs of one step: 6 per matmul parameter per token, plus causal attention
    (QK^T and PV over half the T x T square: 2 T^2 Hq D forward, times 3 with backward) per layer."""
    s = QWEN25_SHAPES[model]
    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * s["intermediate"]
    return 6.0 * tokens * (layers * per_layer + h * s["vocab"]) + layers * 6.0 * tokens**2 * q


def _static_bytes(lm: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = list(lm.parameters()) + [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _liger_missing(device: str) -> str | None:
    if torch.device(device).type != "cuda":
        return "Liger-Kernel runs on CUDA only"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        return f"liger-kernel not installed ({e}); pip install liger-kernel"
    return None


def measure_step(impl: str, cfg: dict, device: str, quick: bool, timed: int = 5) -> dict:
    """One configuration: a warm-up step, one under the memory profile, then ``timed`` steps on CUDA (on CPU 3, or 1
    with ``quick``)."""
    lm = build(cfg["model"], cfg["layers"], device, cfg["dtype"], cfg["grad_ckpt"])
    apply(impl, lm)
    # fused AdamW (transformers' Trainer default): no optimizer temporaries of the parameters' size, which on
    # the CPU shape would otherwise hide the logits in the peak
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, lm.config.vocab_size, (1, cfg["tokens"]), generator=g).to(device)
    labels = input_ids.clone()
    labels[:, : cfg["tokens"] // 10] = -100  # a prompt that is not trained, as in SFT

    def step() -> None:
        with region(f"train/{impl}/forward"):
            loss = lm(input_ids=input_ids, labels=labels).loss
        with region(f"train/{impl}/backward"):
            loss.backward()
        with region(f"train/{impl}/optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    try:
        step()  # allocates the AdamW state: what follows is the steady state
        static = _static_bytes(lm, opt)
        peak = memory_profile(step, device=device)["peak_mib"]
        times = []
        for _ in range((1 if quick else 3) if torch.device(device).type == "cpu" else timed):
            synchronize(device)
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        lm = opt = None  # freed before the next configuration is built
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    ms = statistics.median(times)
    tflops = model_flops(cfg["model"], cfg["layers"], cfg["tokens"]) / ms / 1e9
    row = {"median_ms": ms, "tokens_per_s": cfg["tokens"] / ms * 1e3, "model_tflops": tflops}
    if torch.device(device).type == "cuda":  # a shared CPU's matmul ceiling is too noisy to divide by
        row["mfu_pct"] = 100 * tflops / device_ceilings(device, quick=quick)["matmul_tflops"]
    if impl == "s1fast":
        row.update(weight_grad_gemm())  # the fused loss's GEMM path, behind the peak memory
    return {**row, "static_mib": static / 2**20, "step_peak_mib": peak, "peak_mem_mib": static / 2**20 + peak}


def run(*, device: str, quick: bool, peers: list[str], headline: bool = False) -> Iterator[dict]:
    """Bench-suite entry point: yields each row as it is measured (every unpatched row before the others, which
    carry their ratios to it). ``headline``: 3 timed steps instead of 5."""
    impls = [i for i in IMPLS if i != "liger" or "liger" in peers]  # liger last: it patches classes globally
    env = environment(device)
    base = {}
    for impl in impls:
        skipped = _liger_missing(device) if impl == "liger" else None
        for cfg in grid(device, quick, headline):
            row = {"bench": "train", "impl": impl, **cfg, "dtype": str(cfg["dtype"]).replace("torch.", "")}
            if skipped:
                row["skipped"] = skipped
            else:
                try:
                    row.update(measure_step(impl, cfg, device, quick, timed=3 if headline else 5))
                except Exception as e:  # a peer built for other transformers versions must not end the run
                    if impl != "liger":
                        raise
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
            ref = base.get((row["model"], row["tokens"]))
            if impl == "unpatched" and "median_ms" in row:
                base[(row["model"], row["tokens"])] = row
            elif ref and "median_ms" in row:
                row["speedup_vs_unpatched"] = ref["median_ms"] / row["median_ms"]
                row["peak_mem_vs_unpatched"] = row["peak_mem_mib"] / ref["peak_mem_mib"]
            yield {**row, **env}


COLUMNS = ("impl", "model", "layers", "tokens", "dtype", "grad_ckpt", "median_ms", "tokens_per_s", "mfu_pct",
           "peak_mem_mib", "step_peak_mib", "speedup_vs_unpatched", "peak_mem_vs_unpatched", "skipped", "error")


def main(argv: list[str] | None = None) -> int:
    from s1fast.bench.report import markdown_table

    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m s1fast.bench.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="cuda, cuda:N or cpu (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="one small configuration, few repetitions")
    p.add_argument("--peers", default="liger", help="comma-separated; 'liger' adds Liger-Kernel (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda":
        torch.cuda.set_device(args.device)  # Triton launches on the current device, not on its arguments' device
    rows = list(run(device=args.device, quick=args.quick, peers=[x for x in args.peers.split(",") if x]))
    print(json.dumps(rows, indent=1) if args.json else markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
