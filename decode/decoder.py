"""KV-cache decoder for long reasoning traces, with s1 budget forcing inside the decode loop.

``Decoder(model)`` runs the weights of a transformers Qwen2 / Qwen2.5 / Qwen3 causal LM (patched by
``s1fast.model.patch`` or not) through its own lean forward, without copying them: embedding; per layer one
q/k/v GEMM (the model's q/k/v parameters are made views of one buffer, ``s1fast.model.fused_weights``; biases),
Qwen3's q/k norms and rotary fused with the KV-cache write (``rope_kv_write``), grouped-query attention over the
paged KV cache, o_proj, the residual add fused into the RMSNorm (``add_rms_norm``), one gate/up GEMM (fused as
q/k/v), SwiGLU, down_proj, and the residual add fused into the next layer's input norm (the last layer's: the
final norm); lm_head (tied or not). The kernels are ``s1fast.kernels`` (Triton on CUDA; their PyTorch paths on CPU
and for fp64): a one-token step on the Triton attention path is 10 device launches per layer.

The decoder is the engine's runner (``s1fast.decode.engine``): its public runner methods (``start``, ``prefill``,
``step``, ``feed``, ``load``, ``move_row``) run what the engine's ``Scheduler`` decides; ``generate`` and
``stream`` submit their prompts to an ``Engine`` and return what it gives.

Design:
- KV cache: ``s1fast.decode.kv_cache.KVCache``, paged: keys and values live in fixed-size pages, and a page
  table per cache row (``[rows, width]`` int32 on the device) says where each position is. Rows take pages
  as their tokens arrive and give them back when their request ends; a memory budget (``kv_cache_bytes``)
  fixes how many pages exist, and the engine's scheduler (``s1fast.decode.scheduler``) admits and preempts
  requests so that they fit. Without a budget a run gets as many pages as its rows could fill.
- Prefill: the prompts, longest first, in chunks of ``prefill_chunk`` positions; a chunk covers the same
  positions in every row, so attention is causal with a lower-right offset (no materialised mask, flash
  kernels on CUDA). Only each row's last position goes through the lm_head.
- Decode: one token per row per step; attention reads ``cache[..., :L]`` where L is the longest *used*
  length of the active rows (rounded up to one of 8 buckets per octave when CUDA graphs are on). On CUDA
  (and under ``TRITON_INTERPRET=1``) one-token steps run ``s1fast.kernels.decode_attention``: split over
  the sequence so that batch 1 with 2 kv heads still fills the GPU, per-row lengths read on the device, each
  row's keys read only up to its own length, L (the bucket) fixing the grid. Otherwise, and for multi-token
  steps, grouped-query heads are folded into the query axis (``[rows, kv_heads, group * tokens, head_dim]``) so
  keys are never repeated, and attention reads the pages each row holds (``_paged_attention``: the host's page
  lists, no padding to the longest row, no dense copy; rows of very different lengths, as continuous batching
  mixes them, cost what they hold), or, for one row and inside CUDA graphs, SDPA over the rows' pages gathered
  up to L with a per-row mask; the kernel reads the pages through the page table. The attention path, and what
  its layers share (page slots, masks, lengths), is chosen once per forward (``_attention``). Rows that finish
  leave the batch: their pages are freed and the last active row's page-table row moves into the hole (no key
  moves); later steps run on fewer rows.
- On CUDA each (rows, L-bucket) decode step is captured once in a CUDA graph (``flash_attn_with_kvcache``,
  when flash-attn is installed, reads per-row lengths and its block table itself, so one graph per row
  count). The page table is a static tensor that the graph reads: new pages are written into it in place
  (one index_put from pinned memory, stream-ordered before the replay), so capture and replay need nothing
  else; only a new allocation of the cache (a larger run) drops the graphs. The step samples inside the
  graph (``s1fast.decode.sampling``: per-row settings and random keys are static tensors too, one graph per
  sampling mode) and writes its tokens and positions as the next step's inputs. The host reads each step's
  tokens one step late: step k+1 is launched with step k's tokens (on the device) before the host looks at
  them, so the GPU never waits for Python. When the host finds an edit
  (budget forcing, a stop, the length limit), step k+1's guess is discarded for that row: its cache write
  lies past the row's length (in its own pages, or the trash page) and is overwritten by the next step,
  which feeds the edited tokens of every row
  in one multi-token forward (rows padded to the longest edit).
- Budget forcing (``s1fast.decode.budget``) decides per row what is fed next; injected tokens enter the cache
  in that one forward, never by re-running the prompt. The first token of a thinking round is sampled with the
  tokens that end thinking masked (s1's ``min_tokens=1``); such a token always comes from the prefill or from
  an edit's forward, never from a graph step. With ``s1_compat`` a row may decode past its budget and then
  rewind: the edit is fed from the cut position, and the keys past it are never read again (attention reads
  each row only up to its own position).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from s1fast.decode.budget import BudgetForcing
from s1fast.decode.engine import Engine
from s1fast.decode.kv_cache import KVCache
from s1fast.decode.params import Request, SamplingParams
from s1fast.decode.results import GenerationResult, GenerationStream
from s1fast.decode.sampling import Sampling, sample
from s1fast.kernels import add_rms_norm, apply_rope, decode_attention, rms_norm, rope_kv_write, swiglu
from s1fast.kernels._common import FLOAT_DTYPES, interpreting, use_triton
from s1fast.kernels.decode_attention import supports_head_dim
from s1fast.model.fused_weights import fuse_projections, fused_projections
from s1fast.model.patch import causal_lm

try:  # optional: per-row cache lengths inside the kernel, appends new tokens itself
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - flash-attn is not installed on CI
    flash_attn_with_kvcache = None

SUPPORTED_DTYPES = (torch.float64, *FLOAT_DTYPES)  # model dtypes the decoder runs
PAGE_SIZE = 16  # KV positions per page (a power of two): a bf16 Qwen2.5-1.5B page is 448 KiB, waste < 1 page per row
FLASH_PAGE = 256  # flash-attn's paged KV needs pages of a multiple of 256 positions
MAX_ROWS = 64  # Decoder.generate's default row cap: prompts decoded at once (the rest wait for free rows)
SMALL_CPU_MODEL = 100_000_000  # parameters: below, CPU decoding runs on one thread unless told otherwise


def set_cpu_threads(model, threads: int | None = None) -> str | None:
    """Set torch's intra-op threads for decoding ``model``: ``threads`` when given (at most the machine's CPUs); on
    CPU otherwise one for a model under ``SMALL_CPU_MODEL`` parameters, whose per-token matrices are too small to
    split (on 2 shared cores, decoding was measured 2-4x slower with torch's default thread count than with one),
    else torch's default. Returns a one-line note for the user on CPU, None on GPU."""
    cpus = os.cpu_count() or 1  # more threads than CPUs: past some count torch's thread pool crashes the process
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus):
        raise ValueError(f"threads must be None or an int in [1, {cpus}] (this machine's CPUs), got {threads!r}")
    params = list(model.parameters())  # shared (tied) weights once
    if params[0].device.type != "cpu":
        if threads is not None:
            torch.set_num_threads(threads)
        return None
    count = sum(p.numel() for p in params)
    if threads is not None:
        why = "as asked"
    elif count < SMALL_CPU_MODEL:
        threads, why = 1, f"a small model, {count / 1e6:.1f}M parameters; --threads N to change"
    else:
        threads, why = torch.get_num_threads(), "torch's default; --threads N to change"
    torch.set_num_threads(threads)
    return f"decoding on {threads} CPU thread{'s' if threads > 1 else ''} ({why})"


def _generation_eos(lm) -> frozenset[int]:
    """The eos ids of the model's generation config (``generation_config.json``; transformers derives it from
    ``config.json`` when the file is missing, as vLLM does): every request stops on them, as vLLM adds them to
    each request's stop token ids."""
    eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    return frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)


def _bucket(length: int) -> int:
    """``length`` rounded up to one of 8 steps per octave (at least 64): attention reads at most 12.5% more
    keys than used, and a decode from 8K to 16K needs 8 CUDA graphs, not 8K."""
    step = max(64, 1 << max(0, length.bit_length() - 4))
    return -(-length // step) * step


class Decoder:
    """Batched, budget-forced generation over a transformers Qwen2/2.5/3 causal LM's weights.

    Args:
        model: ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` (or a PEFT model wrapping one), any device, dtype
            bf16 / fp16 / fp32 / fp64. Its parameters are used in place; each layer's q/k/v and gate/up parameters
            are made views of one buffer each (``fuse_projections``: same objects, values and state dict, no copy).
        max_seq_len: longest prompt + ``max_new_tokens`` accepted (default: the config's
            ``max_position_embeddings``). The cache is allocated per request for what it needs.
        tokenizer: optional; adds ``text`` / ``thinking`` / ``answer`` to the results.
        prefill_chunk: positions per prefill forward (bounds activation memory for long prompts).
        cuda_graphs: capture decode steps in CUDA graphs (default: on for CUDA).
        attention: "auto" (flash-attn's ``flash_attn_with_kvcache`` for bf16/fp16 on CUDA when installed;
            else s1fast's Triton ``decode_attention`` for one-token steps where the kernels run Triton, see
            ``decode_attention_path``; SDPA for the rest), "flash", "triton" (the Triton decode kernel even
            when flash-attn is installed) or "sdpa" (SDPA only).
        page_size: KV positions per cache page (default ``PAGE_SIZE``, 16; ``FLASH_PAGE``, 256, with flash-attn,
            which needs a multiple of it). See ``s1fast.decode.kv_cache``.
        kv_cache_bytes: the KV cache's memory budget in bytes: it holds ``kv_cache_bytes // page bytes - 1``
            pages, and the engine admits requests (and preempts the newest) so that they fit. Default: no
            budget; each run gets as many pages as its rows could ever fill (a dense cache's worth).
        kv_cache_fraction: on CUDA, the budget as a share of the GPU memory free when the decoder is built
            (vLLM's ``gpu_memory_utilization``, counted on what is free). Not with ``kv_cache_bytes``.

    ``eos_token_ids``: the eos ids of the model's generation config (``generation_config.json``); they end every
    request (and, in budget forcing, a thinking round), added to its ``stop_token_ids`` as vLLM adds them.
    """

    def __init__(
        self,
        model,
        *,
        max_seq_len: int | None = None,
        tokenizer=None,
        prefill_chunk: int = 2048,
        cuda_graphs: bool | None = None,
        attention: str = "auto",
        page_size: int | None = None,
        kv_cache_bytes: int | None = None,
        kv_cache_fraction: float | None = None,
    ):
        lm = causal_lm(model)
        cfg = lm.config
        core = lm.model
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"Decoder: only full attention is supported, the config has layer_types={layer_types}"
            )
        if cfg.hidden_act != "silu":
            raise NotImplementedError(
                f"Decoder: only SiLU MLPs (SwiGLU) are supported, got hidden_act={cfg.hidden_act!r}"
            )
        self.config = cfg
        self.tokenizer = tokenizer
        self.embed = core.embed_tokens.weight
        self.dtype, self.device = self.embed.dtype, self.embed.device
        if self.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Decoder: model dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype}")
        self.vocab = self.embed.shape[0]
        self.eos_token_ids = frozenset(t for t in _generation_eos(lm) if 0 <= t < self.vocab)  # ones it can make
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        self.eps = cfg.rms_norm_eps
        self.max_seq_len = cfg.max_position_embeddings if max_seq_len is None else max_seq_len
        if isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int) or self.max_seq_len < 2:
            raise ValueError(f"Decoder: max_seq_len must be an int >= 2, got {max_seq_len!r}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"Decoder: prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        linears = [lm.lm_head] + [getattr(layer.self_attn, f"{x}_proj") for layer in core.layers for x in "qkvo"]
        linears += [getattr(layer.mlp, f"{x}_proj") for layer in core.layers for x in ("gate", "up", "down")]
        if not all(isinstance(m, torch.nn.Linear) for m in linears):
            kinds = sorted({type(m).__name__ for m in linears if not isinstance(m, torch.nn.Linear)})
            raise TypeError(f"Decoder: the projections must be plain nn.Linear, found {kinds} (merge adapters first, "
                            "e.g. PEFT's merge_and_unload())")
        fuse_projections(lm)  # q/k/v and gate/up become views of one buffer each: one GEMM apiece, no copy
        self.layers = []
        for layer in core.layers:
            att, fused = layer.self_attn, fused_projections(layer)
            self.layers.append(SimpleNamespace(
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                qkv=fused.qkv, qkv_b=fused.qkv_bias, o=att.o_proj.weight, o_b=att.o_proj.bias,
                q_norm=getattr(getattr(att, "q_norm", None), "weight", None),
                k_norm=getattr(getattr(att, "k_norm", None), "weight", None),
                gate_up=fused.gate_up, down=layer.mlp.down_proj.weight,
            ))
        self.inter = cfg.intermediate_size
        self.norm = core.norm.weight
        self.lm_head = lm.lm_head.weight
        places = {(t.device, t.dtype) for t in self._weights()}
        if len(places) > 1:
            raise ValueError(f"Decoder: all weights must share one device and dtype, found {sorted(map(str, places))}")
        self._rotary = core.rotary_emb

        if attention not in ("auto", "sdpa", "flash", "triton"):
            raise ValueError(f"Decoder: attention must be 'auto', 'sdpa', 'flash' or 'triton', got {attention!r}")
        flash_ok = (
            flash_attn_with_kvcache is not None
            and self.device.type == "cuda"
            and self.dtype in (torch.float16, torch.bfloat16)
        )
        if attention == "flash" and not flash_ok:
            raise ValueError(
                "Decoder: attention='flash' needs flash-attn installed, a CUDA model and bf16/fp16 weights"
            )
        self.flash = flash_ok and attention in ("auto", "flash")
        self._kernel_ok = (
            attention in ("auto", "triton") and self.dtype in FLOAT_DTYPES and supports_head_dim(self.head_dim)
        )
        if attention == "triton" and not (self._kernel_ok and (self.device.type == "cuda" or interpreting())):
            raise ValueError("Decoder: attention='triton' needs a CUDA model (or TRITON_INTERPRET=1), bf16/fp16/fp32 "
                             f"weights and a power-of-two head_dim in [16, 256]; got {self.device.type}, {self.dtype}, "
                             f"head_dim={self.head_dim}")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("Decoder: cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.cache = KVCache(layers=len(self.layers), kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=self.dtype,
                             device=self.device, flash=self.flash,
                             page_size=self._check_page_size(page_size))
        self.cache.budget_pages = self._budget_pages(kv_cache_bytes, kv_cache_fraction)
        self._cos = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None

    def _check_page_size(self, page_size) -> int:
        if page_size is None:
            return FLASH_PAGE if self.flash else PAGE_SIZE
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"Decoder: page_size must be None or an int >= 1, got {page_size!r}")
        if self.flash and page_size % FLASH_PAGE:
            raise ValueError(f"Decoder: with flash-attn, page_size must be a multiple of {FLASH_PAGE}, got {page_size}")
        return page_size

    def _budget_pages(self, kv_cache_bytes, kv_cache_fraction) -> int | None:
        """Pages of the memory budget (page 0, the trash page, inside it); None without a budget."""
        if kv_cache_bytes is not None and kv_cache_fraction is not None:
            raise ValueError("Decoder: give kv_cache_bytes or kv_cache_fraction, not both")
        if kv_cache_bytes is not None:
            if isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 1:
                raise ValueError(f"Decoder: kv_cache_bytes must be None or an int >= 1, got {kv_cache_bytes!r}")
            budget, what = kv_cache_bytes, f"kv_cache_bytes={kv_cache_bytes}"
        elif kv_cache_fraction is not None:
            if isinstance(kv_cache_fraction, bool) or not isinstance(kv_cache_fraction, (int, float)) \
                    or not 0 < kv_cache_fraction <= 1:
                raise ValueError(f"Decoder: kv_cache_fraction must be None or a number in (0, 1], "
                                 f"got {kv_cache_fraction!r}")
            if self.device.type != "cuda":
                raise ValueError("Decoder: kv_cache_fraction needs a CUDA model (a share of the GPU's free memory); "
                                 "use kv_cache_bytes on other devices")
            budget = int(torch.cuda.mem_get_info(self.device)[0] * kv_cache_fraction)
            what = f"kv_cache_fraction={kv_cache_fraction} ({budget} bytes free now)"
        else:
            return None
        pages = budget // self.cache.page_bytes - 1
        if pages < 1:
            raise ValueError(f"Decoder: {what} holds fewer than 2 KV pages of {self.cache.page_bytes} bytes "
                             f"({self.cache.page_size} tokens); raise it or lower page_size")
        return pages

    @property
    def decode_attention_path(self) -> str:
        """The attention of one-token decode steps as things stand (the kernels' backend can be forced per block,
        ``s1fast.kernels.force_backend``): "flash", "triton" (``decode_attention``) or "sdpa"."""
        if self.flash:
            return "flash"
        return "triton" if self._kernel_ok and use_triton(self.embed) else "sdpa"

    # --- memory ----------------------------------------------------------------------------------------

    def _weights(self) -> list[torch.Tensor]:
        layers = [t for layer in self.layers for t in vars(layer).values() if t is not None]
        return [self.embed, self.norm, self.lm_head, *layers]

    def kv_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token

    def memory(self) -> dict:
        """Bytes held: the model's weights the decoder reads (shared tensors once), the KV cache's pages (all of
        them, ``kv_cache_bytes``; those rows hold now and at the run's peak, ``kv_bytes_in_use`` /
        ``kv_bytes_peak``; page counts), the buffers (rotary table, step inputs, sampling rows, page table). CUDA
        graphs' private pools come on top on CUDA."""
        unique = {t.data_ptr(): t for t in self._weights()}.values()  # a tied lm_head once
        weights = sum(t.numel() * t.element_size() for t in unique)
        cache = self.cache.memory()
        buffers = 0 if self._cos is None else sum(
            t.numel() * t.element_size()
            for t in (self._cos, self._sin, self._ids, self._pos, self._arange, self._sampling, self._keys,
                      self.cache.table)
        )
        total = weights + cache["kv_cache_bytes"] + buffers
        return {"weights_bytes": weights, **cache, "buffers_bytes": buffers, "total_bytes": total,
                "kv_bytes_per_token": self.kv_bytes_per_token()}

    def release(self) -> None:
        """Free the KV cache, buffers and CUDA graphs (the next request allocates them again)."""
        self.cache.release()
        self._cos = None
        self._graphs.clear()

    def _ensure_cache(self, rows: int, positions: int) -> None:
        """A cache (emptied) and buffers for a run of up to ``rows`` rows of ``positions`` positions."""
        if self.cache.ensure(rows, positions):
            self._graphs.clear()
        positions, rows = self.cache.positions, self.cache.table.shape[0]
        if self._cos is not None and self._cos.shape[0] >= positions and self._ids.shape[0] >= rows:
            return
        dev = self.device
        cos, sin = self._rotary(self.embed, torch.arange(positions, device=dev)[None])
        self._cos, self._sin = cos[0], sin[0]
        self._ids = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self._arange = torch.arange(max(rows, positions), device=dev)
        self._sampling = torch.zeros(rows, 3, dtype=torch.float32, device=dev)  # per row: Sampling.row()
        self._keys = torch.zeros(rows, dtype=torch.long, device=dev)
        self._graphs.clear()

    # --- the runner: what ``s1fast.decode.engine`` runs, rows and positions chosen by its scheduler ----------

    @torch.inference_mode()
    def start(self, rows: int, positions: int) -> KVCache:
        """A new run of up to ``rows`` rows of up to ``positions`` positions: the cache (emptied; its pages are the
        scheduler's to hand out) and the buffers, made as inference tensors (the loop runs in inference mode: a
        normal tensor there pays view and version-counter tracking on every slice, 5% of a small model's CPU
        decode step). Returns the cache."""
        self._ensure_cache(rows, _bucket(positions))
        return self.cache

    def prefill(self, row0: int, prompts: list[list[int]], settings: list[Sampling], positions: list[int],
                banned: list[Collection[int]]) -> torch.Tensor:
        """Fill cache rows row0.. with ``prompts`` (longest first; the rows hold their pages) whose requests
        sample with ``settings``; their first tokens (going to ``positions``, never one of ``banned``)."""
        rows = slice(row0, row0 + len(settings))
        self._sampling[rows] = torch.tensor([s.row() for s in settings], dtype=torch.float32)
        self._keys[rows] = torch.tensor([s.key for s in settings])
        logits = self._prefill(prompts, row0)
        return self._sample(logits, row0, positions, banned, max(s.mode for s in settings))

    def load(self, tokens: torch.Tensor, positions: list[int]) -> Callable[[], list[int]]:
        """The next step's inputs: ``tokens`` [n] going to ``positions`` on rows 0..n-1; their ``fetch``."""
        n = len(positions)
        self._ids[:n, 0] = tokens
        self._pos[:n] = torch.tensor(positions)
        return self._fetch(tokens)

    def step(self, n: int, kv_len: int, mode: int) -> Callable[[], list[int]]:
        """One decode step of rows 0..n-1 (attention over cache positions ``< kv_len``, sampling ``mode``): each
        row's loaded token goes in, its next token is sampled and loaded for the step after; that token's
        ``fetch`` (the host reads it without making the device wait)."""
        self._decode(n, kv_len, mode)
        return self._fetch(self._ids[:n, 0])

    def feed(self, tokens: list[list[int]], starts: list[int], banned: list[Collection[int]],
             mode: int) -> torch.Tensor:
        """Feed rows 0..n-1 their ``tokens`` (one or several each, an edit) from positions ``starts`` in one
        forward, padded to the longest; each row's next token (never one of ``banned``)."""
        width = max(map(len, tokens))
        ids = torch.tensor([f + f[-1:] * (width - len(f)) for f in tokens], device=self.device)
        last = torch.tensor([len(f) - 1 for f in tokens], device=self.device)
        logits = self._forward(ids, torch.tensor(starts, device=self.device), max(starts) + width, last)
        return self._sample(logits, 0, [p + len(f) for p, f in zip(starts, tokens)], banned, mode)

    def move_row(self, src: int, dst: int) -> None:
        """Row ``src``'s sampling settings become row ``dst``'s (the scheduler moved its pages)."""
        self._sampling[dst] = self._sampling[src]
        self._keys[dst] = self._keys[src]

    def synchronize(self) -> None:
        """Wait for the device (for timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _sample(self, logits: torch.Tensor, row0: int, positions: list[int], banned: list[Collection[int]],
                mode: int) -> torch.Tensor:
        """Tokens for cache rows row0.. from their ``logits`` (their tokens going to ``positions``), each row's
        ``banned`` tokens masked (the first token of a thinking round never ends it: s1's vLLM min_tokens=1)."""
        masked = [(s, t) for s, ban in enumerate(banned) for t in sorted(ban)]
        if masked:
            at = torch.tensor(masked, device=self.device)
            logits[at[:, 0], at[:, 1]] = float("-inf")
        rows = slice(row0, row0 + len(positions))
        return sample(logits, self._sampling[rows], self._keys[rows], torch.tensor(positions, device=self.device),
                      mode)

    def check_fits(self, fn: str, requests: list[Request]) -> None:
        """With a KV budget: every request fits in it alone (else it could never run), or a ValueError naming it."""
        budget = self.cache.budget_pages
        if budget is None:
            return
        for i, r in enumerate(requests):
            positions = r.positions(self.max_seq_len)
            if self.cache.pages_for(positions) > budget:
                which = f"prompts[{i}]" if len(requests) > 1 else "the request"
                raise ValueError(
                    f"{fn}: {which} may need {positions} KV positions (prompt {len(r.prompt)}, max_new_tokens "
                    f"{r.max_new_tokens} and budget forcing's room) = {self.cache.pages_for(positions)} pages of "
                    f"{self.cache.page_size}, but the KV budget holds {budget} pages; lower max_new_tokens or raise "
                    "kv_cache_bytes"
                )

    # --- the forward -----------------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, start: int | torch.Tensor, kv_len: int, last: torch.Tensor | None,
                 row0: int = 0) -> torch.Tensor:
        """Run ``ids`` [n, T] of cache rows row0..row0+n-1 from position ``start`` (an int: the same for every row, a
        prefill chunk; a tensor [n]: per row), writing their keys/values; attend over cache positions
        ``< kv_len``. Returns logits [n, vocab] at token index ``last`` [n] of each row (None: the last)."""
        n, T = ids.shape
        H, D, inter = self.heads, self.head_dim, self.inter
        qpos = (start + self._arange[:T]).expand(n, T) if isinstance(start, int) else start[:, None] + self._arange[:T]
        attend = self._attention(n, T, start, qpos, kv_len, row0)
        x = F.embedding(ids, self.embed)
        h = rms_norm(x, self.layers[0].ln1, self.eps)
        for i, w in enumerate(self.layers):  # x: the residual stream; h: its norm for the next GEMM
            out = attend(i, F.linear(h, w.qkv, w.qkv_b))
            h, x = add_rms_norm(F.linear(out.reshape(n, T, H * D), w.o, w.o_b), x, w.ln2, self.eps)
            gate_up = F.linear(h, w.gate_up)
            after = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.norm
            mlp = F.linear(swiglu(gate_up[..., :inter], gate_up[..., inter:]), w.down)
            h, x = add_rms_norm(mlp, x, after, self.eps)
        h = h[:, -1] if last is None else h[self._arange[:n], last]
        return F.linear(h, self.lm_head)

    def _attention(self, n: int, T: int, start: int | torch.Tensor, qpos: torch.Tensor, kv_len: int,
                   row0: int) -> Callable:
        """The attention of one forward, chosen once: ``attend(layer, qkv [n, T, (H + 2 Hkv) * D])`` (the fused
        projection) applies Qwen3's q/k norms and rotary, writes k, v to the cache and returns ``[n, T, H, D]``,
        each query seeing its row's keys up to its own position. Everything the layers share (page lists, masks,
        lengths) is computed here, once."""
        cache, G, H, Hkv, D, eps = self.cache, self.group, self.heads, self.kv_heads, self.head_dim, self.eps
        table = cache.table[row0 : row0 + n]
        uniform = isinstance(start, int)
        if self.flash:  # flash-attn writes k, v through the block table itself
            seqlens = torch.full((n,), start, device=self.device) if uniform else start
            seqlens = seqlens.to(torch.int32)
            cos, sin = self._cos[qpos], self._sin[qpos]

            def attend(i, qkv):
                w = self.layers[i]
                q, k, v = qkv.view(n, T, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=2)
                if w.q_norm is not None:
                    q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)
                q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                return flash_attn_with_kvcache(q.transpose(1, 2), cache.k[i], cache.v[i], k=k.transpose(1, 2), v=v,
                                               cache_seqlens=seqlens, block_table=table, causal=True)

            return attend

        def rope(i, qkv):  # q [n, T, H, D]; k and v go into the cache (positions past the table: the trash page)
            w = self.layers[i]
            return rope_kv_write(qkv, self._cos, self._sin, qpos, table, cache.k, cache.v, i, w.q_norm, w.k_norm, eps)

        pages = table[:, : cache.pages_for(kv_len)]
        if not uniform and T == 1 and self.decode_attention_path == "triton":
            lengths = start + 1  # row r sees cache positions <= its token's
            # the split kernel reads the pages through the table
            return lambda i, qkv: decode_attention(rope(i, qkv)[:, 0], cache.k[i], cache.v[i], lengths,
                                                   page_table=pages)[:, None]
        pages = pages.long()
        if uniform:  # a prefill chunk: causal with a lower-right offset, no materialised mask
            causal = dict(attn_mask=None if start == 0 else causal_lower_right(T, kv_len), is_causal=start == 0)

            def attend(i, qkv):
                q = rope(i, qkv).transpose(1, 2)
                kc, vc = cache.gather(i, pages)
                return F.scaled_dot_product_attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], enable_gqa=True,
                                                      **causal).transpose(1, 2)

            return attend
        # per-row positions: query (t, g) of row r sees keys <= qpos[r, t]; grouped-query heads folded into the
        # query axis so keys are never repeated
        if n > 1 and not (T == 1 and self.cuda_graphs):  # one row: nothing to pad, SDPA takes fewer ops
            return self._paged_attention(n, T, qpos, row0, rope)  # (its page lists: not inside a CUDA graph)
        hidden = self._arange[:kv_len] > qpos[:, :, None]  # [n, T, kv_len]
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))
        mask = mask[:, None, :, None, :].expand(n, 1, T, G, kv_len).reshape(n, 1, T * G, kv_len)  # T=1: a view

        def attend(i, qkv):
            q = rope(i, qkv).view(n, T, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(n, Hkv, T * G, D)
            kc, vc = cache.gather(i, pages)
            out = F.scaled_dot_product_attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], attn_mask=mask)
            return out.view(n, Hkv, T, G, D).permute(0, 2, 1, 3, 4)

        return attend

    def _paged_attention(self, n: int, T: int, qpos: torch.Tensor, row0: int, rope: Callable) -> Callable:
        """Attention of rows with per-row positions over the pages each row holds (the host's page lists), not
        over every row padded to the longest: the J pages of the batch are read once each (no padding, no dense
        copy), scores [J, Hkv, T * G, page] are computed page by page, softmaxed per row (scattered into
        [n, pages of the longest row, ...] with -inf in the holes) and the pages' weighted values summed per row."""
        cache, G, Hkv, D = self.cache, self.group, self.kv_heads, self.head_dim
        lists = cache.row_pages[row0 : row0 + n]
        m, dev = max(map(len, lists)), self.device
        row = torch.tensor([r for r, have in enumerate(lists) for _ in have], device=dev)
        col = torch.tensor([c for have in lists for c in range(len(have))], device=dev)
        flat = torch.tensor([page for have in lists for page in have], device=dev)
        kpos = col[:, None] * cache.page_size + self._arange[: cache.page_size]  # [J, page]
        hidden = kpos[:, None, None, :] > qpos[row][:, :, None, None]  # [J, T, 1, page]
        hidden = hidden.expand(-1, T, G, -1).reshape(-1, 1, T * G, cache.page_size)
        scale = D**-0.5

        def attend(i, qkv):
            q = rope(i, qkv).view(n, T, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(n, Hkv, T * G, D)
            keys, values = cache.k[i].index_select(0, flat), cache.v[i].index_select(0, flat)  # [J, Hkv, page, D]
            scores = torch.matmul(q.index_select(0, row) * scale, keys.transpose(-1, -2))
            scores.masked_fill_(hidden, -torch.inf)
            padded = scores.new_full((n, m, Hkv, T * G, cache.page_size), -torch.inf)
            padded[row, col] = scores
            probs = padded.permute(0, 2, 3, 1, 4).reshape(n, Hkv, T * G, -1).softmax(-1)
            probs = probs.view(n, Hkv, T * G, m, cache.page_size).permute(0, 3, 1, 2, 4)[row, col]
            out = q.new_zeros(q.shape).index_add_(0, row, torch.matmul(probs, values))
            return out.view(n, Hkv, T, G, D).permute(0, 2, 1, 3, 4)

        return attend

    def _decode_body(self, n: int, kv_len: int, mode: int) -> None:
        logits = self._forward(self._ids[:n], self._pos[:n], kv_len, None)
        self._pos[:n] += 1
        self._ids[:n, 0] = sample(logits, self._sampling[:n], self._keys[:n], self._pos[:n], mode)

    def _decode(self, n: int, kv_len: int, mode: int) -> None:
        """One step for rows 0..n-1: their tokens ``_ids`` at positions ``_pos`` in, the sampled next tokens
        (``mode``: ``s1fast.decode.sampling``) and their positions out, in place; through a CUDA graph."""
        if not self.cuda_graphs:
            return self._decode_body(n, kv_len, mode)
        key = (n, 0 if self.flash else _bucket(kv_len), mode)
        graph = self._graphs.get(key)
        if graph is None:
            # Warm-up on a side stream (cuBLAS handles, lazy inits), then capture. The warm-ups run the real
            # step (it writes the same keys/values at the same positions again) and their inputs are put back.
            inputs = self._ids[:n].clone(), self._pos[:n].clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode_body(n, key[1] or kv_len, mode)
                    self._ids[:n].copy_(inputs[0])
                    self._pos[:n].copy_(inputs[1])
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._decode_body(n, key[1] or kv_len, mode)
            self._graphs[key] = graph
        graph.replay()

    def _fetch(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Start copying ``tokens`` (as they are now) to the host without waiting; the returned call waits and
        gives the list."""
        if tokens.device.type != "cuda":
            values = tokens.tolist()
            return lambda: values
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def wait() -> list[int]:
            done.synchronize()
            return host.tolist()

        return wait

    # --- generation ------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        budget: BudgetForcing | None = None,
        stream: Callable[[int, list[int]], object] | None = None,
        max_rows: int = MAX_ROWS,
    ) -> GenerationResult:
        """Generate for a batch of prompts (token-id lists, any lengths). ``max_new_tokens`` bounds generated
        plus injected tokens per row; ``temperature=0`` is greedy; ``seed`` makes sampling reproducible (prompt
        ``i`` draws from stream ``i`` of the seed, whatever the other prompts; ``s1fast.decode.sampling``);
        ``stop_token_ids`` (with the model's ``eos_token_ids``) end a row (the stop token is kept), or its thinking
        while it thinks, as in s1; ``budget`` applies s1 budget forcing (every prompt must end with the think
        delimiter);
        ``stream(row, new_token_ids)`` is called as tokens are decided; at most ``max_rows`` prompts are decoded
        at once (the engine refills a row as soon as its prompt finishes; a KV budget, ``kv_cache_bytes``, may
        hold fewer). The settings make a ``SamplingParams``. Returns a ``GenerationResult``."""
        if stream is not None and not callable(stream):
            raise TypeError(
                f"Decoder.generate: stream must be None or a callable (row, new_token_ids), got {type(stream).__name__}"
            )
        run = self.stream(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, stop_token_ids=stop_token_ids, budget=budget, max_rows=max_rows)
        for row, new in run:
            if stream is not None:
                stream(row, new)
        return run.result

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        budget: BudgetForcing | None = None,
        max_rows: int = MAX_ROWS,
    ) -> GenerationStream:
        """``generate`` as an iterator of ``(row, new_token_ids)``; the result is ``.result`` at the end.
        Arguments are checked here, before anything runs."""
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"Decoder.generate: max_rows must be an int >= 1, got {max_rows!r}")
        requests = self.check_requests("Decoder.generate", prompts, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                       stop_token_ids=stop_token_ids, budget=budget)
        engine = Engine(self, max_rows=max_rows)
        engine.enqueue(requests)
        return engine.stream()

    def check_requests(self, fn: str, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                       **settings) -> list[Request]:
        """The checked ``Request`` of each prompt, the prompts sharing ``params`` (or a ``SamplingParams`` of
        ``generate``'s other arguments, ``settings``; prompt ``i`` draws from stream ``i`` of the seed); its token ids
        are checked against the vocabulary and the requests against ``max_seq_len`` and the KV budget; errors name
        ``fn``."""
        prompts = self._check_prompts(prompts)
        if params is None:
            params = SamplingParams.of(fn, **settings)
        elif settings or not isinstance(params, SamplingParams):
            raise TypeError(f"{fn}: params must be a SamplingParams, given without its settings as keywords "
                            f"(got {type(params).__name__}{' and ' + ', '.join(settings) if settings else ''})")
        self._check_ids("stop_token_ids", sorted(params.stop_token_ids))
        if params.budget is not None:
            self._check_ids("budget token ids", sorted(params.budget.token_ids()))
        max_new_tokens = params.max_new_tokens
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        if len(prompts[longest]) + max_new_tokens > self.max_seq_len:
            which = f"prompts[{longest}]" if len(prompts) > 1 else "the prompt"
            raise ValueError(
                f"{fn}: {which} has {len(prompts[longest])} tokens; with max_new_tokens={max_new_tokens} that "
                f"exceeds max_seq_len={self.max_seq_len} (shorten the prompt or max_new_tokens, or raise max_seq_len)"
            )
        if not self.eos_token_ids <= params.stop_token_ids:  # the model's eos ids stop every request (vLLM)
            params = replace(params, stop_token_ids=params.stop_token_ids | self.eos_token_ids)
        requests = [Request(p, params, params.sampling(i)) for i, p in enumerate(prompts)]
        self.check_fits(fn, requests)
        return requests

    def _check_ids(self, name: str, ids: Sequence[int]) -> list[int]:
        out = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab:
                raise ValueError(
                    f"Decoder.generate: {name} must be ints in [0, {self.vocab}) (the vocabulary), got {t!r}"
                )
            out.append(t)
        return out

    def _check_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("Decoder.generate: prompts must be a non-empty list of token-id lists")
        if all(isinstance(p, int) for p in prompts):
            raise ValueError("Decoder.generate: prompts must be a list of token-id lists; for one prompt pass [ids]")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
                raise ValueError(f"Decoder.generate: prompts[{i}] must be a list of token ids, got {type(p).__name__}")
            if not p:
                raise ValueError(f"Decoder.generate: prompts[{i}] is empty; every prompt needs at least one token")
            out.append(self._check_ids(f"prompts[{i}]", p))
        return out

    def _prefill(self, prompts: list[list[int]], row0: int = 0) -> torch.Tensor:
        """Fill cache rows row0..row0+n-1 with ``prompts`` (longest first); logits [n, vocab] after each prompt."""
        lengths = [len(p) for p in prompts]
        logits = torch.empty(len(prompts), self.vocab, dtype=self.dtype, device=self.device)
        for c in range(0, lengths[0], self.prefill_chunk):
            m = sum(length > c for length in lengths)  # rows reaching this chunk: a prefix (longest first)
            T = min(self.prefill_chunk, lengths[0] - c)
            ids = torch.tensor([p[c : c + T] + [0] * (T - len(p[c : c + T])) for p in prompts[:m]], device=self.device)
            last = torch.tensor([min(length - 1 - c, T - 1) for length in lengths[:m]], device=self.device)
            out = self._forward(ids, c, c + T, last, row0)
            ends = [r for r in range(m) if lengths[r] <= c + T]
            logits[ends] = out[ends].to(logits.dtype)
        return logits
