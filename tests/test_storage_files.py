"""storage.files.atomic_path: a file appears whole or not at all."""
import threading

import pytest

from storage.files import atomic_path


def test_success_replaces_and_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "sub" / "table.parquet"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".table.parquet.")
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.parquet"]  # no temporary left behind


def test_concurrent_writers_never_share_a_temporary(tmp_path):
    target = tmp_path / "catalog.parquet"
    errors = []
    barrier = threading.Barrier(8)

    def write(i):
        try:
            with atomic_path(target) as tmp:
                barrier.wait()  # all eight hold their temporaries at once
                tmp.write_text(str(i) * 1000)
        except Exception as e:  # pragma: no cover - the failure being tested for
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    text = target.read_text()
    assert len(set(text)) == 1 and len(text) == 1000  # one writer's whole content
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.parquet"]


def test_temporary_names_fit_any_legal_name(tmp_path):
    from storage.files import NAME_MAX, bounded_name, temp_name

    for name in ("x" * 255, "é" * 127 + "x", "a" * 244 + ".wav"):  # legal: at most 255 bytes
        tmp = temp_name(name)
        assert len(tmp.encode()) <= NAME_MAX and tmp.startswith(".") and tmp.endswith(".tmp")
        (tmp_path / tmp).write_text("ok")  # the filesystem takes it (a cut 'é' is dropped, not split)
        target = tmp_path / name
        with atomic_path(target) as t:
            t.write_text(name)
        assert target.read_text() == name
    assert temp_name("short.mp4").startswith(".short.mp4.")
    # Names built from ids: unchanged when short, else cut with a hash of the whole (distinct stems stay distinct).
    assert bounded_name("edit-a-b-full", ".yaml") == "edit-a-b-full.yaml"
    long_a, long_b = bounded_name("v" * 300 + "a", ".yaml"), bounded_name("v" * 300 + "b", ".yaml")
    assert long_a != long_b and len(long_a) == 200 and long_a.endswith(".yaml")
