"""Content hashes of files and canonical hashes of parameters.

Files are hashed in a stream (never read whole into memory), so a catalog of
long videos hashes in constant memory. Parameters are hashed through a
canonical JSON form, so {"a": 1, "b": 2.0} and {"b": 2.0, "a": 1} agree and a
tuple hashes like the list it serialises to.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import PurePath
from typing import Any


CHUNK_BYTES = 1 << 20
ALGORITHM = "sha256"


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES) -> str:
    """sha256 of a file's bytes, read in chunks; local paths or fsspec URLs."""
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(os.fspath(path), "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def hash_files(named: Iterable[tuple[str, str | os.PathLike]], file_hash: Callable[[Any], str] | None = None) -> str:
    """One hash over several files, each bound to its name (e.g. a folder of frames).

    Renaming, reordering, adding or removing a file changes the hash, as does any byte.
    `file_hash` hashes one file (default `hash_file`; `storage.state.HashState.file_hash`
    answers from its stat cache).
    """
    file_hash = file_hash or hash_file
    h = hashlib.sha256()
    for name, path in sorted(named, key=lambda x: x[0]):
        h.update(name.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
        h.update(file_hash(path).encode())
        h.update(b"\n")
    return h.hexdigest()


def _canonical(obj: Any) -> Any:
    """Turn a parameter structure into plain JSON types, deterministically."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj) or math.isinf(obj):
            # JSON has no NaN; keep them distinguishable and stable.
            return {"__float__": repr(obj)}
        if obj.is_integer():
            # 2 and 2.0 mean the same parameter value.
            return int(obj)
        return obj
    if isinstance(obj, enum.Enum):
        return _canonical(obj.value)
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                k = str(k)
            out[k] = _canonical(v)
        return dict(sorted(out.items()))
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj))
    if hasattr(obj, "model_dump"):  # pydantic models, without importing pydantic here
        return _canonical(obj.model_dump(mode="json"))
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _canonical(obj.item())
    raise TypeError(f"cannot hash parameter of type {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def hash_params(obj: Any) -> str:
    return hash_bytes(canonical_json(obj).encode("utf-8"))


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Cheap identity of a large file (model weights): path, size and mtime, not its bytes.

    Hashing multi-GB checkpoints on every plan would dominate planning time; a
    replaced weights file changes size or mtime. A folder is fingerprinted by its
    files' sizes and mtimes.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        parts = []
        for dirpath, _, files in sorted(os.walk(p)):
            for name in sorted(files):
                st = os.stat(os.path.join(dirpath, name))
                parts.append((os.path.relpath(os.path.join(dirpath, name), p), st.st_size, st.st_mtime_ns))
        return {"path": os.path.abspath(p), "files": parts}
    st = os.stat(p)
    return {"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
