"""The record files of ``s1fast data``: one JSON object per line, appended and fsynced one at a time, keyed by the
question's hash (and the sample, student, ...), the last record of a key winning.

A run killed in the middle of a write (``kill -9``, a power cut) leaves at most a partial last line: reading the file
skips it and taking the write lock cuts it off (a reader cuts nothing: the line may be one a live writer is still
writing), so every record whose line ended is kept and the one being written is done again. Finished work is
never redone: each stage asks :meth:`Records.has` before sending a request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata

from s1fast.files import write_atomic


def normalise(text: str) -> str:
    """The question as stored: Unicode NFKC, Windows and old Mac line ends as ``\\n``, trailing spaces of each
    line and blank lines at both ends removed."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n").strip()


def question_id(question: str) -> str:
    """The key of a question: 16 hex digits of the SHA-256 of its lowercased words (:func:`words`), so that
    questions differing only in case, spacing or punctuation share one key (exact duplicates)."""
    return hashlib.sha256(" ".join(words(question)).encode()).hexdigest()[:16]


def words(text: str) -> list[str]:
    """Lowercased words (runs of letters and digits) of ``text`` after NFKC: the units of keys and n-grams."""
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())


def _line_end(path: str, chunk: int = 1 << 16) -> tuple[int, int]:
    """(the offset just past the last ``\n`` of the file, 0 when it has none; its size), read from its end."""
    with open(path, "rb") as f:
        size = pos = os.fstat(f.fileno()).st_size
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            i = f.read(pos - start).rfind(b"\n")
            if i >= 0:
                return start + i + 1, size
            pos = start
    return 0, size


class Records:
    """An append-only JSONL file of records; ``key`` names the fields that identify one (the last record of a
    key is the one that counts)."""

    def __init__(self, path: str, key: tuple[str, ...] = ("id",)):
        self.path, self.key = path, key
        self.latest: dict[tuple, dict] = {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                raw = f.read()
            end = raw.rfind(b"\n") + 1  # a partial last line (a write cut short, or under way) is not read
            for n, line in enumerate(raw[:end].decode("utf-8").splitlines(), 1):
                try:
                    record = json.loads(line)
                    self.latest[self._key(record)] = record
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}: line {n} is not one of this stage's records ({e})") from e
        self._file = None

    def _key(self, record: dict) -> tuple:
        return tuple(record[k] for k in self.key)

    def has(self, *key) -> bool:
        return tuple(key) in self.latest

    def get(self, *key) -> dict | None:
        return self.latest.get(tuple(key))

    def values(self) -> list[dict]:
        return list(self.latest.values())

    def lock(self) -> None:
        """Open the file for appending and hold an exclusive lock on it until :meth:`close` (the process's end,
        however it ends): a second writer of the same file is refused with a ValueError. With the lock held, a
        partial last line (left by a writer that died mid-write) is cut off."""
        import fcntl

        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.close()
                raise ValueError(f"{self.path} is being written by another process (one run per stage and directory "
                                 "at a time)") from None
            end, size = _line_end(self.path)  # read now: no one else writes while the lock is held
            if end < size:  # a write cut short: drop its partial line
                os.ftruncate(self._file.fileno(), end)
                os.fsync(self._file.fileno())

    def check_settings(self, maker: str, settings: dict, made: bool) -> None:
        """The records of ``maker`` (the stage's teacher, a student, the classifier) come from ``settings`` alone: they
        are kept next to the records (``<stem>.settings.json``, one entry per maker), and once answers of ``maker``
        exist (``made``: failed requests do not count, they are asked again anyway) a run with other settings is
        refused (a ValueError naming each difference), so that answers made differently are never mixed. Call with
        the lock held."""
        path = self.path.removesuffix(".jsonl") + ".settings.json"
        known = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                known = json.load(f)
        settings = json.loads(json.dumps(settings))  # as read back (tuples as lists)
        old = known.get(maker)
        if old == settings:
            return
        if made and old is None:
            raise ValueError(f"{self.path} holds answers of {maker} but {path} has no record of their settings; "
                             "give another --out")
        if made:
            changed = ", ".join(f"{k} {old.get(k)!r} before, {settings.get(k)!r} now"
                                for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
            raise ValueError(f"{self.path} holds answers of {maker} made with other settings ({changed}); rerun "
                             f"with the same settings to continue, or give another --out")
        write_atomic(path, json.dumps({**known, maker: settings}, indent=1, ensure_ascii=False) + "\n")

    def add(self, record: dict) -> None:
        """Append ``record`` and fsync it: once this returns the record survives a crash."""
        self.lock()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.latest[self._key(record)] = record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
