"""Files every room reads and writes: atomic text output, fsync, the record files (parquet, JSONL, JSON, a Hugging
Face dataset name) that training data and evaluation problems come in, and safetensors checkpoints (headers,
whole-file checks, the index, reading row ranges of a tensor, writing files synced); ``s1fast.model.fsdp`` shards
around them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterator
from typing import TextIO

import torch


def check_output_file(path: str, name: str = "--out") -> None:
    """Refuse, before any work, an output file that could not be (re)written: a directory, a missing parent
    directory, a directory without write permission, or an existing read-only file (kept as it is)."""
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{name} {path!r}: the directory {parent!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path!r}: no permission to create files in {parent!r}")
    if os.path.exists(path) and (not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222):
        raise ValueError(f"{name} {path!r} is read-only; make it writable or choose another file")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[TextIO]:
    """A text file that replaces ``path`` only when the block ends without an exception: written to a
    temporary file in the same directory (created with the umask's permissions, as ``open`` would, not
    ``mkstemp``'s 0600), fsynced and renamed over ``path``. On any exception (Ctrl-C too) the temporary file
    is removed and ``path`` is left as it was."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory: so that the names in it, renames included, are on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new one, never a partial one
    (:func:`atomic_output`: a temporary file with the umask's permissions, fsynced, renamed)."""
    with atomic_output(path) as f:
        f.write(text)


def read_records(source: str, *, split: str = "train", what: str = "data") -> list[dict]:
    """Rows of a local ``.parquet`` / ``.jsonl`` / ``.json`` file or a Hugging Face dataset name
    (e.g. ``simplescaling/s1K-1.1``). Errors name the source as ``what``."""
    if os.path.exists(source):
        ext = os.path.splitext(source)[1].lower()
        if ext == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ImportError(f"reading {source} needs pyarrow: pip install pyarrow") from e
            try:
                return pq.read_table(source).to_pylist()
            except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid / ArrowIOError: they name no file
                raise ValueError(f"{source}: not a readable parquet file ({e})") from e
        if ext in (".jsonl", ".json"):
            with open(source, "rb") as f:
                if ext == ".jsonl":
                    items = [
                        (f"{source}: line {n}", parse_json(line, f"{source}: line {n}"))
                        for n, line in enumerate(f, 1)
                        if line.strip()
                    ]
                else:
                    rows = parse_json(f.read(), source)
                    if not isinstance(rows, list):
                        raise ValueError(f"{source}: expected a JSON array of records, got a JSON {_json_type(rows)}")
                    items = [(f"{source}: item {n}", row) for n, row in enumerate(rows, 1)]
            for where, row in items:
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{where} is a JSON {_json_type(row)}, expected an object (a record with named columns)"
                    )
            return [row for _, row in items]
        raise ValueError(f"{what} {source!r}: expected a .parquet, .jsonl or .json file")
    looks_like_file = os.path.splitext(source)[1].lower() in (".parquet", ".jsonl", ".json")
    if looks_like_file or source.count("/") != 1 or source.startswith((".", "/")):
        raise FileNotFoundError(f"{what} {source!r}: no such file, and not a Hugging Face dataset name (owner/name)")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading the dataset {source!r} by name needs `datasets`: pip install datasets") from e
    try:
        return datasets.load_dataset(source, split=split).to_list()
    except (OSError, ValueError) as e:  # not found, offline (ConnectionError), no such split: name the argument
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{what} {source!r}: the Hugging Face dataset does not load ({type(e).__name__}: {reason})"
                         ) from e


def parse_json(raw: bytes, where: str):
    """``raw`` parsed as UTF-8 JSON (a BOM allowed); a one-line ValueError naming ``where`` (a file, or a file and
    line) when it is not UTF-8 or not JSON."""
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not valid UTF-8 (byte {e.start}: {e.reason})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from e


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null"
    )


# --- safetensors checkpoints: a transformers model directory's weight files, read in row ranges and written
# whole (the sharding around them is s1fast.model.fsdp's) ------------------------------------------------------

SAFE_INDEX = "model.safetensors.index.json"
# safetensors' dtype names (the format is little-endian, as the hosts torch runs on)
_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
READ_CHUNK_BYTES = 64 * 2**20  # the most one read holds, whatever the tensor's size


def safetensors_header(file: str) -> tuple[dict, int]:
    """(``{name: {"dtype", "shape", "data_offsets"}}``, offset of the data) of a safetensors file, reading only its
    header; a ``ValueError`` naming the file when it is not one."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for info in header.values():
            if not (
                isinstance(info["shape"], list) and len(info["data_offsets"]) == 2 and info["dtype"] in _SAFE_DTYPES
            ):
                raise ValueError(f"entry {info!r:.80}")
        return header, 8 + n
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{file}: not a safetensors file ({type(e).__name__}: {e})") from e


def safetensors_whole(file: str) -> bool:
    """Whether ``file`` is a whole safetensors file, checked without reading the tensors: 8 bytes of header length,
    a JSON header, then exactly the bytes up to its last tensor's end (a truncated or garbage file fails)."""
    try:
        header, base = safetensors_header(file)
        return os.path.getsize(file) == base + max((info["data_offsets"][1] for info in header.values()), default=0)
    except ValueError:
        return False


def weight_files(path: str) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of a transformers checkpoint directory (sharded with an index, or one
    ``model.safetensors``); a ``ValueError`` naming the directory or file when it holds none or a broken one."""
    index = os.path.join(path, SAFE_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            return {name: os.path.join(path, file) for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"{single} is missing (no {SAFE_INDEX} either): no safetensors weights")
    return dict.fromkeys(safetensors_header(single)[0], single)


def read_rows(fd: int, info: dict, base: int, start: int, end: int, out: torch.Tensor) -> None:
    """Rows ``[start, end)`` (dim 0) of the tensor ``info`` of an open safetensors file into ``out``, converted to
    its dtype and device, through buffers of at most ``READ_CHUNK_BYTES`` (plain reads, no memory map). A 0-d
    tensor is one row."""
    dtype, shape = _SAFE_DTYPES[info["dtype"]], info["shape"]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    step = max(1, READ_CHUNK_BYTES // max(row_bytes, 1))
    for r in range(start, end, step):
        stop = min(end, r + step)
        buf = torch.empty((stop - r) * row_bytes, dtype=torch.uint8)
        view, done, offset = memoryview(buf.numpy()), 0, base + info["data_offsets"][0] + r * row_bytes
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise ValueError(f"ends at byte {offset + done}, inside the data of a tensor")
            done += n
        if shape:
            out[r - start:stop - start].copy_(buf.view(dtype).view(stop - r, *shape[1:]))
        else:
            out.copy_(buf.view(dtype).view(()))


def write_safetensors(file: str, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as the safetensors file ``file`` (metadata ``format: pt``, as transformers writes), with the mode
    ``open`` gives new files (safetensors itself writes 0600), fsynced."""
    from safetensors.torch import save_file

    save_file(tensors, file, metadata={"format": "pt"})
    os.chmod(file, _file_mode())
    fsync_path(file)


def _file_mode() -> int:
    """The mode ``open`` gives a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json_synced(path: str, obj) -> None:
    """``obj`` as indented JSON (keys sorted) in ``path``, fsynced."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def is_model_file(name: str) -> bool:
    """Whether ``name`` is one of the files ``s1fast.model.fsdp.save_weights`` writes (weights, index, configs)."""
    return (name.startswith("model") and name.endswith(".safetensors")) or name in (
        SAFE_INDEX,
        "config.json",
        "generation_config.json",
    )
