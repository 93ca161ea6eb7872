"""The workdir's state file: media content hashes cached by stat, and memoised key parts.

Hash once (like git's index or DVC's state db): a file's sha256 is kept with the
stat it was taken under, (path, size, mtime_ns, ctime_ns, inode, device). A later scan
trusts the cached hash only while the file's stat is exactly the same, so a file whose
stat changed is rehashed; if its bytes did not change, its hash (and every cache key
built on it) is unchanged.

Racy clean (git's rule): a file modified in the same filesystem timestamp tick as the
moment its stat was taken keeps the same mtime, so its stat cannot tell the two
versions apart. An entry is therefore trusted only when the file's mtime is strictly
older, by more than the timestamp granularity (`RACY_WINDOW_NS`), than both the moment
its hash was taken and the state file's own write time (its mtime). Anything newer is
rehashed next time, then trusted once it has aged.

The file is written whole to a unique temporary name and renamed (atomic: a crash
leaves the old or the new file, never a torn one), under an advisory lock that
serialises the read-merge-write of concurrent runs; a run that cannot take the lock
still writes atomically, and the worst a lost update costs is a rehash. A missing,
corrupt (checksum, syntax, types) or foreign (other format, version or hash algorithm)
state file is ignored and rebuilt: it is never trusted.

The same file memoises small pure functions of code and config that would otherwise
need a model library to evaluate (e.g. the normalised U-Net configuration in the edit
keys), keyed by their arguments and a fingerprint of the `models` package's source, so
planning and `status` import no torch once a run has seen the same code (see `memo`).
Knows nothing of models or Prefect.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from storage.hashing import CHUNK_BYTES, canonical_json

FORMAT = "audioscenic-workdir-state"
VERSION = 1
ALGORITHM = "sha256"
STATE_DIR = ".audioscenic"
STATE_FILE = "state.json"
# Timestamp granularity allowed for: FAT has 2 s, some network file systems 1 s, ext4 and
# overlayfs a kernel tick (a few ms). A file younger than this at hashing time is rehashed.
RACY_WINDOW_NS = 2_000_000_000

# stat fields an entry must match: size, mtime_ns, ctime_ns, inode, device
_Stat = tuple[int, int, int, int, int]


def state_path(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / STATE_DIR / STATE_FILE


def _stat_key(st: os.stat_result) -> _Stat:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _sha256_file(path: str, chunk_bytes: int = CHUNK_BYTES) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


class HashState:
    """Cached content hashes of local files, persisted in one state file.

    `file_hash(path)` returns the sha256 of the file's bytes, from the cache when the
    file's stat matches a trusted entry, else by reading the file. `save()` writes the
    entries (merged with whatever another run saved meanwhile). Thread-safe.
    """

    def __init__(self, path: str | os.PathLike, racy_window_ns: int = RACY_WINDOW_NS):
        self.path = Path(path)
        self.racy_window_ns = int(racy_window_ns)
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}  # abspath -> [size, mtime, ctime, ino, dev, hash, checked_ns]
        self._memo: dict[str, list] = {}  # memo key -> [code fingerprint, value]
        self._written_ns = 0  # the state file's mtime when loaded (0: none)
        self._dirty: set[str] = set()
        self._dirty_memo: set[str] = set()
        self._gone: set[str] = set()
        self.stats = {"hits": 0, "hashed": 0, "racy": 0, "rebuilt": 0}
        self.load_problem: str | None = None  # why an existing state file was not used
        self._load()

    # -- reading the file --------------------------------------------------
    def _read(self) -> tuple[dict[str, list], dict[str, list], int] | None:
        """Parse the state file; None when it is absent, corrupt or foreign (load_problem says which)."""
        try:
            with open(self.path, "rb") as f:
                written_ns = os.fstat(f.fileno()).st_mtime_ns
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            self.load_problem = f"unreadable ({e})"
            return None
        try:
            head, _, body = raw.partition(b"\n")
            header = json.loads(head)
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError("not an audioscenic state file")
            if header.get("version") != VERSION or header.get("algorithm") != ALGORITHM:
                raise ValueError(f"version {header.get('version')!r}/{header.get('algorithm')!r}, "
                                 f"expected {VERSION}/{ALGORITHM}")
            if header.get("checksum") != hashlib.sha256(body).hexdigest():
                raise ValueError("checksum mismatch")
            data = json.loads(body)
            files, memo = data["files"], data["memo"]
            if not isinstance(files, dict) or not isinstance(memo, dict):
                raise ValueError("bad sections")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            self.load_problem = f"ignored and rebuilt: {e}"
            return None
        good = {p: e for p, e in files.items() if _valid_entry(e)}
        memo = {k: v for k, v in memo.items() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)}
        return good, memo, written_ns

    def _load(self) -> None:
        parsed = self._read()
        if parsed is None:
            if self.load_problem:
                self.stats["rebuilt"] = 1
            return
        self._entries, self._memo, self._written_ns = parsed

    # -- hashing -----------------------------------------------------------
    def _trusted(self, entry: list, st: _Stat) -> bool:
        if tuple(entry[:5]) != st:
            return False
        mtime, checked = st[1], entry[6]
        horizon = min(checked, self._written_ns) if self._written_ns else checked
        return mtime < horizon - self.racy_window_ns

    def file_hash(self, path: str | os.PathLike) -> str:
        """sha256 of a local file's bytes; read only when its stat is not a trusted cache entry."""
        p = os.path.abspath(os.fspath(path))
        try:
            st = _stat_key(os.stat(p))
        except FileNotFoundError:
            with self._lock:
                if self._entries.pop(p, None) is not None:
                    self._gone.add(p)
            raise
        with self._lock:
            entry = self._entries.get(p)
            if entry is not None and self._trusted(entry, st):
                self.stats["hits"] += 1
                return entry[5]
            if entry is not None and tuple(entry[:5]) == st:
                self.stats["racy"] += 1
        checked = time.time_ns()
        digest = _sha256_file(p)
        after = _stat_key(os.stat(p))
        with self._lock:
            self.stats["hashed"] += 1
            if after == st:  # unchanged while we read it: worth remembering
                self._entries[p] = [*st, digest, checked]
                self._dirty.add(p)
                self._gone.discard(p)
        return digest

    def files_hash(self, named: Iterable[tuple[str, str | os.PathLike]]) -> str:
        """`storage.hashing.hash_files` with every file's hash from this cache."""
        from storage.hashing import hash_files

        return hash_files(named, file_hash=self.file_hash)

    # -- memo --------------------------------------------------------------
    def memo_get(self, key: str, code: str) -> tuple[bool, Any]:
        with self._lock:
            v = self._memo.get(key)
        if v is not None and v[0] == code:
            return True, v[1]
        return False, None

    def memo_put(self, key: str, code: str, value: Any) -> None:
        with self._lock:
            self._memo[key] = [code, value]
            self._dirty_memo.add(key)

    # -- writing -----------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return bool(self._dirty or self._dirty_memo or self._gone)

    def save(self, force: bool = False) -> bool:
        """Merge this run's entries into the state file and replace it atomically; False if nothing to do."""
        if not (self.dirty or force):
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.path.with_name(self.path.name + ".lock")):
            with self._lock:
                mine = {p: self._entries[p] for p in self._dirty if p in self._entries}
                my_memo = {k: self._memo[k] for k in self._dirty_memo if k in self._memo}
                gone = set(self._gone)
            on_disk = self._read()
            files, memo = (on_disk[0], on_disk[1]) if on_disk is not None else ({}, {})
            files.update(mine)
            for p in gone:
                files.pop(p, None)
            memo.update(my_memo)
            current = models_fingerprint()
            memo = {k: v for k, v in memo.items() if v[0] == current}  # entries for other code are dead
            body = json.dumps({"files": files, "memo": memo}, separators=(",", ":"), sort_keys=True).encode()
            header = json.dumps({"format": FORMAT, "version": VERSION, "algorithm": ALGORITHM,
                                 "checksum": hashlib.sha256(body).hexdigest(), "files": len(files)}).encode()
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(header + b"\n" + body)
                    f.flush()
                    os.fsync(f.fileno())
                written_ns = os.stat(tmp).st_mtime_ns
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            with self._lock:
                self._entries.update(files)
                self._memo.update(memo)
                self._written_ns = written_ns
                self._dirty.clear()
                self._dirty_memo.clear()
                self._gone.clear()
        return True


_ENTRY_TYPES = [int, int, int, int, int, str, int]


def _valid_entry(e: Any) -> bool:
    return type(e) is list and [type(x) for x in e] == _ENTRY_TYPES and len(e[5]) == 64


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float = 10.0) -> Iterator[None]:
    """An advisory exclusive lock (POSIX flock); without one in time, go on unlocked (writes stay atomic)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    locked = False
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        yield
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ----------------------------------------------------------------------------- per-workdir states, memo

_states: dict[str, HashState] = {}
_states_lock = threading.Lock()
_active: list[HashState] = []  # states whose memo answers `memo` lookups (innermost last)
_process_memo: dict[str, Any] = {}


def open_state(workdir: str | os.PathLike) -> HashState:
    """The state of a workdir, one object per process (loaded on first use)."""
    p = str(state_path(workdir).resolve())
    with _states_lock:
        st = _states.get(p)
        if st is None:
            st = _states[p] = HashState(p)
        return st


def forget_states() -> None:
    """Drop the per-process states (tests: reload from disk)."""
    with _states_lock:
        _states.clear()
        _process_memo.clear()


@contextlib.contextmanager
def using(state: HashState) -> Iterator[HashState]:
    """Within the block, `memo` reads and records through `state` (persisted by its save())."""
    _active.append(state)
    try:
        yield state
    finally:
        with contextlib.suppress(ValueError):
            _active.remove(state)


_fingerprint: str | None = None


def models_fingerprint() -> str:
    """sha256 over the source of the `models` package (its .py files): what a memoised value depends on."""
    global _fingerprint
    if _fingerprint is None:
        import importlib.util

        spec = importlib.util.find_spec("models")
        h = hashlib.sha256()
        for root in sorted(spec.submodule_search_locations or []) if spec else []:
            for name in sorted(os.listdir(root)):
                if name.endswith(".py"):
                    h.update(name.encode() + b"\0")
                    with open(os.path.join(root, name), "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
        _fingerprint = h.hexdigest()
    return _fingerprint


def memo(name: str, args: Any, compute: Callable[[], Any]) -> Any:
    """compute() for a pure function of `args` and the models package's code, memoised.

    The value must be JSON data (it is returned as read back from JSON, so tuples
    come back as lists). Lookups go to the active workdir state (`using`), which
    persists them, then to a per-process table. A compute() that raises is not memoised.
    """
    key = hashlib.sha256(canonical_json({"name": name, "args": args}).encode()).hexdigest()
    code = models_fingerprint()
    for st in reversed(_active):
        found, value = st.memo_get(key, code)
        if found:
            return value
    if key in _process_memo:
        value = _process_memo[key]
    else:
        value = json.loads(json.dumps(compute()))
        _process_memo[key] = value
    for st in _active:
        st.memo_put(key, code, value)
    return value
