import multiprocessing as mp

import pytest

from storage import Ledger


def _append_many(url, worker, n, per_batch):
    led = Ledger(url)
    for b in range(n):
        led.append([dict(stage="audio", item_id=f"w{worker}-b{b}-{i}", key=f"k{worker}") for i in range(per_batch)])


def test_concurrent_appends_lose_no_row(tmp_path):
    url = str(tmp_path / "ledger")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(url, w, 25, 4)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    table = Ledger(url).read()
    assert table.num_rows == 2 * 25 * 4
    assert len(set(table["item_id"].to_pylist())) == 200
    assert len(set(table["row_id"].to_pylist())) == 200


def test_query_filters(tmp_path):
    led = Ledger(tmp_path)
    led.append([dict(stage="audio", item_id="a", key="k1"), dict(stage="video", item_id="a", key="k2"),
                dict(stage="audio", item_id="b", key="k3", status="failed", error="boom")])
    assert led.read(stage="audio").num_rows == 2
    assert led.read(item_ids=["a"]).num_rows == 2
    assert led.read(keys=["k3"])["error"].to_pylist() == ["boom"]
    assert led.read(stage="audio", status="done")["item_id"].to_pylist() == ["a"]


def test_latest_row_wins(tmp_path):
    led = Ledger(tmp_path)
    led.append([dict(stage="audio", item_id="a", key="old", finished_at=1.0)])
    led.append([dict(stage="audio", item_id="a", key="new", finished_at=2.0)])
    assert led.latest("audio")["a"]["key"] == "new"


def test_compaction_dedupes_and_keeps_history(tmp_path):
    led = Ledger(tmp_path)
    for _ in range(3):  # the same result recorded by three workers
        led.append([dict(stage="edit", item_id="v/a", key="k")])
    led.append([dict(stage="edit", item_id="v/a", key="k2")])
    stats = led.compact()
    assert stats == {"fragments_before": 4, "rows_before": 4, "rows_after": 2}
    assert len(led.fragment_paths()) == 1
    assert sorted(led.read()["key"].to_pylist()) == ["k", "k2"]
    led.append([dict(stage="edit", item_id="v/b", key="k")])
    assert led.read().num_rows == 3  # appends after compaction still land


def test_rows_need_identity(tmp_path):
    with pytest.raises(ValueError, match="lacks item_id"):
        Ledger(tmp_path).append([dict(stage="audio", key="k")])
    with pytest.raises(ValueError, match="status"):
        Ledger(tmp_path).append([dict(stage="audio", item_id="a", key="k", status="maybe")])


def test_partial_fragment_is_invisible(tmp_path):
    led = Ledger(tmp_path)
    led.append([dict(stage="audio", item_id="a", key="k")])
    (tmp_path / "fragments" / ".123-abc.parquet.tmp").write_bytes(b"PAR1 half written")
    assert led.read().num_rows == 1
