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
