"""Issue 16: media hashes are cached by stat in the workdir's state file, and never trusted when they should not be."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os

import pytest

from storage import state as state_mod
from storage.state import HashState

HOUR_NS = 3600 * 10**9


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def age(path, by_ns: int = HOUR_NS) -> None:
    """Set a file's mtime back (an old download): outside the racy window of any later write."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - by_ns))


def test_unchanged_file_is_read_once(tmp_path):
    f = tmp_path / "a.wav"
    f.write_bytes(b"abc" * 1000)
    age(f)
    s = HashState(tmp_path / "state.json")
    assert s.file_hash(f) == sha(b"abc" * 1000) and s.stats["hashed"] == 1
    assert s.save()
    again = HashState(tmp_path / "state.json")
    assert again.file_hash(f) == sha(b"abc" * 1000)
    assert again.stats == {"hits": 1, "hashed": 0, "racy": 0, "rebuilt": 0}
    assert not again.save()  # nothing learnt: the file is not rewritten


def test_touched_file_is_rehashed_and_found_unchanged(tmp_path):
    f = tmp_path / "a.wav"
    f.write_bytes(b"same bytes")
    age(f)
    HashState(tmp_path / "s.json").file_hash(f)
    s = HashState(tmp_path / "s.json")
    s.file_hash(f)
    s.save()
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10**9))  # touch: new mtime, same bytes
    t = HashState(tmp_path / "s.json")
    assert t.file_hash(f) == sha(b"same bytes")
    assert t.stats["hashed"] == 1 and t.stats["hits"] == 0


def test_changed_file_gets_its_new_hash(tmp_path):
    f = tmp_path / "a.wav"
    f.write_bytes(b"version 1")
    age(f)
    s = HashState(tmp_path / "s.json")
    s.file_hash(f)
    s.save()
    f.write_bytes(b"version 2 is longer")
    assert HashState(tmp_path / "s.json").file_hash(f) == sha(b"version 2 is longer")


def test_racy_entry_is_rehashed_not_trusted(tmp_path):
    """A file whose mtime is within the timestamp granularity of the cache write is read again next time."""
    f = tmp_path / "a.wav"
    f.write_bytes(b"fresh")  # mtime: now, i.e. within RACY_WINDOW_NS of the state write below
    s = HashState(tmp_path / "s.json")
    s.file_hash(f)
    s.save()
    t = HashState(tmp_path / "s.json")
    assert t.file_hash(f) == sha(b"fresh")
    assert t.stats["racy"] == 1 and t.stats["hashed"] == 1 and t.stats["hits"] == 0
    # Once the file is older than the window before its hash and the state write, it is trusted.
    age(f)
    t.file_hash(f)
    t.save()
    u = HashState(tmp_path / "s.json")
    u.file_hash(f)
    assert u.stats["hits"] == 1 and u.stats["hashed"] == 0


def test_racy_rule_catches_a_change_the_stat_cannot_show(tmp_path, monkeypatch):
    """Same size, same inode, mtime set back to the same nanosecond, ctime not compared (as on a coarse
    file system): only the racy rule stops the old hash from being served."""
    real = state_mod._stat_key
    monkeypatch.setattr(state_mod, "_stat_key", lambda st: (*real(st)[:2], 0, *real(st)[3:]))
    f = tmp_path / "a.wav"
    f.write_bytes(b"AAAA")
    mtime = os.stat(f).st_mtime_ns
    s = HashState(tmp_path / "s.json")
    assert s.file_hash(f) == sha(b"AAAA")
    s.save()
    with open(f, "r+b") as fh:  # rewritten in place, within the same timestamp tick as far as the stat shows
        fh.write(b"BBBB")
    os.utime(f, ns=(os.stat(f).st_atime_ns, mtime))
    assert HashState(tmp_path / "s.json").file_hash(f) == sha(b"BBBB")
    # Control: with no racy window, the identical stat would have been trusted and the old hash served.
    s2 = HashState(tmp_path / "s2.json", racy_window_ns=-10 * HOUR_NS)
    with open(f, "r+b") as fh:
        fh.write(b"AAAA")
    os.utime(f, ns=(os.stat(f).st_atime_ns, mtime))
    s2.file_hash(f)
    s2.save()
    with open(f, "r+b") as fh:
        fh.write(b"CCCC")
    os.utime(f, ns=(os.stat(f).st_atime_ns, mtime))
    assert HashState(tmp_path / "s2.json", racy_window_ns=-10 * HOUR_NS).file_hash(f) == sha(b"AAAA")


def _valid_state_with_a_lie(tmp_path, f):
    """A well-formed state file whose entry for f matches f's stat but records a wrong hash."""
    s = HashState(tmp_path / "s.json")
    s.file_hash(f)
    s.save()
    raw = (tmp_path / "s.json").read_bytes()
    head, _, body = raw.partition(b"\n")
    return json.loads(head), json.loads(body)


def write_state(path, header, data):
    body = json.dumps(data).encode()
    header = {**header, "checksum": hashlib.sha256(body).hexdigest()}
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bit flip", "foreign format", "old version",
                                    "other algorithm", "bad entry"])
def test_corrupt_or_foreign_state_is_rebuilt_never_trusted(tmp_path, damage):
    f = tmp_path / "a.wav"
    f.write_bytes(b"the real bytes")
    age(f)
    header, data = _valid_state_with_a_lie(tmp_path, f)
    lie = "0" * 64
    data["files"][str(f)][5] = lie
    path = tmp_path / "s.json"
    if damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "truncated":
        write_state(path, header, data)
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "bit flip":  # a lying hash under the checksum of the true file
        good = HashState(path)  # rewrite the honest state first
        good.save(force=True)
        raw = path.read_bytes()
        path.write_bytes(raw.replace(sha(b"the real bytes").encode(), lie.encode()))
    elif damage == "foreign format":
        write_state(path, {**header, "format": "someone-elses-index"}, data)
    elif damage == "old version":
        write_state(path, {**header, "version": 0}, data)
    elif damage == "other algorithm":
        write_state(path, {**header, "algorithm": "md5"}, data)
    elif damage == "bad entry":
        data["files"][str(f)] = [1, 2, "x"]
        write_state(path, header, data)
    s = HashState(path)
    assert s.file_hash(f) == sha(b"the real bytes")
    assert s.stats["hits"] == 0 and s.stats["hashed"] == 1
    if damage != "bad entry":  # a bad entry is dropped alone; anything else discards the file
        assert s.load_problem is not None and s.stats["rebuilt"] == 1
    s.save()
    rebuilt = HashState(path)
    assert rebuilt.load_problem is None
    assert rebuilt.file_hash(f) == sha(b"the real bytes") and rebuilt.stats["hits"] == 1


def test_crash_during_save_leaves_the_old_state(tmp_path, monkeypatch):
    f, g = tmp_path / "a.wav", tmp_path / "b.wav"
    f.write_bytes(b"a")
    g.write_bytes(b"b")
    age(f)
    age(g)
    s = HashState(tmp_path / "s.json")
    s.file_hash(f)
    s.save()
    before = (tmp_path / "s.json").read_bytes()
    t = HashState(tmp_path / "s.json")
    t.file_hash(g)

    def crash(*a, **k):
        raise OSError("power cut")

    monkeypatch.setattr(state_mod.os, "replace", crash)
    with pytest.raises(OSError):
        t.save()
    monkeypatch.undo()
    assert (tmp_path / "s.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    u = HashState(tmp_path / "s.json")
    assert u.load_problem is None and u.file_hash(f) == sha(b"a") and u.stats["hits"] == 1


def _worker(args):
    path, files = args
    for f in files:
        s = HashState(path)
        s.file_hash(f)
        s.save()
    return len(files)


def test_concurrent_runs_merge_their_entries(tmp_path):
    files = []
    for i in range(24):
        f = tmp_path / f"{i}.wav"
        f.write_bytes(bytes([i]) * 100)
        age(f)
        files.append(f)
    path = tmp_path / "state" / "s.json"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        assert sum(pool.map(_worker, [(path, files[k::4]) for k in range(4)])) == 24
    s = HashState(path)
    assert s.load_problem is None
    assert [s.file_hash(f) for f in files] == [sha(bytes([i]) * 100) for i in range(24)]
    assert s.stats["hits"] == 24  # every run's entries survived every other run's saves
