"""Memory plan of an ``s1fast train`` run: what each GPU holds, at its peak, for a model shape and a set-up.

No GPU is needed: the plan is arithmetic on the model's config. Entry points:

- :class:`Shape` (a decoder's sizes, ``Shape.from_config``; :func:`qwen25_shapes`) and :class:`Setup` (ranks, row
  length, dtype, memory options) describe the run;
- :func:`plan` counts what each rank holds (the model of memory is in its docstring) and returns a :class:`Plan`;
  :func:`render` prints it as a table and a verdict, :func:`advice` says what to change when it does not fit;
- :func:`fits_unsynced_gradients`: the trainer's ``grad_sync="auto"``.

Checked against measured peaks of small configurations on CPU (tests/test_train_scale.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

GiB = 2**30
CONTEXT_BYTES = int(1.5 * GiB)  # CUDA context, cuBLAS workspaces and NCCL buffers, outside the caching allocator
FRAGMENTATION = 0.10  # of the peak: the caching allocator's fragmentation (see plan)


@dataclass(frozen=True)
class Shape:
    """A Qwen2 / Qwen3 decoder's sizes."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = True  # Qwen2 / 2.5
    qk_norm: bool = False  # Qwen3

    @classmethod
    def from_config(cls, config) -> Shape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        qwen3 = getattr(config, "model_type", "") == "qwen3"
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   head_dim, config.intermediate_size, config.vocab_size, bool(config.tie_word_embeddings),
                   qkv_bias=not qwen3 and getattr(config, "attention_bias", True) is not False, qk_norm=qwen3)

    @classmethod
    def from_sizes(cls, sizes: dict) -> Shape:
        """From a ``s1fast.model.shapes.QWEN25_SHAPES`` entry."""
        return cls(sizes["layers"], sizes["hidden"], sizes["heads"], sizes["kv_heads"], sizes["head_dim"],
                   sizes["intermediate"], sizes["vocab"], sizes["tied"])

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        n = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h
        return n + (q + 2 * kv if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.root_params + self.layers * self.layer_params


# Qwen2.5 sizes not in s1fast.model.shapes.QWEN25_SHAPES (from their config.json)
MORE_QWEN25 = {
    "3B": dict(layers=36, hidden=2048, heads=16, kv_heads=2, head_dim=128, intermediate=11008, vocab=151936, tied=True),
    "14B": dict(
        layers=48, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=13824, vocab=152064, tied=False
    ),
}


def qwen25_shapes() -> dict[str, Shape]:
    """Qwen2.5 0.5B to 32B by size name, smallest first."""
    from s1fast.model.shapes import QWEN25_SHAPES

    sizes = {**QWEN25_SHAPES, **MORE_QWEN25}
    return {name: Shape.from_sizes(sizes[name]) for name in sorted(sizes, key=lambda n: float(n[:-1]))}


@dataclass(frozen=True)
class Setup:
    """How the model is trained: ranks, the longest row in tokens, compute dtype and the memory options."""

    world: int = 1
    tokens: int = 32768
    dtype_bytes: int = 2  # bf16 compute (4: fp32)
    checkpointing: bool = False
    cpu_offload: bool = False
    sync_last: bool = False  # gradient sync only after the last micro-batch of several
    micro_batches: int = 1  # rows each rank runs per optimizer step (several: gradients are held between them)
    device: str = "cuda"  # the loss kernel's chunk budget and path follow the device


@dataclass
class Plan:
    shape: Shape
    setup: Setup
    rows: list[tuple[str, int, str]]  # (what, bytes, how it is counted)
    moments: dict[str, int]  # the four moments' totals
    peak: int  # the largest moment (bytes the allocator hands out)
    total: int  # peak + allocator margin: what the GPU must have

    def fits(self, gpu_bytes: int) -> bool:
        return self.total <= gpu_bytes


def layer_activation_bytes(shape: Shape, tokens: int, b: int, device: str = "cuda") -> int:
    """What one patched decoder layer saves for backward at ``tokens`` tokens (see :func:`plan`), with the
    fp32 statistics (two RMSNorm rstd rows, the attention's log-sum-exp per head). On CPU the kernels' PyTorch
    path also keeps both norms' normalised rows and silu(gate): ``2H + I`` more per token."""
    s = shape
    elements = 4 * s.hidden + (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim + 3 * s.intermediate
    if device != "cuda":
        elements += 2 * s.hidden + s.intermediate
    return tokens * (elements * b + (2 + s.heads) * 4)


def loss_chunk_bytes(shape: Shape, setup: Setup) -> int:
    """The fused loss's logits chunk, as the kernel sizes it; its PyTorch path (CPU) also holds an fp32 row
    temporary per token, and an fp32 copy of the chunk when the compute dtype is not fp32."""
    import torch

    from s1fast.kernels.fused_linear_cross_entropy import DEFAULT_CHUNK_BUDGET_BYTES, chunk_rows

    triton, b = setup.device == "cuda", setup.dtype_bytes
    dtype = torch.float32 if b == 4 else torch.bfloat16
    rows = chunk_rows(setup.tokens, shape.vocab, dtype, triton, DEFAULT_CHUNK_BUDGET_BYTES[setup.device])
    return rows * shape.vocab * (b if triton else b + 4 + (0 if b == 4 else 4))


def plan(shape: Shape, setup: Setup) -> Plan:
    """The memory plan of ``shape`` trained under ``setup``.

    What it counts, per rank (``W`` ranks, ``P`` parameters, ``L`` decoder layers of ``Pl`` parameters, a root unit of
    ``Pr`` parameters: embedding, final norm and an untied ``lm_head``; ``b`` bytes per element of the compute dtype;
    ``T`` tokens in the longest micro-batch row):

    - parameter shards: fp32 master weights, ``4 P / W``;
    - gradient shards: fp32, ``4 P / W``, from the end of backward to the optimizer step;
    - optimizer state: AdamW's two fp32 moments, ``8 P / W`` (the three above live in host memory with CPU offload:
      ``16 P / W`` per rank there);
    - gathered parameters: FSDP2 all-gathers each unit in the compute dtype; the root and the last layer stay gathered
      from forward to backward, one more layer is in flight (every layer stays gathered with one rank and no offload, as
      nothing is resharded then): ``b (Pr + 2 Pl)``;
    - unreduced gradients: with gradient sync only after the last micro-batch, FSDP2 accumulates every parameter's full
      gradient in fp32 until then, ``4 P`` (the root's still at its reduction, the end of backward); with several
      micro-batches per step and sync on every one, the gradient shards are held between them instead;
    - activations at ``T`` tokens: what the patched decoder layer saves for backward,
      ``T (4H + (h + 2k) d + h d + 3I) b`` per layer (inputs of the two norms and their outputs, rotated q and k, v, the
      attention output, which flash and SDPA kernels write token-major so that o_proj reads it without a copy, gate, up
      and SwiGLU output, for ``h`` query and ``k`` key-value heads of size ``d``, hidden size ``H``, MLP size ``I``), in
      every layer; with activation checkpointing only each layer's input ``T H b`` plus one layer recomputed in
      backward. Plus the backward's working set, ``2 T I b`` (SwiGLU's two input gradients while the layer's tensors
      still live). Attention runs in flash / SDPA kernels whose memory is linear in ``T``;
    - the fused loss: its logits chunk (``chunk_rows`` of the kernel, 1 GiB on CUDA) during forward, and the gradients
      it computes in forward and holds until backward: ``T H b`` for the hidden states and the fp32 ``lm_head``
      gradient, ``4 V H``;
    - communication buffers: a layer's gradients before the reduce-scatter, in the compute dtype and in fp32,
      ``(b + 4) Pl`` (at the root's reduction at the end of backward, ``(b + 4) Pr``);
    - allocator margin: 10% of the peak for the caching allocator's fragmentation, plus 1.5 GiB of CUDA context and NCCL
      buffers outside it.

    The peak is the largest of four moments: the end of forward (the loss chunk), the start of backward (activations,
    the recomputed layer, its working set), the end of backward (all gradient shards and the root's reduction) and the
    optimizer step (shards, gradients, moments and AdamW's one temporary per parameter).
    """
    s, u, b = shape, setup, setup.dtype_bytes
    P, Pl, Pr, W, T = s.params, s.layer_params, s.root_params, setup.world, setup.tokens
    on_gpu = 0 if u.cpu_offload else 1
    params = on_gpu * 4 * math.ceil(P / W)
    grads = on_gpu * 4 * math.ceil(P / W)
    optim = on_gpu * 8 * math.ceil(P / W)
    resharded = W > 1 or u.cpu_offload  # the trainer's reshard_after_forward
    gathered = b * (Pr + (2 if resharded else s.layers) * Pl)
    unreduced = 4 * P if u.sync_last and u.micro_batches > 1 else 0
    layer = layer_activation_bytes(s, T, b, u.device)
    shared = 2 * T * s.head_dim * b + T * s.hidden * b * (1 if u.device == "cuda" else 2)  # cos / sin, the final norm
    if u.checkpointing:
        act_forward = s.layers * T * s.hidden * b + shared
        act_backward = act_forward + layer - T * s.hidden * b  # the recomputed layer's input is already there
    else:
        act_forward = act_backward = s.layers * layer + shared
    work = 2 * T * s.intermediate * b
    loss_held = T * s.hidden * b + 4 * s.vocab * s.hidden
    chunk = loss_chunk_bytes(s, u)
    comm_layer = (b + 4) * Pl
    comm_root = (b + 4) * Pr
    adam_temp = on_gpu * 4 * math.ceil(P / W)
    loss_cast = 0 if b == 4 else s.vocab * s.hidden * (b + (0 if u.device == "cuda" else 4))
    held = (unreduced if u.sync_last else grads) if u.micro_batches > 1 else 0  # from earlier micro-batches
    base = params + optim + gathered + held
    moments = {
        "end of forward": base + act_forward + loss_held + chunk,
        "start of backward": base + act_backward + work + loss_held + loss_cast + comm_layer,
        "end of backward": params + optim + grads + b * Pr + comm_root + (4 * Pr if unreduced else 0),
        "optimizer step": params + grads + optim + adam_temp,
    }
    peak = max(moments.values())
    margin = int(FRAGMENTATION * peak) + (CONTEXT_BYTES if u.device == "cuda" else 0)
    where = "host (CPU offload)" if u.cpu_offload else f"4 B x {P / 1e9:.2f}B / {W}"
    rows = [
        ("parameter shards (fp32)", params, where),
        ("gradient shards (fp32)", grads, where),
        ("AdamW moments (fp32)", optim, "8 B x params / ranks" if on_gpu else "host (CPU offload)"),
        ("gathered parameters", gathered, f"{b} B x (root + {'2 layers' if resharded else 'all layers'})"),
        (
            "unreduced gradients (sync on last)",
            unreduced,
            "4 B x all params" if unreduced else "none: sync on every micro-batch",
        ),
        (
            f"activations at {T:,} tokens",
            act_backward,
            "layer inputs + 1 recomputed layer" if u.checkpointing else f"{s.layers} layers saved",
        ),
        ("backward working set", work, "2 x tokens x intermediate"),
        (
            "fused loss: held gradients",
            loss_held + loss_cast,
            "hidden grads + fp32 lm_head grad" + (f" + its {'bf16' if b == 2 else 'fp16'} cast" if loss_cast else ""),
        ),
        ("fused loss: logits chunk", chunk, "end of forward only"),
        ("reduce-scatter buffers: a layer", comm_layer, "its gradients, compute dtype + fp32"),
        ("reduce-scatter buffers: the root", comm_root, "at the end of backward"),
        ("host memory (CPU offload)", 16 * math.ceil(P / W) if u.cpu_offload else 0, "per rank, not on the GPU"),
        (
            "allocator margin",
            margin,
            f"{FRAGMENTATION:.0%} of peak" + (" + CUDA context / NCCL" if u.device == "cuda" else ""),
        ),
    ]
    return Plan(shape, setup, rows, moments, peak, peak + margin)


def advice(shape: Shape, setup: Setup, gpu_bytes: int) -> list[str]:
    """What to change so that the run fits ``gpu_bytes`` per GPU, cheapest first; empty when it fits."""
    if plan(shape, setup).fits(gpu_bytes):
        return []
    out = []
    if setup.sync_last and plan(shape, dataclasses.replace(setup, sync_last=False)).fits(gpu_bytes):
        return ["--grad-sync every (reduce gradients after every micro-batch)"]
    if not setup.checkpointing and plan(shape, dataclasses.replace(setup, checkpointing=True)).fits(gpu_bytes):
        return ["--gradient-checkpointing"]
    checkpointed = dataclasses.replace(setup, checkpointing=True, sync_last=False)
    for world in (2, 4, 8, 16, 32, 64, 128, 256):
        if world > setup.world and plan(shape, dataclasses.replace(checkpointed, world=world)).fits(gpu_bytes):
            out.append(f"{world} GPUs (with --gradient-checkpointing)")
            break
    if not setup.cpu_offload and plan(shape, dataclasses.replace(checkpointed, cpu_offload=True)).fits(gpu_bytes):
        out.append("--cpu-offload (with --gradient-checkpointing)")
    tokens = setup.tokens
    while tokens > 1024 and not plan(shape, dataclasses.replace(checkpointed, tokens=tokens)).fits(gpu_bytes):
        tokens //= 2
    if tokens < setup.tokens and plan(shape, dataclasses.replace(checkpointed, tokens=tokens)).fits(gpu_bytes):
        out.append(f"--block-size {tokens} (with --gradient-checkpointing; longer examples are dropped)")
    return out or ["nothing on this list fits: more GPUs with more memory"]


def gib(n: int) -> str:
    return f"{n / GiB:,.1f} GiB"


def render(p: Plan, gpu_bytes: int) -> str:
    """The plan as a table and a verdict."""
    s, u = p.shape, p.setup
    lines = [
        f"model: {s.params / 1e9:.2f}B parameters ({s.layers} layers, hidden {s.hidden}, vocab {s.vocab:,}, "
        f"{'tied' if s.tied else 'untied'}); {u.world} GPU(s) of {gib(gpu_bytes)}; rows of {u.tokens:,} tokens; "
        f"{'bf16' if u.dtype_bytes == 2 else 'fp32'} compute; "
        f"activation checkpointing {'on' if u.checkpointing else 'off'}; "
        f"CPU offload {'on' if u.cpu_offload else 'off'}; "
        f"up to {u.micro_batches} row(s) per GPU per step, gradient sync "
        f"{'on the last' if u.sync_last else 'on every one'}",
        "",
        f"{'per GPU':<38} {'GiB':>9}  how",
        "-" * 78,
    ]
    lines += [f"{what:<38} {n / GiB:>9.2f}  {how}" for what, n, how in p.rows]
    lines += ["-" * 78] + [f"{'at the ' + name:<38} {n / GiB:>9.2f}" for name, n in p.moments.items()]
    lines += [f"{'peak + margin':<38} {p.total / GiB:>9.2f}  of {gpu_bytes / GiB:.1f}", ""]
    if p.fits(gpu_bytes):
        lines.append(f"verdict: fits ({gib(gpu_bytes - p.total)} to spare)")
    else:
        lines.append(
            f"verdict: does not fit ({gib(p.total - gpu_bytes)} over); change: " + "; or ".join(advice(s, u, gpu_bytes))
        )
    return "\n".join(lines)


def fits_unsynced_gradients(model, config, world: int, device) -> bool:
    """For the trainer's ``grad_sync="auto"``: whether accumulating unreduced gradients until the last micro-batch
    fits this GPU at the run's row size."""
    import torch

    from s1fast.commands import DTYPES
    from s1fast.model.patch import causal_lm

    setup = Setup(world=world, tokens=config.micro_batch_tokens, dtype_bytes=DTYPES[config.param_dtype].itemsize,
                  checkpointing=config.gradient_checkpointing, cpu_offload=config.cpu_offload, sync_last=True,
                  micro_batches=max(2, math.ceil(config.global_batch / world)))
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    return plan(Shape.from_config(causal_lm(model).config), setup).fits(gpu_bytes)
