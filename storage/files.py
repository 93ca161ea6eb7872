"""Local files that appear whole or not at all: write to a unique temporary sibling, then rename.

The temporary name is unique per writer, so two workers writing the same file at once
never share (or delete) each other's half-written copy; the last rename wins, whole.
It stays within the file-name limit whatever the target's name (a legal 250-byte name
plus a unique suffix would not).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NAME_MAX = 255  # bytes per file name on every common local filesystem (ext4, xfs, btrfs, tmpfs, APFS)


def temp_name(name: str, suffix: str = ".tmp") -> str:
    """A unique hidden name for a temporary sibling of `name`: `.{name}.{uuid}{suffix}`, with `name`
    cut so the whole stays within NAME_MAX bytes."""
    tail = f".{uuid.uuid4().hex}{suffix}"
    budget = NAME_MAX - 1 - len(tail.encode())
    raw = os.fsencode(name)
    if len(raw) > budget:
        name = raw[:budget].decode("utf-8", "ignore")  # a cut multi-byte character is dropped
    return f".{name}{tail}"


def bounded_name(stem: str, suffix: str = "", limit: int = 200) -> str:
    """`stem + suffix`, or when that exceeds `limit` bytes, a cut stem plus a hash of the whole stem
    (names built from ids and variant names; `limit` leaves room for what callers append)."""
    name = stem + suffix
    if len(os.fsencode(name)) <= limit:
        return name
    import hashlib

    digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:16]
    keep = limit - len(os.fsencode(suffix)) - len(digest) - 1
    return os.fsencode(stem)[:keep].decode("utf-8", "ignore") + "-" + digest + suffix


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
