"""Stage batches on a Dask cluster (prefect-dask) give the same artifacts as the default runner."""
import yaml

from flows.cli import main
from storage import ArtifactStore, Ledger
from tasks.sample_data import write_sample_data


def test_pipeline_on_local_dask_cluster(prefect_server, tmp_path, capsys):
    data = write_sample_data(tmp_path / "data", videos=1, clips=2, seed=4, frames=8)
    results = {}
    for runner, execution in (("default", {}), ("dask", {"dask_address": "local", "dask_workers": 1, "max_concurrency": 2})):
        config = tmp_path / f"{runner}.yaml"
        config.write_text(yaml.safe_dump({
            "workdir": str(tmp_path / runner),
            "catalogs": {"audio": [{"kind": "esc50", "root": str(data.esc50_root)}]},
            "stages": {"audio": {"batch_size": 1}}, "execution": execution,
        }))
        assert main(["run", str(config)]) == 0
        assert "audio: 2 computed" in capsys.readouterr().out
        ledger, store = Ledger(tmp_path / runner / "ledger"), ArtifactStore(tmp_path / runner / "store.zarr")
        results[runner] = {r["item_id"]: (r["key"], store.read(f"audio/{r['item_id']}", r["key"])) for r in ledger.read(stage="audio").to_pylist()}
    assert results["default"].keys() == results["dask"].keys()
    for item, (key, arrays) in results["default"].items():
        dkey, darrays = results["dask"][item]
        assert dkey == key
        for name in arrays:
            assert (arrays[name] == darrays[name]).all()
