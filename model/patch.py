"""Patch a transformers Qwen2 / Qwen2.5 / Qwen3 causal LM with s1fast's fused kernels, in place, per instance.

``patch(model)`` gives chosen submodules of *this* model an instance-level ``forward`` (an attribute in the
module's ``__dict__``, which ``nn.Module.__call__`` finds before the class's method). Classes, torch functions
and transformers' module-level functions are never touched, so other models in the process keep their
behaviour, and ``unpatch`` deletes those attributes to restore the original code path exactly. Every module,
``Parameter`` and ``nn.Linear`` stays where it was: state dicts, PEFT LoRA on the projections, FSDP2
``fully_shard``, gradient checkpointing and ``torch.compile`` see the same model.

Entry points: :func:`patch` / :func:`unpatch` (switches ``rms_norm``, ``rope``, ``swiglu`` and ``loss``, each
described at its forward below; packed sequences: :func:`patch`), :func:`patched` (which kernels run now),
:func:`load` (``from_pretrained``, then ``patch``), :func:`causal_lm`, :func:`causal_lm_loss`.

transformers >= 5.25 with the ``kernels`` package: ``from_pretrained`` kernelizes models (``use_kernels``) and
re-kernelizes them at each ``train()`` / ``eval()`` switch, which would remove the RMSNorm instance forwards;
``patch`` turns ``use_kernels`` off, and a kernelization forced afterwards is reported by a warning at the next
patched forward.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import sys
import types
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3
from transformers.utils.generic import can_return_tuple

from s1fast.kernels import apply_rope, fused_linear_cross_entropy, rms_norm, swiglu

logger = logging.getLogger(__name__)
CAUSAL_LMS = (qwen2.Qwen2ForCausalLM, qwen3.Qwen3ForCausalLM)
_RMS_NORMS = (qwen2.Qwen2RMSNorm, qwen3.Qwen3RMSNorm)
_ATTENTIONS = (qwen2.Qwen2Attention, qwen3.Qwen3Attention)
_MLPS = (qwen2.Qwen2MLP, qwen3.Qwen3MLP)
_SWIGLU_ACTS = ("silu", "swish")


def causal_lm(model: nn.Module) -> nn.Module:
    """The supported ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` inside ``model`` (itself, or the base model
    of a PEFT wrapper); a clear ``TypeError`` for anything else."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if not isinstance(base, CAUSAL_LMS):
        supported = ", ".join(c.__name__ for c in CAUSAL_LMS)
        raise TypeError(
            f"s1fast.model.patch: model must be one of ({supported}) from transformers, or a PEFT model wrapping "
            f"one; got {type(model).__name__}. Patch the model before torch.compile."
        )
    return base


# --- the instance-level forwards ---------------------------------------------------------------------------


def _ours(kernel: str) -> Callable[[Callable], Callable]:
    """Marks an instance forward as s1fast's, under the name of the ``patch`` switch that installs it."""

    def mark(fn: Callable) -> Callable:
        fn._s1fast_patch = kernel
        return fn

    return mark


@_ours("rms_norm")
def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``rms_norm``: every ``Qwen2RMSNorm`` / ``Qwen3RMSNorm`` (layer norms, the final norm, Qwen3's q/k norms) runs
    ``s1fast.kernels.rms_norm`` with its own weight and epsilon."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


@_ours("swiglu")
def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``swiglu``: every MLP computes ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` through its own Linears."""
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Stand-in for transformers' ``apply_rotary_pos_emb`` inside patched attention forwards."""
    if unsqueeze_dim != 1:
        raise ValueError(f"s1fast.model.patch: rope expects q/k as [B, H, T, D] (unsqueeze_dim=1), got {unsqueeze_dim}")
    return apply_rope(q, k, cos, sin)


def _rebind(fn: types.FunctionType, name: str, value: object) -> types.FunctionType:
    """A copy of ``fn`` whose global ``name`` is ``value``. Decorators made with ``functools.wraps`` (e.g.
    transformers' ``deprecate_kwarg`` around ``forward`` since 5.24) are kept: the innermost function is rebound
    and each wrapper is rebuilt around the copy, by replacing the closure cell that held the function it wraps,
    so the wrappers' own behaviour (keyword renames, warnings) is unchanged."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        if name not in fn.__code__.co_names:
            raise RuntimeError(
                f"s1fast.model.patch: {fn.__qualname__} no longer calls {name} in this transformers version; "
                "patch it with rope=False"
            )
        copy = types.FunctionType(
            fn.__code__, _namespace(fn, name, value), fn.__name__, fn.__defaults__, fn.__closure__
        )
    else:
        cells = fn.__closure__ or ()
        holds = [_cell_holds(cell, inner) for cell in cells]
        if sum(holds) != 1:
            raise RuntimeError(
                f"s1fast.model.patch: cannot see through the decorator around {fn.__qualname__} in this transformers "
                "version; patch it with rope=False"
            )
        new_inner = _rebind(inner, name, value)
        closure = tuple(types.CellType(new_inner) if h else cell for cell, h in zip(cells, holds))
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        copy.__dict__.update(fn.__dict__)
        copy.__wrapped__ = new_inner
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    return copy


def _namespace(fn: types.FunctionType, name: str, value: object) -> dict:
    """``fn``'s globals with ``name`` bound to ``value``, as the namespace of a module of its own registered in
    ``sys.modules``. torch.compile finds a function's globals through ``sys.modules[globals["__name__"]]`` when it
    guards them; with the original module's name it would guard transformers' own ``apply_rotary_pos_emb`` (a ``Func``
    module when the ``kernels`` package is installed, which has no ``__defaults__``) instead of the one called."""
    module = types.ModuleType(f"{__name__}.{fn.__module__}.{fn.__qualname__}")
    vars(module).update(fn.__globals__, __name__=module.__name__, __spec__=None, **{name: value})
    sys.modules[module.__name__] = module
    return vars(module)


def _cell_holds(cell: types.CellType, value: object) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


@functools.cache
def _rope_forward(forward: types.FunctionType) -> types.FunctionType:
    """``forward``'s code with ``apply_rotary_pos_emb`` resolved to s1fast's rope (one function per class).

    ``rope``: every attention module runs its class's own ``forward`` code, rebound to a globals mapping in which
    ``apply_rotary_pos_emb`` is ``s1fast.kernels.apply_rope`` (one launch for q and k). Reusing the installed code
    object keeps attention exactly as the installed transformers version wrote it (KV cache, attention backends, Qwen3's
    q/k norms); only that one global name differs.
    """
    return _ours("rope")(_rebind(forward, "apply_rotary_pos_emb", _apply_rotary_pos_emb))


def _check_labels(name: str, labels: torch.Tensor, hidden: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"s1fast.model.patch: {name} must be an integer tensor of token ids, got {labels!r:.80}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"s1fast.model.patch: {name} must have shape {tuple(hidden.shape[:-1])} (batch, tokens) like input_ids, "
            f"got {tuple(labels.shape)}"
        )


def causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    labels: torch.Tensor | None,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` of ``lm_head(hidden)`` through the fused linear cross-entropy.

    ``hidden`` is ``[B, T, H]``; ``labels`` ``[B, T]`` are shifted here (``shift_labels`` given instead are used
    as they are). Extra keyword arguments (the model kwargs transformers also passes to its loss) are ignored.
    """
    if shift_labels is None:
        _check_labels("labels", labels, hidden)
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    else:
        _check_labels("shift_labels", shift_labels, hidden)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    return fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_head.weight,
        shift_labels.reshape(-1).to(hidden.device),
        bias=lm_head.bias,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
    )


# cls.forward -> its positional names: filled by patch(), read by the forward (no inspect there). Keyed by the
# function, not the class, so that subclasses made on the fly (FSDP2's FSDPQwen2ForCausalLM) find it.
_POSITIONAL_NAMES: dict[Callable, tuple[str, ...]] = {}


def _positional_names(cls: type) -> tuple[str, ...]:
    """The names of ``cls.forward``'s positional parameters after ``self``, as the installed transformers spells
    them (``past_key_values`` before 5.24, ``cache`` since)."""
    params = inspect.signature(inspect.unwrap(cls.forward)).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)[1:]


@_ours("loss")
@can_return_tuple
def _causal_lm_forward(self, *args, **kwargs) -> CausalLMOutputWithPast:
    """The causal LM's forward with the fused loss. Arguments are named as the installed class's forward names
    them and passed on unchanged, so keyword renames between transformers releases need nothing here.

    ``loss``: the causal-LM forward, in training mode with labels, feeds the final hidden states and the ``lm_head``
    weight to ``fused_linear_cross_entropy``: the ``[tokens, vocab]`` logits are never built and ``output.logits`` is
    None. Semantics are transformers' ``ForCausalLMLoss``: labels are shifted inside (position t predicts label t+1; the
    last position is ignored), ``ignore_index`` (-100), a ``shift_labels`` kwarg replaces the shift,
    ``num_items_in_batch`` turns the mean into ``sum / num_items_in_batch`` (gradient accumulation as transformers'
    Trainer does it), and an int ``logits_to_keep`` slices the hidden states first. Without labels, in eval mode, with a
    tensor ``logits_to_keep``, a custom ``loss_function`` or a wrapped (e.g. LoRA) ``lm_head``, the class's own forward
    runs: logits come back as before and ``generate()`` works.
    """
    if getattr(self, "use_kernels", False):  # transformers re-kernelized the model after patch()
        _warn_if_dropped(self)
    names = _POSITIONAL_NAMES[type(self).forward]
    if len(args) > len(names):
        raise TypeError(f"{type(self).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"{type(self).__name__}.forward got multiple values for argument {name!r}")
        kwargs[name] = value
    labels = kwargs.get("labels")
    logits_to_keep = kwargs.get("logits_to_keep", 0)
    fused = (
        labels is not None
        and self.training
        and isinstance(logits_to_keep, int)
        and isinstance(self.lm_head, nn.Linear)
        and self.loss_function is LOSS_MAPPING["ForCausalLM"]
    )
    if not fused:
        return type(self).forward(self, return_dict=True, **kwargs)
    del kwargs["labels"]
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(**kwargs)
    hidden = outputs.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else outputs.last_hidden_state
    rest = {key: value for key, value in outputs.items() if key != "last_hidden_state"}  # the cache, hidden states...
    return CausalLMOutputWithPast(loss=causal_lm_loss(hidden, self.lm_head, labels, **kwargs), logits=None, **rest)


# Introspection (transformers' Trainer picks dataset columns from ``inspect.signature(model.forward)``) sees the
# installed forward's parameters, as with the unpatched model.
_causal_lm_forward.__signature__ = inspect.signature(inspect.unwrap(qwen2.Qwen2ForCausalLM.forward))


# --- patch / unpatch ---------------------------------------------------------------------------------------


def _kernel_of(module: nn.Module) -> str | None:
    """The switch whose s1fast forward ``module`` runs, or None."""
    forward = vars(module).get("forward")
    return getattr(getattr(forward, "__func__", None), "_s1fast_patch", None)


def _is_ours(module: nn.Module) -> bool:
    return _kernel_of(module) is not None


def patched(model: nn.Module) -> dict[str, int]:
    """How many modules of ``model`` run each of s1fast's kernels now, by ``patch`` switch, e.g.
    ``{"rms_norm": 5, "rope": 2, "swiglu": 2, "loss": 1}`` for a 2-layer Qwen2 (0 for a switch that is off)."""
    counts = dict.fromkeys(("rms_norm", "rope", "swiglu", "loss"), 0)
    for module in causal_lm(model).modules():
        kernel = _kernel_of(module)
        if kernel is not None:
            counts[kernel] += 1
    return counts


def _warn_if_dropped(lm: nn.Module) -> None:
    """Warn once if Hub kernelization after ``patch`` (``model.use_kernels = True``, ``kernelize(model)``, or a
    ``train()`` / ``eval()`` switch of a model with ``use_kernels`` on) replaced s1fast forwards."""
    if vars(lm).get("_s1fast_warned"):  # said once; no module scan per forward after that
        return
    installed, now = vars(lm).get("_s1fast_patched", {}), patched(lm)
    lost = {kernel: n - now[kernel] for kernel, n in installed.items() if now[kernel] < n}
    if lost:
        lm._s1fast_warned = True
        warnings.warn(
            f"s1fast.model.patch: transformers' Hub kernelization (use_kernels=True) replaced s1fast forwards after "
            f"patch(): {lost} modules lost; call s1fast.model.patch(model) again, which turns use_kernels off",
            stacklevel=3,
        )


def _turn_off_hub_kernels(lm: nn.Module) -> None:
    """transformers >= 5.25 kernelizes a model in ``from_pretrained`` by default (``use_kernels``) and kernelizes it
    again at every ``train()`` / ``eval()`` mode switch, which removes instance forwards of the layers the Hub kernels
    name (``RMSNorm``). ``patch`` supersedes Hub kernels for the layers it patches: it turns ``use_kernels`` off (so a
    later ``model.train()`` keeps s1fast's forwards) and removes the Hub-kernel forwards of modules kernelized before
    (by transformers or ``s1fast.model.hub_kernels``), naming them in a warning."""
    kernelized = [m for m in lm.modules() if "_kernel_repo" in vars(m)]
    if kernelized:
        warnings.warn(
            f"s1fast.model.patch: the model ran Hub kernels for {sorted({type(m).__name__ for m in kernelized})}; "
            "patch() replaces them and turns use_kernels off",
            stacklevel=3,
        )
    if getattr(lm, "use_kernels", False):
        lm.use_kernels = False  # transformers' switch: no re-kernelization at train() / eval() from now on
    for module in kernelized:  # what the kernels package does to restore a layer's own forward
        vars(module).pop("forward", None)
        vars(module).pop("_kernel_repo", None)


def _targets(
    lm: nn.Module, rms_norm: bool, rope: bool, swiglu: bool, loss: bool
) -> Iterator[tuple[nn.Module, Callable]]:
    """(module, unbound forward) for every module the switches select."""
    if loss:
        _POSITIONAL_NAMES.setdefault(type(lm).forward, _positional_names(type(lm)))
        yield lm, _causal_lm_forward
    for module in lm.modules():
        if rms_norm and isinstance(module, _RMS_NORMS):
            yield module, _rms_norm_forward
        elif rope and isinstance(module, _ATTENTIONS):
            yield module, _rope_forward(type(module).forward)
        elif swiglu and isinstance(module, _MLPS):
            yield module, _mlp_forward


def patch(model: nn.Module, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True, loss: bool = True):
    """Patch ``model`` (a ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``, or a PEFT model around one) in place with
    the fused kernels the switches select, and return it. Patching again replaces the previous patch (so the
    switches can be changed); ``unpatch`` restores the original forward of every module.

    Packed sequences (padding-free SFT): pass ``position_ids`` restarting at 0 per sequence, no attention mask,
    ``use_cache=False`` (transformers 5 builds the block-diagonal mask from ``position_ids`` only when no KV cache is
    made, and in train mode ``use_cache`` still defaults to ``config.use_cache``), and label -100 on the first token of
    each sequence so no sequence predicts the next one's first token.
    """
    lm = causal_lm(model)
    if swiglu and lm.config.hidden_act not in _SWIGLU_ACTS:
        raise ValueError(
            f"s1fast.model.patch: swiglu=True needs config.hidden_act in {_SWIGLU_ACTS}, got "
            f"{lm.config.hidden_act!r}; pass swiglu=False"
        )
    _turn_off_hub_kernels(lm)
    targets = list(_targets(lm, rms_norm, rope, swiglu, loss))
    names = {module: name for name, module in lm.named_modules()}
    for module, _ in targets:
        if "forward" in vars(module) and not _is_ours(module):
            raise ValueError(
                f"s1fast.model.patch: module {names[module] or type(module).__name__!r} already has an instance-level "
                "forward (e.g. accelerate offloading hooks); patch the model before dispatching it"
            )
    unpatch(model)
    for module, forward in targets:
        module.forward = types.MethodType(forward, module)
    lm._s1fast_patched = patched(lm)
    lm._s1fast_warned = False
    logger.info("s1fast.model.patch: %s", lm._s1fast_patched)
    return model


def unpatch(model: nn.Module):
    """Undo ``patch``: every module runs its class's forward again (bit-identical outputs). Returns ``model``."""
    lm = causal_lm(model)
    for module in lm.modules():
        if _is_ours(module):
            del module.forward
    vars(lm).pop("_s1fast_patched", None)
    return model


def load(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    attn: str = "auto",
    device: str | torch.device | None = None,
    **patch_switches: bool,
):
    """``AutoModelForCausalLM.from_pretrained(name_or_path)`` in ``dtype`` on ``device``, then ``patch``.

    ``attn="auto"`` picks "flash_attention_2" when flash-attn is installed and ``device`` is CUDA, else "sdpa";
    any other value goes to transformers as ``attn_implementation``. ``patch_switches`` are ``patch``'s
    keywords (``rms_norm``, ``rope``, ``swiglu``, ``loss``). The model comes back in eval mode, as
    ``from_pretrained`` leaves it: call ``model.train()`` to train with the fused loss.
    """
    if attn == "auto":
        cuda = device is not None and torch.device(device).type == "cuda"
        attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") is not None else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn, device_map=device)
    return patch(model, **patch_switches)
