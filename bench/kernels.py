"""Kernel benchmarks: every s1fast kernel next to its peers, forward / backward / forward+backward.

For each kernel at each shape, every implementation gets:
- ``fwd_ms``, ``bwd_ms``, ``fwd_bwd_ms``: medians after warm-up (:func:`bench.common.time_ms`: on CUDA
  L2 is cleared before each call, so inputs come from HBM as fresh ones would; on CPU repeated wall-clock
  timing); gradients reset to None before each call. ``bwd_ms`` times the backward alone: each timed
  backward runs on a fresh graph whose forward ran untimed just before (a fused backward may consume what
  its forward saved, so one graph cannot be re-run), never as a difference of two noisy medians.
- ``*_gbps`` and ``fwd_bwd_pct_of_copy_bw``: bytes that must move (each input read once, each output
  written once; ``*_moved_mib``) over the time, against the measured device-copy bandwidth. For the
  compute-bound fused linear cross-entropy: ``fwd_bwd_tflops`` (6·N·H·V) and ``fwd_bwd_pct_of_matmul``.
- ``peak_mem_mib``: memory allocated during one forward+backward above what was live before (measured:
  CUDA allocator peak, or the CPU allocator's events under ``torch.profiler``); ``extra_mem_mib``: the
  same minus the gradients the call must return; on CPU ``largest_alloc_mib``, the largest single tensor.
- ``backend``: what ran: "triton", "triton-interpreter", "torch" (PyTorch path), "inductor" (torch.compile).

Implementations: ``s1fast`` (the public API), and the peers asked for: ``eager`` (the ``*_reference``
plain-PyTorch version), ``compile`` (``torch.compile`` of it), ``liger`` (Liger-Kernel, CUDA only, when
installed), ``hf`` (transformers' own module where it differs from eager: Qwen2RMSNorm,
apply_rotary_pos_emb), ``trl`` (TRL's fused LM head, ``trl.kernels.chunked_logprob``, with SFTTrainer's loss; fused
linear cross-entropy only, when installed: Triton on CUDA, its PyTorch tiles on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from s1fast import kernels as K
from s1fast.bench.common import device_ceilings, memory_profile, time_ms, weight_grad_gemm
from s1fast.bench.profiling import region
from s1fast.kernels._common import interpreting, use_triton
from s1fast.model.shapes import QWEN25_SHAPES

KERNELS = ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy")
PEERS = ("eager", "compile", "liger", "hf", "trl")
IGNORE_INDEX = -100
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE: the vocabulary tile of TRL's trainers
SUMMARY_COLUMNS = ("kernel", "model", "tokens", "impl", "backend", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_gbps",
                   "fwd_bwd_pct_of_copy_bw", "fwd_bwd_tflops", "peak_mem_mib", "extra_mem_mib", "largest_alloc_mib",
                   "fwd_bwd_speedup_vs_eager", "skipped")


@dataclass
class Case:
    kernel: str
    model: str
    tokens: int
    leaves: list[torch.Tensor]  # inputs that get gradients
    others: list[torch.Tensor]  # inputs that do not (cos/sin, labels)
    dys: list[torch.Tensor] | None  # output gradients; None for a scalar loss
    impls: dict[str, Callable | str]  # implementation -> fn(*leaves, *others), or why it is skipped
    moved_bytes: dict[str, int] = field(default_factory=dict)  # phase -> bytes that must move
    flops: dict[str, int] = field(default_factory=dict)  # phase -> floating-point operations


def shapes(device: str, quick: bool, headline: bool = False) -> dict[str, list[tuple[str, int]]]:
    """kernel -> [(model, tokens)]. GPU: Qwen2.5-1.5B and 7B at 4K..32K tokens (quick: 1.5B at 4K; headline:
    1.5B at 8K and 32K). CPU: Qwen2.5-0.5B widths at small token counts (the loss kernels with the full 151,936
    vocabulary; headline as the full run)."""
    if torch.device(device).type == "cuda":
        grid = ([("1.5B", 4096)] if quick else [("1.5B", 8192), ("1.5B", 32768)] if headline
                else [(m, t) for m in ("1.5B", "7B") for t in (4096, 8192, 16384, 32768)])
        return {k: grid for k in KERNELS}
    small = [256] if quick else [512, 2048]
    return {
        "rms_norm": [("0.5B", t) for t in small],
        "rope": [("0.5B", t) for t in small],
        "swiglu": [("0.5B", t) for t in small],
        "cross_entropy": [("0.5B", t) for t in ([64] if quick else [128, 512])],
        # at 32 tokens the 0.5B lm_head weight (V x H) outweighs the logits; 2,048 tokens show the chunking
        "fused_linear_cross_entropy": [("0.5B", t) for t in ([32] if quick else [512, 2048])],
    }


def _liger(device: str) -> SimpleNamespace | str:
    """Liger-Kernel's implementation of each kernel (same call signature as ours), or why there is none."""
    if torch.device(device).type != "cuda":
        return "Liger-Kernel runs on CUDA only"
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers import (
            LigerCrossEntropyLoss,
            LigerFusedLinearCrossEntropyLoss,
            LigerRMSNorm,
            liger_rotary_pos_emb,
        )
    except ImportError as e:
        return f"liger-kernel not installed ({e}); pip install liger-kernel"
    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    return SimpleNamespace(
        rms_norm=lambda hidden, dtype: _module_fn(LigerRMSNorm(hidden, eps=1e-6).to(device, dtype)),
        rope=liger_rotary_pos_emb,
        swiglu=LigerSiLUMulFunction.apply,
        cross_entropy=LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX),
        fused_linear_cross_entropy=lambda h, w, y: flce(w, h, y),
    )


def _trl_lm_head() -> Callable | str:
    """TRL's fused LM head as SFTTrainer runs it: log-probs (with entropy and top-1, its metrics) of the non-ignored
    rows only, loss = -sum / count; or why there is none."""
    try:  # this module alone: it needs torch and transformers, not TRL's other dependencies (GPU kit: --no-deps)
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError as e:
        return f"trl not installed ({e}); pip install trl"

    def loss(hidden, weight, labels):
        mask = labels != IGNORE_INDEX
        log_probs = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0,
                                                 TRL_VOCAB_TILE, None, 1.0, ("log_probs", "entropy", "is_top1"))[0]
        return -log_probs.sum() / mask.sum().clamp(min=1)

    return loss


def _module_fn(module: torch.nn.Module) -> Callable:
    """Call a module with our weight tensor as its parameter, so every implementation trains the same leaf."""
    return lambda x, w: torch.func.functional_call(module, {"weight": w}, (x,))


def _build(kernel: str, model: str, tokens: int, dtype: torch.dtype, device: str, peers: list[str]) -> Case:
    s = QWEN25_SHAPES[model]
    dev = torch.device(device)
    b = torch.tensor([], dtype=dtype).element_size()
    randn = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype)  # noqa: E731
    liger = _liger(device) if "liger" in peers else "not requested"
    has_liger = not isinstance(liger, str)
    same_as_eager = "transformers computes this with the same PyTorch ops as the eager row"
    if kernel == "rms_norm":
        H = s["hidden"]
        leaves = [randn(tokens, H), 1 + 0.1 * randn(H)]
        others, dys = [], [randn(tokens, H)]
        eager, ours = K.rms_norm_reference, K.rms_norm
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

        hf = _module_fn(Qwen2RMSNorm(H, eps=1e-6).to(dev, dtype))
        lig = liger.rms_norm(H, dtype) if has_liger else liger
        act, vec = tokens * H * b, H * b
        moved = {"fwd": 2 * act + vec, "bwd": 3 * act + 2 * vec}
        flops = {}
    elif kernel == "rope":
        Hq, Hk, D = s["heads"], s["kv_heads"], s["head_dim"]
        # Qwen2Attention's layout: projections viewed [B, T, H, D] and transposed to [B, H, T, D]
        leaves = [randn(1, tokens, Hq, D), randn(1, tokens, Hk, D)]
        inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
        angles = torch.arange(tokens, device=dev, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((angles, angles), -1)[None]
        others = [emb.cos().to(dtype), emb.sin().to(dtype)]
        dys = [randn(1, Hq, tokens, D), randn(1, Hk, tokens, D)]
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        heads_first = lambda f: lambda q, k, c, sn: f(q.transpose(1, 2), k.transpose(1, 2), c, sn)  # noqa: E731
        eager, ours, hf = (
            heads_first(K.apply_rope_reference),
            heads_first(K.apply_rope),
            heads_first(apply_rotary_pos_emb),
        )
        lig = heads_first(liger.rope) if has_liger else liger
        qk, cs = tokens * (Hq + Hk) * D * b, 2 * tokens * D * b
        moved = {"fwd": 2 * qk + cs, "bwd": 2 * qk + cs}
        flops = {}
    elif kernel == "swiglu":
        inter = s["intermediate"]
        leaves, others, dys = [randn(tokens, inter), randn(tokens, inter)], [], [randn(tokens, inter)]
        eager, ours, hf = K.swiglu_reference, K.swiglu, same_as_eager
        lig = liger.swiglu if has_liger else liger
        act = tokens * inter * b
        moved = {"fwd": 3 * act, "bwd": 5 * act}
        flops = {}
    elif kernel == "cross_entropy":
        V = s["vocab"]
        labels = torch.randint(0, V, (tokens,), device=dev)
        labels[::10] = IGNORE_INDEX  # prompt tokens carry no loss in SFT
        leaves, others, dys = [randn(tokens, V)], [labels], None
        eager, ours, hf = K.cross_entropy_reference, K.cross_entropy, same_as_eager
        lig = liger.cross_entropy if has_liger else liger
        # one read of the logits (forward); the fused kernels also write the gradient once (forward+backward)
        moved = {"fwd": tokens * V * b, "fwd_bwd": 2 * tokens * V * b}
        flops = {}
    elif kernel == "fused_linear_cross_entropy":
        H, V = s["hidden"], s["vocab"]
        labels = torch.randint(0, V, (tokens,), device=dev)
        labels[::10] = IGNORE_INDEX
        leaves, others, dys = [randn(tokens, H), 0.02 * randn(V, H)], [labels], None
        eager, ours, hf = K.fused_linear_cross_entropy_reference, K.fused_linear_cross_entropy, same_as_eager
        lig = liger.fused_linear_cross_entropy if has_liger else liger
        moved = {}
        flops = {"fwd": 2 * tokens * H * V, "bwd": 4 * tokens * H * V, "fwd_bwd": 6 * tokens * H * V}
    else:
        raise ValueError(f"bench kernels: unknown kernel {kernel!r}; expected one of {KERNELS}")
    for t in leaves:
        t.requires_grad_(True)
    if "fwd" in moved and "bwd" in moved:
        moved["fwd_bwd"] = moved["fwd"] + moved["bwd"]
    impls: dict[str, Callable | str] = {"s1fast": ours}
    trl = "TRL has a fused LM head only" if kernel != "fused_linear_cross_entropy" else None
    trl = trl or (_trl_lm_head() if "trl" in peers else "not requested")
    candidates = {"eager": eager, "compile": eager, "liger": lig, "hf": hf, "trl": trl}
    for peer in peers:
        impl = candidates[peer]
        if peer == "compile" and callable(impl):
            torch._dynamo.reset()  # fresh compile for every shape: no recompile limit, no stale guards
            impl = torch.compile(impl, dynamic=False)
        impls[peer] = impl
    return Case(kernel, model, tokens, leaves, others, dys, impls, moved, flops)


def _backend(impl: str, case: Case) -> str:
    if impl == "compile":
        return "inductor"
    if impl == "liger" or (impl == "trl" and case.leaves[0].is_cuda):
        return "triton"
    if impl == "s1fast" and use_triton(case.leaves[0]):
        return "triton" if case.leaves[0].is_cuda else "triton-interpreter"
    return "torch"


def _backward(out, dys: list[torch.Tensor] | None) -> None:
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    torch.autograd.backward(outs, grad_tensors=dys)


def _measure(case: Case, name: str, fn: Callable, device: str, quick: bool, ceilings: dict) -> dict:
    args = [*case.leaves, *case.others]
    leaves = case.leaves

    def fwd():
        with region(f"kernels/{case.kernel}/{name}/forward"):
            return fn(*args)

    def bwd(out):
        with region(f"kernels/{case.kernel}/{name}/backward"):
            _backward(out, case.dys)

    def fwd_bwd():
        bwd(fwd())

    for t in leaves:
        t.grad = None
    fwd_bwd()  # warm-up / compile outside every timing
    row = {"fwd_ms": time_ms(fwd, device=device, quick=quick)}
    # A fused backward may consume what its forward saved (e.g. scale the gradient in place), so backward
    # cannot be re-run on one graph: every timed backward gets a fresh forward, run outside the timed region.
    row["bwd_ms"] = time_ms(bwd, device=device, quick=quick, grad_to_none=leaves, setup=fwd)
    row["fwd_bwd_ms"] = time_ms(fwd_bwd, device=device, quick=quick, grad_to_none=leaves)
    for t in leaves:
        t.grad = None
    mem = memory_profile(fwd_bwd, device=device)  # empty on CPU under --profile
    if mem:
        grads_mib = sum(t.numel() * t.element_size() for t in leaves) / 2**20
        row["peak_mem_mib"] = mem["peak_mib"]
        row["extra_mem_mib"] = mem["peak_mib"] - grads_mib
    if "largest_alloc_mib" in mem:
        row["largest_alloc_mib"] = mem["largest_alloc_mib"]
    for phase, nbytes in case.moved_bytes.items():
        row[f"{phase}_moved_mib"] = nbytes / 2**20
        row[f"{phase}_gbps"] = nbytes / row[f"{phase}_ms"] / 1e6
    if "fwd_bwd" in case.moved_bytes:
        row["fwd_bwd_pct_of_copy_bw"] = 100 * row["fwd_bwd_gbps"] / ceilings["copy_gbps"]
    if "fwd_bwd" in case.flops:
        row["fwd_bwd_tflops"] = case.flops["fwd_bwd"] / row["fwd_bwd_ms"] / 1e9
        row["fwd_bwd_pct_of_matmul"] = 100 * row["fwd_bwd_tflops"] / ceilings["matmul_tflops"]
    return row


def _compare(case_rows: list[dict]) -> None:
    """Speed and memory against the eager row of the same shape, on every measured row, once eager is measured."""
    eager = next((r for r in case_rows if r["impl"] == "eager" and "fwd_bwd_ms" in r), None)
    for r in case_rows if eager else ():
        if "fwd_bwd_ms" in r:
            r["fwd_bwd_speedup_vs_eager"] = eager["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        if eager.get("peak_mem_mib") and "peak_mem_mib" in r:
            r["peak_mem_ratio_vs_eager"] = r["peak_mem_mib"] / eager["peak_mem_mib"]


def run(*, device: str, quick: bool, peers: list[str], headline: bool = False) -> Iterator[dict]:
    """Bench-suite entry point (see the module docstring for every figure): yields each row as it is measured
    (earlier rows of a shape gain ``*_vs_eager`` when its eager row is measured)."""
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"bench kernels: unknown peers {unknown}; expected some of {PEERS}")
    from tqdm import tqdm

    ceilings = device_ceilings(device, quick=quick)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    work = [(k, m, t) for k, grid in shapes(device, quick, headline).items() for m, t in grid]
    for kernel, model, tokens in tqdm(work, desc="kernels", unit="shape", leave=False):
        case = _build(kernel, model, tokens, dtype, device, peers)
        base = {"suite": "kernels", "kernel": kernel, "model": model, "tokens": tokens,
                "dtype": str(dtype).replace("torch.", "")}
        if kernel in ("cross_entropy", "fused_linear_cross_entropy"):
            base["full_logits_fp32_mib"] = tokens * QWEN25_SHAPES[model]["vocab"] * 4 / 2**20
        case_rows = []
        for name, impl in case.impls.items():
            if isinstance(impl, str):
                row = dict(base, impl=name, skipped=impl)
            else:
                try:
                    row = dict(base, impl=name, backend=_backend(name, case),
                               **_measure(case, name, impl, device, quick, ceilings))
                    if kernel == "fused_linear_cross_entropy" and name == "s1fast":
                        row.update(weight_grad_gemm())  # the GEMM path behind its memory figure
                except torch.OutOfMemoryError:
                    row = dict(base, impl=name, skipped="out of memory")
                finally:
                    for t in case.leaves:
                        t.grad = None
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
            case_rows.append(row)
            _compare(case_rows)
            yield row
        del case


def backend_note() -> str:
    """How the s1fast rows ran on this machine (printed with the results)."""
    if torch.cuda.is_available():
        return "s1fast rows: Triton kernels on CUDA"
    if interpreting():
        return "s1fast rows: Triton kernels through TRITON_INTERPRET=1 (interpreter: correctness, not speed)"
    return "s1fast rows: the kernels' PyTorch paths (CPU without TRITON_INTERPRET)"
