"""``s1fast data classify``: a domain per question, from a field of the pool or from a model asked with a Mathematics
Subject Classification rubric (the top-level MSC 2020 classes in ``data/msc2020.json``, plus a few domains for
questions outside mathematics, as s1 had for its science questions). The model's reply must name one code; a reply
that names none (or several) is asked again, then recorded as ``unknown``."""

from __future__ import annotations

import functools
import json
import os
import re

UNKNOWN = "unknown"
MSC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "msc2020.json")


@functools.cache
def domains() -> dict[str, str]:
    """Code -> title: the 63 top-level MSC 2020 classes, then the non-mathematical domains. Read once and shared
    by every caller: do not change the dict."""
    with open(MSC_PATH, encoding="utf-8") as f:
        data = json.load(f)
    return {**data["msc2020"], **data["other"]}


def rubric(question: str) -> str:
    """The classification request for one question."""
    table = "\n".join(f"{code} {title}" for code, title in domains().items())
    return ("Classify the question below into exactly one domain of this list: the top-level classes of the "
            "Mathematics Subject Classification 2020, then domains for questions outside mathematics.\n\n"
            f"{table}\n\nQuestion:\n{question}\n\n"
            "Reply with the code of the one domain that fits best, on its own line, as: Domain: CODE")


def parse_domain(reply: str | None) -> str | None:
    """The code a reply names: after the last ``Domain:``, else the only code in the reply; None otherwise."""
    if not reply:
        return None
    codes = domains()
    marked = re.findall(r"domain\s*:\s*\**\s*([A-Za-z0-9]{2,4})\b", reply, re.IGNORECASE)
    if marked and marked[-1].upper() in codes:
        return marked[-1].upper()
    found = {c for c in re.findall(r"\b([0-9]{2}|[A-Z]{4})\b", reply) if c in codes}
    return found.pop() if len(found) == 1 else None


def field_domain(record: dict, name: str) -> str:
    """The domain given in the pool's field ``name`` (kept in the question's metadata), else ``unknown``."""
    value = record.get("metadata", {}).get(name, record.get(name))
    return str(value).strip() if isinstance(value, (str, int)) and str(value).strip() else UNKNOWN
