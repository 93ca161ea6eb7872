import multiprocessing as mp
import os

import numpy as np
import pytest

from storage import ArtifactStore
from storage.artifacts import ArtifactPathError


def test_round_trip_and_key_check(tmp_path):
    s = ArtifactStore(tmp_path / "store.zarr")
    arrays = {"embedding": np.random.default_rng(0).normal(size=1024).astype(np.float32),
              "frames": np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)}
    assert s.status("audio/x") == "absent"
    s.write("audio/x", "k1", arrays, sample_rate=16000)
    got = s.read("audio/x", "k1")
    for name in arrays:
        np.testing.assert_array_equal(got[name], arrays[name])
        assert got[name].dtype == arrays[name].dtype
    assert s.attrs("audio/x", "k1")["sample_rate"] == 16000
    assert s.status("audio/x", "k1") == "complete"
    assert s.status("audio/x", "k2") == "other-key"
    assert s.read("audio/x", "k2") is None


def _crash_while_writing(root, path):
    s = ArtifactStore(root)
    with s.writing(path, "new-key") as w:
        w.write("a", np.ones(100, np.float32))
        os._exit(9)  # killed mid-write: the commit never happens


def test_crash_between_write_and_commit_reads_as_absent(tmp_path):
    root = str(tmp_path / "store.zarr")
    ArtifactStore(root).write("edits/v/a", "old-key", {"a": np.zeros(100, np.float32)})
    p = mp.get_context("spawn").Process(target=_crash_while_writing, args=(root, "edits/v/a"))
    p.start()
    p.join(60)
    assert p.exitcode == 9
    s = ArtifactStore(root)
    assert s.status("edits/v/a") == "incomplete"
    assert s.read("edits/v/a") is None
    assert s.read("edits/v/a", "old-key") is None  # the old artifact is not resurrected either
    assert s.read("edits/v/a", "new-key") is None


def test_exception_inside_writing_leaves_incomplete(tmp_path):
    s = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with s.writing("video/v", "k") as w:
            w.write("frames", np.zeros((2, 4, 4, 3), np.uint8))
            raise RuntimeError("boom")
    assert s.status("video/v", "k") == "incomplete"
    s.write("video/v", "k", {"frames": np.ones((2, 4, 4, 3), np.uint8)})
    assert s.read("video/v", "k")["frames"].sum() == 2 * 4 * 4 * 3


def test_rewrite_replaces_arrays(tmp_path):
    s = ArtifactStore(tmp_path)
    s.write("audio/a", "k1", {"x": np.zeros(3), "y": np.zeros(2)})
    s.write("audio/a", "k2", {"x": np.ones(5)})
    assert sorted(s.read("audio/a", "k2")) == ["x"]  # stale arrays of the old key are gone


def test_slice_writes_and_chunking(tmp_path):
    s = ArtifactStore(tmp_path)
    with s.writing("video/v", "k") as w:
        arr = w.create("latents", (10, 4, 96, 96), np.float32)
        for i in range(0, 10, 3):
            arr[i : i + 3] = i
    a = s.open_array("video/v", "latents", "k")
    assert a.chunks[0] >= 1 and np.prod(a.chunks) * 4 >= 1 << 20  # >= 1 MB chunks
    np.testing.assert_array_equal(a[9], np.full((4, 96, 96), 9, np.float32))


@pytest.mark.parametrize("bad", ["../x", "audio/../../etc", "/abs", "a//b", ".hidden", "a/b c", ""])
def test_unsafe_paths_rejected(tmp_path, bad):
    with pytest.raises(ArtifactPathError):
        ArtifactStore(tmp_path).write(bad, "k", {"a": np.zeros(1)})


def test_fsspec_url(tmp_path):
    s = ArtifactStore("memory://audioscenic-test/store.zarr")
    s.write("audio/m", "k", {"a": np.arange(4)})
    assert s.read("audio/m", "k")["a"].tolist() == [0, 1, 2, 3]
    assert s.list("audio") == ["m"]


def test_bfloat16_refused(tmp_path):
    import torch

    with pytest.raises(TypeError, match="bfloat16"):
        ArtifactStore(tmp_path).write("a/b", "k", {"x": np.asarray(torch.zeros(2, dtype=torch.bfloat16).view(torch.int16).numpy().view("V2"))})


def test_a_store_another_worker_creates_first_still_opens(tmp_path, monkeypatch):
    """Two workers starting on an empty store both find it absent; the loser's create must not fail."""
    import zarr

    real = zarr.open_group

    def lose_the_race(*args, mode=None, **kwargs):
        if mode == "a":
            real(*args, mode="a", **kwargs)  # the other worker creates the group first
            raise zarr.errors.ContainsGroupError("A group exists in store")
        return real(*args, mode=mode, **kwargs)

    monkeypatch.setattr(zarr, "open_group", lose_the_race)
    s = ArtifactStore(tmp_path / "store.zarr")
    s.write("audio/x", "k1", {"a": np.arange(3)})
    monkeypatch.undo()
    assert np.array_equal(ArtifactStore(tmp_path / "store.zarr").read("audio/x", "k1")["a"], np.arange(3))


def test_workers_opening_one_new_store_at_once(tmp_path):
    import threading

    barrier, errors = threading.Barrier(6), []

    def worker(i):
        try:
            barrier.wait()
            ArtifactStore(tmp_path / "store.zarr").write(f"audio/c{i}", f"k{i}", {"a": np.full(4, i)})
        except Exception as e:  # pragma: no cover - the failure being tested for
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = ArtifactStore(tmp_path / "store.zarr")
    assert all(np.array_equal(s.read(f"audio/c{i}", f"k{i}")["a"], np.full(4, i)) for i in range(6))
