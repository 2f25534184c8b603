"""FSDP2 sharding of a (patched or not) Qwen causal LM, and loading / saving it shard by shard (the safetensors
files themselves are read and written by ``s1fast.files``).

Layout: one ``fully_shard`` unit per decoder layer plus the root (s1's recipe: full shard, each decoder layer
wrapped). The root unit holds the embedding, the final norm and ``lm_head`` (tied or not), so the fused loss
reads the all-gathered ``lm_head.weight`` inside the root's forward. Patching works before or after sharding:
``fully_shard`` keeps every module and only swaps the classes of the modules it wraps, while the patch lives in
instance attributes.

Loading that scales (no rank ever holds the whole model): :func:`empty_model` builds the model from its config on
the meta device (no memory), :func:`shard_model` shards it, :func:`materialize` gives each rank storage for its
own shards and recomputes the non-persistent buffers (rotary ``inv_freq``), and :func:`load_weights` fills each
rank's shards by reading only its rows of every tensor from the safetensors files (memory-mapped, in the stored
dtype, converted one slice at a time). Saving that scales: :func:`save_weights` all-gathers one parameter at a time;
each rank keeps the full tensors of the files it owns (about 1/world of the model in the saved dtype) and writes
them, rank 0 the index and config: a standard transformers checkpoint (sharded safetensors + index + config).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

from s1fast.files import (
    SAFE_INDEX,
    fsync_path,
    read_rows,
    safetensors_header,
    weight_files,
    write_json_synced,
    write_safetensors,
)
from s1fast.model.patch import CAUSAL_LMS, causal_lm, patch

MAX_SHARD_BYTES = 5 * 2**30  # transformers' usual largest file


def shard_model(
    model: nn.Module,
    *,
    mesh=None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every decoder layer of ``model`` and then to ``model`` itself; return it.

    ``model`` is a ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` or a PEFT model around one (the root unit is
    then the PEFT wrapper), on a device or on the meta device (then :func:`materialize` it). ``mesh`` is a 1-D
    ``DeviceMesh`` (default: all ranks of the default process group on the current device type). ``param_dtype``
    is the compute dtype of the all-gathered parameters (None: the stored dtype); ``reduce_dtype`` the dtype of the
    gradient reduce-scatter (fp32 by default, so bf16 training averages gradients in fp32).
    ``reshard_after_forward`` frees each layer's gathered parameters after its forward (gathered again in
    backward): True saves memory with several ranks. It never applies to the last layer and the root, whose
    backward follows their forward at once (re-gathering them would only cost time). ``cpu_offload`` keeps the
    sharded parameters, gradients and optimizer state in (pinned) host memory (FSDP2's ``CPUOffloadPolicy``): the
    optimizer step then runs on the CPU. The process group must already be initialised.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    layers = causal_lm(model).model.layers
    for i, layer in enumerate(layers):
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=False)
    return model


# --- building and loading ------------------------------------------------------------------------------------


def empty_model(path: str, *, attn: str = "sdpa", patched: bool = True) -> nn.Module:
    """The causal LM of the checkpoint directory ``path`` (its ``config.json``) on the meta device, fp32, patched
    unless ``patched=False``: no memory is used until :func:`materialize`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    causal_lm(model)  # a clear error for an architecture s1fast does not train
    return patch(model) if patched else model


def materialize(model: nn.Module, device: torch.device | str, *, cpu_offload: bool = False) -> nn.Module:
    """Give a (sharded) model built on the meta device real storage: each rank's parameter shards on ``device``
    (on the CPU with ``cpu_offload``), uninitialised until :func:`load_weights`, and its buffers on ``device``.
    Tied weights stay tied. Non-persistent buffers are not in checkpoints: the rotary embeddings compute theirs
    again here."""
    lm = causal_lm(model)
    tied = [names for names, t in _state_tensors(model) if len(names) > 1 and isinstance(t, nn.Parameter)]
    model.to_empty(device="cpu" if cpu_offload else device)
    for names in tied:  # to_empty makes one tensor per module (FSDP2 keeps the tie itself)
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(lm.get_submodule(owner), attr, lm.get_parameter(names[0]))
    if cpu_offload:
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                setattr(module, name, buf.to(device))
    rebuilt = set()
    for module in lm.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            fresh = type(module)(module.config)  # computes inv_freq (and original_inv_freq) from the config
            with torch.no_grad():
                for name, buf in fresh.named_buffers(recurse=False):
                    getattr(module, name).copy_(buf)
            rebuilt.add(module)
    left = [f"{mname}.{b}" for mname, module in lm.named_modules() if module not in rebuilt
            for b in module._non_persistent_buffers_set]
    if left:
        raise NotImplementedError(f"materialize: cannot recompute the non-persistent buffer(s) {left} after to_empty")
    return model


def _state_tensors(model: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """Every parameter and persistent buffer once, with all the names it has (tied weights have two), in
    registration order (the first name is the one transformers saves)."""
    lm = causal_lm(model)
    found: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        found.setdefault(id(p), ([], p))[0].append(name)
    for mname, module in lm.named_modules(remove_duplicate=False):
        for bname, buf in module.named_buffers(prefix=mname, recurse=False):
            if buf is not None and bname.rsplit(".", 1)[-1] not in module._non_persistent_buffers_set:
                found.setdefault(id(buf), ([], buf))[0].append(bname)
    return list(found.values())


def _shard_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, first row, end row) of ``t`` in the full tensor: FSDP2 shards dim 0 in
    ``torch.chunk`` pieces (ceil(rows / world) rows each, the last ones shorter or empty)."""
    from torch.distributed.tensor import DTensor, Shard

    rows = t.shape[0] if t.ndim else 1
    if not isinstance(t, DTensor):
        return t, 0, rows
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise NotImplementedError(f"expected FSDP2's dim-0 sharding on a 1-D mesh, got placements {t.placements}")
    world, rank = t.device_mesh.size(), t.device_mesh.get_local_rank()
    per = -(-rows // world)
    start, end = min(rank * per, rows), min((rank + 1) * per, rows)
    local = t.to_local()
    if local.shape[0] != end - start:
        raise NotImplementedError(
            f"unexpected shard of {tuple(t.shape)}: {tuple(local.shape)} on rank {rank} of {world}"
        )
    return local, start, end


@torch.no_grad()
def load_weights(model: nn.Module, path: str) -> None:
    """Fill ``model``'s parameters and persistent buffers (sharded with FSDP2 or not) from the safetensors
    checkpoint directory ``path``: each rank reads only the rows of its shards, in the stored dtype, in pieces of at
    most ``s1fast.files.READ_CHUNK_BYTES``, and converts them into its shards. Tied weights are read once (from
    whichever name the checkpoint holds). A missing tensor or one of another shape is a ``ValueError`` naming it;
    tensors the model lacks are ignored. No collective: ranks load independently."""
    files = weight_files(path)
    by_file: dict[str, list[tuple[str, torch.Tensor]]] = {}
    missing = []
    for names, t in _state_tensors(model):
        name = next((n for n in names if n in files), None)
        if name is None:
            missing.append(names[0])
        else:
            by_file.setdefault(files[name], []).append((name, t))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) of the model: {', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}")
    for file, tensors in sorted(by_file.items()):
        header, base = safetensors_header(file)
        with open(file, "rb") as f:
            for name, t in tensors:
                info = header.get(name)
                if info is None or tuple(info["shape"]) != tuple(t.shape):
                    found = "not in it" if info is None else f"of shape {tuple(info['shape'])}"
                    raise ValueError(f"{file}: {name} is {found}; the model's is {tuple(t.shape)}")
                local, start, end = _shard_rows(t)
                try:
                    read_rows(f.fileno(), info, base, start, end, local)
                except ValueError as e:
                    raise ValueError(f"{file}: {name} {e}: the file is truncated") from e


# --- saving ----------------------------------------------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of ``t`` (an all-gather, which every rank must join, for a sharded DTensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if t.to_local().device.type != t.device_mesh.device_type:  # CPU-offloaded shards: gather on the mesh's device
        t = DTensor.from_local(t.to_local().to(t.device_mesh.device_type), t.device_mesh, t.placements,
                               shape=t.shape, stride=t.stride())
    return t.full_tensor()


def file_plan(sizes: list[int], world: int, max_bytes: int = MAX_SHARD_BYTES) -> tuple[list[int], int]:
    """(file of each tensor, number of files): tensors in order into files of about ``total / world`` bytes
    (at most ``max_bytes``, at least one tensor), so that every rank owns about one file; file ``i`` belongs to rank
    ``i % world``. The same on every rank (computed from the shapes only)."""
    target = max(1, min(max_bytes, -(-sum(sizes) // world)))
    files, current, used = [], 0, 0
    for size in sizes:
        if used and used + size > target:
            current, used = current + 1, 0
        files.append(current)
        used += size
    return files, current + 1


def save_weights(model: nn.Module, directory: str, *, dtype: torch.dtype, tokenizer=None,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write ``model`` (sharded with FSDP2 or not) into the existing ``directory`` as a transformers checkpoint in
    ``dtype``: ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` files and their index),
    ``config.json`` / ``generation_config.json`` and the ``tokenizer`` when given, readable by ``from_pretrained``.
    Collective: every rank calls it.

    One parameter is all-gathered at a time; the rank that owns its file (:func:`file_plan`) keeps it on the CPU
    in ``dtype``, so no rank holds more than its files (about 1/world of the model). Each rank writes and fsyncs its
    files, rank 0 the index and configs; a failure on any rank raises on every rank (no rank waits forever)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    entries = _state_tensors(model)
    file_of, n_files = file_plan([t.numel() * dtype.itemsize for _, t in entries], world, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if n_files == 1
        else [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]
    )
    owned: dict[int, dict[str, torch.Tensor]] = {}
    for (tensor_names, t), f in zip(entries, file_of):
        full = _full(t.detach())
        if f % world == rank:
            owned.setdefault(f, {})[tensor_names[0]] = full.to("cpu", dtype).contiguous()
        del full
    error = None
    try:
        for f, tensors in owned.items():
            file = os.path.join(directory, names[f])
            write_safetensors(file, tensors)
        owned.clear()
        if rank == 0:
            _write_config(model, directory, dtype)
            if n_files > 1:
                total = sum(t.numel() * dtype.itemsize for _, t in entries)
                weight_map = {tn[0]: names[f] for (tn, _), f in zip(entries, file_of)}
                write_json_synced(
                    os.path.join(directory, SAFE_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map}
                )
            if tokenizer is not None:
                for file in tokenizer.save_pretrained(directory):
                    fsync_path(file)
    except Exception as e:
        error = e
    failed = agree_failed(error is not None)
    if error is not None:
        raise error
    if failed:
        raise OSError(f"writing the model into {directory} failed on another rank")


def _write_config(model: nn.Module, directory: str, dtype: torch.dtype) -> None:
    """``config.json`` (the original class as architecture, the saved dtype, ``use_cache`` on for inference) and
    ``generation_config.json``, as ``save_pretrained`` writes them."""
    lm = causal_lm(model)
    config = copy.deepcopy(lm.config)
    config.architectures = [next(c for c in type(lm).__mro__ if c in CAUSAL_LMS).__name__]
    config.use_cache = True
    config.dtype = dtype
    config.save_pretrained(directory)
    fsync_path(os.path.join(directory, "config.json"))
    if getattr(lm, "generation_config", None) is not None and lm.can_generate():
        lm.generation_config.save_pretrained(directory)
        fsync_path(os.path.join(directory, "generation_config.json"))


def agree_failed(failed: bool) -> bool:
    """Whether any rank failed (``failed`` on that rank): one all-reduce, so that all ranks stop together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failed
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")
    flag = torch.tensor([int(failed)], device=device)
    dist.all_reduce(flag)
    return bool(flag.item())
