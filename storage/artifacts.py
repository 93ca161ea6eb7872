"""Zarr v3 artifact store with a commit protocol.

An artifact is a Zarr group (e.g. ``audio/dog-1``) holding named arrays. It is
written completely first, and only then marked complete: its attributes get the
cache key and ``complete: true`` in one last write. Readers trust only groups
that are complete *and* carry the key they expect, so a crash mid-write (or a
write under an older key) reads as absent, never as done.

Local folders are the default; any fsspec URL (``s3://bucket/store.zarr``,
``memory://...``) works for many machines sharing one store.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# zarr is imported where a store is opened, not here: planning and `status` (which
# read only the ledger) import this module through the stage modules, and never pay for zarr.

# ~8 MiB chunks keep one video's frames together (>= 1 MB, DESIGN 3) without
# making a single chunk too large to stream.
TARGET_CHUNK_BYTES = 8 << 20
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ArtifactPathError(ValueError):
    """An artifact path segment is not a safe identifier."""


def check_artifact_path(path: str) -> str:
    """Validate 'a/b/c' made of safe segments: no '..', no absolute paths, no odd characters."""
    parts = path.split("/")
    for seg in parts:
        if not seg or seg in (".", "..") or not _SEGMENT.match(seg):
            raise ArtifactPathError(f"unsafe artifact path segment {seg!r} in {path!r}")
    return path


def _chunks_for(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Whole array in one chunk when small; otherwise split along the first axis."""
    if not shape:
        return ()
    per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    rows = max(1, min(shape[0], TARGET_CHUNK_BYTES // per_row))
    return (rows, *shape[1:])


def _storable(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind == "V" or str(arr.dtype) == "bfloat16":
        raise TypeError("bfloat16/void arrays are not stored; convert to float16 or float32")
    return arr


class ArtifactWriter:
    """Handle given to code that fills an artifact; arrays may be written in slices."""

    def __init__(self, group: zarr.Group):
        self._group = group

    def create(self, name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...] | None = None):
        dtype = np.dtype(dtype)
        return self._group.create_array(
            name,
            shape=tuple(shape),
            dtype=dtype,
            chunks=chunks or _chunks_for(tuple(shape), dtype.itemsize),
            overwrite=True,
        )

    def write(self, name: str, data: np.ndarray) -> None:
        data = _storable(data)
        arr = self.create(name, data.shape, data.dtype)
        arr[...] = data

    def set_attrs(self, **attrs: Any) -> None:
        reserved = {"complete", "key"} & set(attrs)
        if reserved:
            raise ValueError(f"attributes {sorted(reserved)} are set by the commit, not by writers")
        self._group.attrs.update(attrs)


def _open_or_create_group(store, path: str = "") -> zarr.Group:
    """Open the group at `path`, creating it if absent. Two workers may both find it absent and
    both create it: the loser's create fails with ContainsGroupError, and it opens the winner's."""
    import zarr

    try:
        return zarr.open_group(store=store, path=path, mode="a")
    except zarr.errors.ContainsGroupError:
        return zarr.open_group(store=store, path=path, mode="r+")


class ArtifactStore:
    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
        import zarr.storage

        self.url = os.fspath(url)
        if "://" in self.url and not self.url.startswith("file://"):
            self._store = zarr.storage.FsspecStore.from_url(
                self.url, storage_options=dict(storage_options or {}), read_only=False
            )
        else:
            local = Path(self.url.removeprefix("file://")).expanduser()
            local.mkdir(parents=True, exist_ok=True)
            self._store = zarr.storage.LocalStore(str(local))
        self._root = _open_or_create_group(self._store)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def uri(self, path: str) -> str:
        return f"{self.url.rstrip('/')}/{check_artifact_path(path)}"

    # -- reading -----------------------------------------------------------
    def _group(self, path: str) -> zarr.Group | None:
        import zarr

        check_artifact_path(path)
        try:
            node = self._root[path]
        except (KeyError, FileNotFoundError):
            return None
        return node if isinstance(node, zarr.Group) else None

    def status(self, path: str, key: str | None = None) -> str:
        """'absent', 'incomplete', 'other-key' or 'complete'."""
        g = self._group(path)
        if g is None:
            return "absent"
        attrs = dict(g.attrs)
        if attrs.get("complete") is not True:
            return "incomplete"
        if key is not None and attrs.get("key") != key:
            return "other-key"
        return "complete"

    def is_complete(self, path: str, key: str | None = None) -> bool:
        return self.status(path, key) == "complete"

    def attrs(self, path: str, key: str | None = None) -> dict[str, Any] | None:
        g = self._group(path)
        if g is None or not self.is_complete(path, key):
            return None
        return dict(g.attrs)

    def read(self, path: str, key: str | None = None, names: list[str] | None = None) -> dict[str, np.ndarray] | None:
        """All (or the named) arrays of a complete artifact, or None if it is not complete under `key`."""
        g = self._group(path)
        if g is None or not self.is_complete(path, key):
            return None
        wanted = names if names is not None else sorted(k for k, _ in g.arrays())
        return {n: np.asarray(g[n][...]) for n in wanted}

    def open_array(self, path: str, name: str, key: str | None = None) -> zarr.Array | None:
        """Lazy handle to one array of a complete artifact (for slice-wise reads)."""
        g = self._group(path)
        if g is None or not self.is_complete(path, key):
            return None
        return g[name]

    def list(self, prefix: str) -> list[str]:
        """Names of child groups under a prefix (complete or not)."""
        g = self._group(prefix)
        if g is None:
            return []
        return sorted(k for k, _ in g.groups())

    # -- writing -----------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, path: str, key: str, **attrs: Any) -> Iterator[ArtifactWriter]:
        """Write an artifact; it becomes visible as complete only if the block finishes.

        Any previous content at `path` is first marked incomplete, so a crash while
        rewriting never leaves an old-key artifact that looks current with new data.
        """
        check_artifact_path(path)
        g = _open_or_create_group(self._store, path)
        g.attrs.put({"complete": False})
        for name, _ in list(g.arrays()):
            del g[name]
        writer = ArtifactWriter(g)
        yield writer
        final = dict(g.attrs)
        final.update(attrs)
        final.update({"key": key, "committed_at": time.time(), "complete": True})
        # One attribute write: zarr.json is replaced whole, so 'complete' and 'key' land together.
        g.attrs.put(final)

    def write(self, path: str, key: str, arrays: Mapping[str, np.ndarray], **attrs: Any) -> str:
        with self.writing(path, key, **attrs) as w:
            for name, data in arrays.items():
                w.write(name, data)
        return self.uri(path)

    def delete(self, path: str) -> None:
        check_artifact_path(path)
        with contextlib.suppress(KeyError, FileNotFoundError):
            del self._root[path]
