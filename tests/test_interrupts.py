"""Stopping cleanly: a stop request at safe points, Ctrl-C on `audioscenic run`, two runs at once.

Unit tests drive tasks.stage.run_items and fine-tuning directly; the CLI tests send a real
SIGINT to the process group of `audioscenic run` (a subprocess with its own temporary
Prefect server, as a user's terminal would) while it fine-tunes and while it edits.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from storage import ArtifactStore, Ledger, StageKey
from storage.claims import Claims
from tasks import interrupts
from tasks.stage import WorkItem, run_items

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    interrupts.reset()
    yield
    interrupts.reset()


def _items(n: int) -> list[WorkItem]:
    return [WorkItem("toy", f"i{k}", f"toy/i{k}", StageKey("toy", "1", f"p{k}", "in")) for k in range(n)]


def test_stop_request_starts_no_new_item_and_drops_the_item_in_flight(tmp_path):
    store, ledger = ArtifactStore(tmp_path / "store.zarr"), Ledger(tmp_path / "ledger")
    claims = Claims(tmp_path / "claims")
    seen = []

    def compute(item, writer):
        seen.append(item.item_id)
        writer.write("x", np.arange(3))
        if item.item_id == "i1":
            interrupts.request_stop("test")  # a signal arrives while i1 runs ...
            interrupts.check()  # ... and i1 reaches its next safe point
        writer.write("y", np.arange(3))

    r = run_items(_items(4), store, ledger, compute, claims=claims)
    assert seen == ["i0", "i1"]  # nothing started after the stop
    assert r.computed == ["i0"] and r.failed == {} and r.interrupted
    assert r.not_started == ["i1", "i2", "i3"]
    assert store.is_complete("toy/i0", _items(4)[0].key.key)
    assert not store.is_complete("toy/i1", _items(4)[1].key.key)  # in flight: never committed
    assert sorted(ledger.latest("toy")) == ["i0"]  # the finished row reached the ledger, no failure recorded
    assert list((tmp_path / "claims").iterdir()) == []  # the claim of the dropped item was released


def test_an_item_another_worker_holds_is_waited_for_not_failed(tmp_path):
    store, ledger = ArtifactStore(tmp_path / "store.zarr"), Ledger(tmp_path / "ledger")
    items = _items(3)
    other = Claims(tmp_path / "claims")  # another worker's claims (its own owner token)
    held = f"{items[1].artifact}@{items[1].key.key}"
    assert other.acquire(held)

    def other_worker_finishes():
        time.sleep(1.0)
        store.write(items[1].artifact, items[1].key.key, {"x": np.full(3, 7)})
        other.release(held)

    t = threading.Thread(target=other_worker_finishes)
    t.start()
    computed = []
    r = run_items(items, store, ledger, lambda it, w: (computed.append(it.item_id), w.write("x", np.zeros(3))),
                  claims=Claims(tmp_path / "claims"))
    t.join()
    assert computed == ["i0", "i2"]  # the held item was not computed twice ...
    assert r.adopted == ["i1"] and r.busy == [] and not r.failed  # ... it was waited for and adopted
    assert np.array_equal(store.read("toy/i1", items[1].key.key)["x"], np.full(3, 7))
    assert sorted(ledger.latest("toy")) == ["i0", "i1", "i2"]


def test_an_item_whose_holder_gives_up_is_computed_here(tmp_path):
    store, ledger = ArtifactStore(tmp_path / "store.zarr"), Ledger(tmp_path / "ledger")
    items = _items(1)
    other = Claims(tmp_path / "claims")
    held = f"{items[0].artifact}@{items[0].key.key}"
    assert other.acquire(held)
    threading.Timer(0.5, other.release, args=(held,)).start()  # it stops without committing
    r = run_items(items, store, ledger, lambda it, w: w.write("x", np.ones(2)), claims=Claims(tmp_path / "claims"))
    assert r.computed == ["i0"] and r.busy == []


def test_waiting_is_bounded_and_a_stop_ends_it(tmp_path):
    store, ledger = ArtifactStore(tmp_path / "store.zarr"), Ledger(tmp_path / "ledger")
    items = _items(1)
    other = Claims(tmp_path / "claims")
    assert other.acquire(f"{items[0].artifact}@{items[0].key.key}")
    t0 = time.monotonic()
    r = run_items(items, store, ledger, lambda it, w: None, claims=Claims(tmp_path / "claims"), max_wait_s=0.6)
    assert r.busy == ["i0"] and not r.interrupted and 0.5 < time.monotonic() - t0 < 5
    threading.Timer(0.5, interrupts.request_stop, args=("test",)).start()
    t0 = time.monotonic()
    r = run_items(items, store, ledger, lambda it, w: None, claims=Claims(tmp_path / "claims"))
    assert r.interrupted and r.not_started == ["i0"] and time.monotonic() - t0 < 5


def test_finetuning_stopped_at_a_step_checkpoints_and_resumes_to_the_same_weights(tmp_path):
    import torch

    from models.ddim import tiny_scheduler_config
    from models.unet3d import AudioCondition, preset
    from tasks.finetune import TrainSettings, train

    def setup():
        torch.manual_seed(0)
        model = preset("tiny", seed=0)
        g = torch.Generator().manual_seed(1)
        z0 = torch.randn(1, 4, 4, 8, 8, generator=g)
        audio = AudioCondition(embedding=torch.randn(1, 1024, generator=g), magnitude=torch.rand(1, 4, generator=g),
                               mel=torch.randn(1, 4, 128, generator=g))
        prompt = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g)
        return model, z0, audio, prompt

    from diffusers import DDIMScheduler

    alphas = DDIMScheduler(**tiny_scheduler_config()).alphas_cumprod
    s = TrainSettings(steps=8, checkpoint_every=100, seed=3)  # no regular checkpoint before the end
    model, z0, audio, prompt = setup()
    ref = train(model, z0, audio, prompt, alphas, s)
    ref_weights = {n: p.detach().clone() for n, p in zip(model.trainable_parameter_names(), model.trainable_parameters())}

    ckpt = tmp_path / "run.checkpoint.pt"
    model, z0, audio, prompt = setup()

    def stop_at_3(step, loss):
        if step == 3:
            interrupts.request_stop("test")

    with pytest.raises(interrupts.Interrupted):
        train(model, z0, audio, prompt, alphas, s, checkpoint=ckpt, run_key="k", callback=stop_at_3)
    assert torch.load(ckpt, weights_only=True)["step"] == 3  # the safe point wrote a checkpoint
    interrupts.reset()
    model, z0, audio, prompt = setup()
    resumed = train(model, z0, audio, prompt, alphas, s, checkpoint=ckpt, run_key="k")
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(ref.losses, abs=1e-6)
    for n, p in zip(model.trainable_parameter_names(), model.trainable_parameters()):
        assert torch.allclose(p, ref_weights[n], atol=1e-6), n


# ----------------------------------------------------------------------------- the CLI, real signals


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One PREFECT_HOME for this module's CLI runs: the temporary server's database is migrated once."""
    return tmp_path_factory.mktemp("prefect-home")


def _env(home: Path) -> dict[str, str]:
    """As a user's shell has it: no Prefect API configured, so each run starts its own temporary server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", OMP_NUM_THREADS="1")
    return env


def _config(tmp_path: Path, data, name: str, **stages) -> Path:
    from tasks.config import QUICK_STAGES

    work = tmp_path / name
    work.mkdir()
    st = copy.deepcopy(QUICK_STAGES)
    for k, v in stages.items():
        st.setdefault(k, {}).update(v)
    cfg = {"workdir": ".", "catalogs": {"videos": [{"kind": "davis", "root": str(data.davis_root)}],
                                        "audio": [{"kind": "esc50", "root": str(data.esc50_root)}]},
           "models": {"preset": "tiny"}, "stages": st, "report": {"dir": None}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    return work / "config.yaml"


def _start(config: Path, env) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "audioscenic"), "run", str(config)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(cond, proc, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc.poll() is not None:
            out = (proc.stdout.read() if proc.stdout else "") + (proc.stderr.read()[-3000:] if proc.stderr else "")
            pytest.fail(f"the run ended before {what}: {proc.returncode}\n{out}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _computed(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+): (\d+) computed", out, re.M)}


def _in_flight(work: Path, prefix: str) -> bool:
    """An artifact under store.zarr/<prefix> is being written (its group exists, not yet complete)."""
    for meta in (work / "store.zarr" / prefix).rglob("zarr.json") if (work / "store.zarr" / prefix).exists() else []:
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue
        if attrs.get("complete") is False:
            return True
    return False


def _interrupt(proc: subprocess.Popen) -> tuple[int, str, str, float, set[int]]:
    kids = _children(proc.pid)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground process group
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("audioscenic run did not stop within 60 s of Ctrl-C")
    return proc.returncode, out, err, time.monotonic() - t0, kids


@pytest.mark.heavy(270)
def test_ctrl_c_during_finetuning_and_editing_stops_cleanly_and_the_rerun_resumes(tmp_path, prefect_home):
    from tasks.sample_data import write_sample_data

    data = write_sample_data(tmp_path / "data", videos=1, clips=2, seed=4, frames=8)
    config = _config(tmp_path, data, "work", finetune={"steps": 50, "checkpoint_every": 2},
                     inversion={"steps": 20})
    work, env = config.parent, _env(prefect_home)

    # 1. Ctrl-C while fine-tuning (its checkpoint file shows it is under way).
    proc = _start(config, env)
    _wait_for(lambda: any(work.rglob("*.checkpoint.pt")), proc, "fine-tuning")
    code, out, err, took, kids = _interrupt(proc)
    assert code == 130, out + err[-3000:]
    assert took < 30
    assert "stopped" in out and "finetune: 0 computed" in out and "1 not started" in out
    assert "Traceback" not in err and "ConnectError" not in err
    assert kids and not any(_alive(k) for k in kids)  # the temporary Prefect server is gone too
    ledger = Ledger(work / "ledger")
    assert sorted(ledger.latest("latents")) and not ledger.latest("finetune")  # finished stages recorded
    assert list((work / "ledger" / "claims").iterdir()) == []

    # 2. Rerun, Ctrl-C while editing: nothing committed before is redone; fine-tuning resumes from its checkpoint.
    proc = _start(config, env)
    _wait_for(lambda: _in_flight(work, "edits"), proc, "an edit")
    code, out, err, took, kids = _interrupt(proc)
    assert code == 130 and took < 30, out + err[-3000:]
    done = _computed(out)
    assert done["audio"] == done["frames"] == done["latents"] == 0 and done["finetune"] == 1, out
    (ft,) = ledger.latest("finetune").values()
    from tasks.finetune import artifact_path

    attrs = ArtifactStore(work / "store.zarr").attrs(artifact_path(*ft["item_id"].split("/")), ft["key"])
    assert attrs["resumed_from_step"] > 0  # the stop at a step had checkpointed it
    assert not any(_alive(k) for k in kids)

    # 3. Rerun to the end: only the rest is done.
    proc = _start(config, env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err[-3000:]
    done = _computed(out)
    assert done["finetune"] == done["inversion"] == 0 and done["edit"] >= 1, out
    assert len(ledger.latest("edit")) == 2 and all(r["status"] == "done" for r in ledger.latest("edit").values())


def test_two_runs_of_one_config_at_once_both_succeed_and_compute_everything_once(tmp_path, prefect_home):
    from tasks.sample_data import write_sample_data

    data = write_sample_data(tmp_path / "data", videos=1, clips=2, seed=5, frames=8)
    config = _config(tmp_path, data, "work")
    env = _env(prefect_home)
    procs = [_start(config, env) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err[-3000:]
        assert "failed" not in out.replace("0 failed", ""), out
    a, b = (_computed(out) for out, _ in outs)
    ledger = Ledger(config.parent / "ledger")
    for stage in ("audio", "frames", "masks", "depth", "latents", "finetune", "inversion", "edit"):
        n = len(ledger.latest(stage))
        assert n > 0 and a.get(stage, 0) + b.get(stage, 0) == n, (stage, a, b)  # each artifact computed once
        assert all(r["status"] == "done" for r in ledger.latest(stage).values())


def test_first_signal_requests_a_stop_second_exits_at_once(tmp_path):
    script = tmp_path / "two_signals.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tasks import interrupts\n"
        "with interrupts.handle_signals():\n"
        "    interrupts.on_force_exit(lambda: print('hook ran', flush=True))\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    print('stop requested:', interrupts.stop_requested(), interrupts.stop_reason(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "    print('still running', flush=True)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130
    assert r.stdout.splitlines() == ["stop requested: True SIGTERM", "hook ran"]
    assert "stopping after the current step" in r.stderr and "stopped at once" in r.stderr


def test_sigterm_to_a_flow_run_outside_the_cli_stops_its_batches_cleanly(tmp_path, prefect_home):
    """What a worker does to a flow run cancelled from the Prefect UI: SIGTERM to the flow's process,
    where Prefect's engine turns it into TerminationSignal. The batches stop at a safe point first."""
    from tasks.sample_data import write_sample_data

    data = write_sample_data(tmp_path / "data", videos=1, clips=1, seed=6, frames=8)
    config = _config(tmp_path, data, "work", finetune={"steps": 80, "checkpoint_every": 2})
    work = config.parent
    log = (tmp_path / "flow.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import flows; "
         f"from flows.pipeline import pipeline_flow; pipeline_flow({str(config)!r})"],
        env=_env(prefect_home), cwd=REPO, text=True, stdout=log, stderr=log, start_new_session=True)
    try:
        _wait_for(lambda: any(work.rglob("*.checkpoint.pt")), proc, "fine-tuning")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # to the flow's process only, as a worker does
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its temporary Prefect server (a worker would have a real API)
        log.close()
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0  # the flow run ends as cancelled/crashed, not completed
    assert list((work / "ledger" / "claims").iterdir()) == []  # the stopped batch released its claim
    ledger = Ledger(work / "ledger")
    assert ledger.latest("latents") and not ledger.latest("finetune")  # finished rows flushed, no false failure
    ckpt = next(work.rglob("*.checkpoint.pt"))
    import torch

    assert torch.load(ckpt, weights_only=True)["step"] < 80  # stopped mid-training, checkpointed for the rerun
