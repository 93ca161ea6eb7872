"""Identifiers derived from file names, which are untrusted input.

An id becomes a Zarr path segment and part of output file names, so it is
reduced to a safe alphabet: it can never contain a path separator, never be
'.' or '..', and never start with a dot.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_ID_LENGTH = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


class UnsafeNameError(ValueError):
    pass


def is_valid_utf8_name(name: str) -> bool:
    """False for names holding undecodable bytes (surrogate escapes from os.listdir)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sanitize_id(name: str) -> str:
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE.sub("-", text)
    text = re.sub(r"-{2,}", "-", text)
    text = re.sub(r"\.{2,}", ".", text)  # no '..' anywhere, even mid-name
    text = text.strip(".-_")
    if not text:
        # Nothing usable is left (e.g. a name made only of symbols): derive a stable id.
        text = "item-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    if len(text) > MAX_ID_LENGTH:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        text = text[: MAX_ID_LENGTH - 9].rstrip(".-_") + "-" + digest
    return text


def unique_ids(names: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Sanitised ids made unique with -2, -3 suffixes; also returns the (name, new id) renames."""
    seen: set[str] = set()
    out, renamed = [], []
    for name in names:
        base = sanitize_id(name)
        cand, k = base, 2
        while cand in seen:
            cand = f"{base}-{k}"
            k += 1
        seen.add(cand)
        out.append(cand)
        if cand != base:
            renamed.append((name, cand))
    return out, renamed
