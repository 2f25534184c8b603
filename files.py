"""Files every room reads and writes: atomic text output and the record files (parquet, JSONL, JSON, a Hugging Face
dataset name) that training data and evaluation problems come in."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import TextIO


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
    return datasets.load_dataset(source, split=split).to_list()


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
