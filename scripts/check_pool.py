#!/usr/bin/env python3
"""One grid over a pool of workers on real services (issue 15), run by CI through tests/test_pool.py.

Starts, all on loopback and all throwaway:
  - PostgreSQL (initdb in a temporary folder, as the `postgres` user when run as root),
  - a Prefect server on that database,
  - moto's S3 server, holding the store, the ledger and the claims (through s3fs),
  - the work pools, `prefect deploy` of fanout-grid and video-stages from prefect.yaml,
  - a grid worker (fan-out parents) and two process workers on one pool, each in a UTS
    namespace of its own when possible, so that they are two hosts to the claims,
then runs fan-out grids of sample data (2 videos x 2 clips, tiny models):
  1. the grid's frames only, two workers, each frame item waiting FRAMES_WAIT_S (a stage whose
     work is mostly waiting, like a GPU's), timed;
  2. the whole grid, fresh, two workers, with 5 s claim leases: after gpu-2 has committed its
     first edit (each edit waits EDIT_WAIT_S), gpu-2 and its flow run are SIGKILLed. Checked:
     the run Completes; both workers took child runs; the lost child was declared Crashed
     (no heartbeats) and started again on gpu-1, which adopted what gpu-2 had committed and
     took over the edit gpu-2 held once its lease lapsed; every artifact computed exactly
     once (one done ledger row per item, spanning its store commit, or for what gpu-2
     committed, an adoption with the commit before the kill); no claim file left;
  3. the frames again (keys of their own), one worker, timed: 1. took <= 0.65x of 3.
Then everything is stopped, and no process it started may be left.

Usage: scripts/check_pool.py [KEEP_DIR] [--only timing,grid,kill]
Exit 0 on success; 1 with a message (and log tails) otherwise. Every step has a time limit,
the whole check CHECK_TIMEOUT seconds (default 900; it takes 7-11 minutes on two busy cores). Figures go to KEEP_DIR/result.json.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
GPU_POOL, GRID_POOL = "audioscenic-process", "audioscenic-grid"
FANOUT = "audioscenic-grid-fanout/fanout-grid"
BUCKET = "audioscenic-test"
CHECK_TIMEOUT = float(os.environ.get("CHECK_TIMEOUT", 900))
EDIT_WAIT_S = float(os.environ.get("EDIT_WAIT_S", 5))  # per edit of the grid run: time to kill a worker mid-edit
FRAMES_WAIT_S = float(os.environ.get("FRAMES_WAIT_S", 60))  # per video in the timed runs: the "GPU" part
CLAIM_LEASE_S = 5
RUN_TIMEOUT = float(os.environ.get("RUN_TIMEOUT", 420))  # one fan-out run, queued to final
HEARTBEAT_S = 30  # Prefect's minimum flow-run heartbeat period
LOST_AFTER_S = 45  # the parent's bound on a child's silence (> one heartbeat period, with slack)
MAX_RATIO = 0.65
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[check_pool {time.monotonic() - T0:5.0f}s] {msg}", flush=True)


class CheckFailed(Exception):
    pass


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, ok, timeout: float, every: float = 0.5, alive=None):
    deadline = time.monotonic() + timeout
    while True:
        value = ok()
        if value:
            return value
        if alive is not None and not alive():
            raise CheckFailed(f"{what}: the process exited (see its log)")
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {timeout:.0f}s")
        time.sleep(every)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status < 500
    except Exception:
        return False


class Procs:
    """Everything this check starts, marked in its environment so that nothing escapes the cleanup."""

    def __init__(self, work: Path):
        self.work = work
        self.mark = f"AUDIOSCENIC_POOL_CHECK={os.getpid()}-{random.randrange(1 << 30)}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def env(self, **extra: str) -> dict[str, str]:
        k, v = self.mark.split("=", 1)
        return {**BASE_ENV, k: v, **extra}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
        log = self.work / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as out:
            p = subprocess.Popen(argv, env=env or self.env(), cwd=cwd or self.work, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = p
        return p

    def run(self, name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> str:
        """A step with a time limit; its output is returned (and kept in <name>.log)."""
        p = self.start(name, argv, env, cwd)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group(p)
            raise CheckFailed(f"{name}: ran past {timeout:.0f}s") from None
        finally:
            self.procs.pop(name, None)
        out = self.logs[name].read_text(errors="replace")
        if rc != 0:
            raise CheckFailed(f"{name} exited {rc}:\n{out[-3000:]}")
        return out

    @staticmethod
    def kill_group(p: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            p.wait(timeout=10)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                say(f"{name} (pid {p.pid}) still up after {timeout:.0f}s: SIGKILL")
        self.kill_group(p)

    def marked(self, mark: str | None = None) -> list[int]:
        needle = (mark or self.mark).encode() + b"\0"
        out = []
        for env in glob.glob("/proc/[0-9]*/environ"):
            pid = int(env.split("/")[2])
            if pid == os.getpid():
                continue
            try:
                data = open(env, "rb").read() + b"\0"
            except OSError:
                continue
            if b"\0" + needle in b"\0" + data:
                out.append(pid)
        return out

    def sweep(self) -> list[int]:
        """Stop whatever is left (TERM, then KILL); returns what survived."""
        for i in range(30):
            left = self.marked()
            if not left:
                return []
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM if i < 10 else signal.SIGKILL)
            time.sleep(0.2)
        return self.marked()


BASE_ENV: dict[str, str] = {}


# ----------------------------------------------------------------------------- services


class Postgres:
    """A throwaway cluster: initdb in a temporary folder, loopback only, as `postgres` when we are root."""

    def __init__(self, procs: Procs):
        self.procs = procs
        self.bin = self._bindir()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="audioscenic-pg-"))  # /tmp: reachable by the postgres user
        self.data = self.dir / "data"
        self.password = f"pw{random.randrange(1 << 40):x}"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.started = False

    @staticmethod
    def _bindir() -> Path:
        if os.environ.get("PG_BIN"):
            return Path(os.environ["PG_BIN"])
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        if found:
            return Path(found[-1]).parent
        initdb = shutil.which("initdb")
        if initdb:
            return Path(initdb).parent
        raise CheckFailed("PostgreSQL not found (initdb); set PG_BIN")

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://prefect:{self.password}@127.0.0.1:{self.port}/prefect"

    def start(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self.dir.chmod(0o700)
        self.procs.run("pg-initdb", [*self.as_user, str(self.bin / "initdb"), "-D", str(self.data), "-U", "prefect",
                                     f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
                                     "-E", "UTF8", "--no-sync"], timeout=120)
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c max_connections=200"
        self.procs.run("pg-start", [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                                    str(self.dir / "postgres.log"), "-o", opts, "-w", "-t", "90", "start"], timeout=120)
        self.started = True
        self.procs.run("pg-createdb", [*self.as_user, str(self.bin / "createdb"), "-h", str(self.dir), "-p",
                                       str(self.port), "-U", "prefect", "prefect"], timeout=60)

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self.procs.run("pg-stop", [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                                           "-w", "-t", "30", "stop"], timeout=60)
            pidfile = self.data / "postmaster.pid"
            if pidfile.exists():  # pg_ctl could not stop it: the postmaster itself
                with contextlib.suppress(Exception):
                    os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        log = self.dir / "postgres.log"
        if log.exists():
            with contextlib.suppress(OSError):
                shutil.copy(log, self.procs.work / "postgres.log")
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- the grid


CONFIG = """\
# Written by scripts/check_pool.py: sample data, tiny models, store/ledger/claims on S3 (moto).
workdir: .
catalogs:
  videos: [{{kind: davis, root: data/davis}}]
  audio: [{{kind: esc50, root: data/esc50}}]
models: {{preset: tiny}}
storage:
  store: s3://{bucket}/grid/store.zarr
  ledger: s3://{bucket}/grid/ledger
  storage_options: {{endpoint_url: "http://127.0.0.1:{port}", key: testing, secret: testing}}
stages:
  video: {{resolution: 64, mask_source: dataset}}
  inversion: {{steps: 2}}
  finetune: {{steps: 2, checkpoint_every: 2}}
  windows: {{window: 8, overlap: 2}}
  edit: {{guidance_scale: 1.0}}
report: {{thumb: 32, strip_frames: 2}}
"""


def stage_items(cfg_path: Path, overrides: dict, stages: list[str] | None = None):
    """{stage: [WorkItem]} of the grid (of `stages`) under these overrides (the repo's own planning code)."""
    from flows.stages import stage_modules
    from storage.state import open_state, using
    from tasks.catalog import read_catalog
    from tasks.config import load_config

    cfg = load_config(cfg_path, overrides)
    catalog = read_catalog(cfg.catalog_path)
    with using(open_state(cfg.workdir)):  # key parts memoised by the runs: no model library imported here
        return cfg, {m.STAGE: m.work_items(cfg, catalog) for m in stage_modules() if not stages or m.STAGE in stages}


def check_exactly_once(cfg_path: Path, overrides: dict, stages: list[str] | None = None,
                       killed: dict[str, float] | None = None) -> dict:
    """Every item of the grid (of `stages`) computed exactly once: one done ledger row under its key,
    the artifact complete in the store under that key, and that row spans the artifact's commit
    (the run that recorded it is the one that computed it); no claim file left. Items a killed
    worker committed (killed: artifact -> kill time) are the exception: their one row is the
    adoption by the run that took over, and their commit precedes the kill (not redone)."""
    from storage import Ledger

    cfg, items = stage_items(cfg_path, overrides, stages)
    fs = store_fs(cfg)
    fs.invalidate_cache()
    root = cfg.store_url.split("://", 1)[1]

    def committed(artifact: str, key: str) -> dict | None:  # the group's attributes, as the store's readers see them
        try:
            attrs = json.loads(fs.cat_file(f"{root}/{artifact}/zarr.json")).get("attributes", {})
        except FileNotFoundError:
            return None
        return attrs if attrs.get("complete") is True and attrs.get("key") == key else None

    rows = Ledger(cfg.ledger_url, cfg.storage.storage_options).read(status="done").to_pylist()
    by_key: dict[tuple, list[dict]] = {}
    for r in rows:
        by_key.setdefault((r["stage"], r["item_id"], r["key"]), []).append(r)
    problems, counts, hosts, adopted = [], {}, {}, []
    for stage, its in items.items():
        counts[stage] = len(its)
        for it in its:
            rs = by_key.get((stage, it.item_id, it.key.key), [])
            attrs = committed(it.artifact, it.key.key)
            if len(rs) != 1 or attrs is None:
                problems.append(f"{stage} {it.item_id}: {len(rs)} done ledger rows, "
                                f"{'complete' if attrs else 'not complete under its key'} in the store")
                continue
            at, r = float(attrs["committed_at"]), rs[0]
            if killed and it.artifact in killed:
                if at > killed[it.artifact]:
                    problems.append(f"{stage} {it.item_id}: committed by the killed worker, then again")
                adopted.append(it.item_id)
            elif not r["started_at"] - 1e-3 <= at <= r["finished_at"] + 1e-3:
                problems.append(f"{stage} {it.item_id}: its ledger row does not span its commit")
            else:
                hosts.setdefault(stage, set()).add(r["host"])
    claims = [p for p in fs.find(cfg.claims_url.split("://", 1)[1]) if p.endswith(".json")]
    if claims:
        problems.append(f"{len(claims)} claim file(s) left: {claims[:3]}")
    if problems:
        raise CheckFailed("exactly once: " + "; ".join(problems[:12]))
    return {"items": counts, "hosts": {k: sorted(v) for k, v in hosts.items()}, "adopted": adopted}


def store_fs(cfg):
    import fsspec

    return fsspec.core.url_to_fs(cfg.ledger_url, **cfg.storage.storage_options)[0]


# ----------------------------------------------------------------------------- Prefect side


def start_fanout(client, parameters: dict):
    from prefect.deployments import run_deployment

    return run_deployment(FANOUT, parameters=parameters, timeout=0, as_subflow=False, client=None)


def wait_final(client, run_id, timeout: float, during=None):
    deadline = time.monotonic() + timeout
    while True:
        fr = client.read_flow_run(run_id)
        if fr.state is not None and fr.state.is_final():
            return fr
        if during is not None:
            during(fr)
        if time.monotonic() > deadline:
            raise CheckFailed(f"fan-out run {fr.name} still {fr.state.type.value if fr.state else '?'} after {timeout:.0f}s")
        time.sleep(2)


def children_of(client, parent) -> list:
    """The video-stages runs a fan-out run started (latest attempt last)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
        any_=[parent.id])))
    return sorted((r for r in runs if "grid-video" in (r.tags or [])), key=lambda r: r.created)


def grid_run(client, procs: Procs, name: str, cfg_path: Path, overrides: dict, only: list[str] | None = None,
             wait: str | None = None, during=None) -> dict:
    """One fan-out run to its final state: its time (start to end, as the server saw it), its
    child runs and which worker ran each. wait: AUDIOSCENIC_TEST_STAGE_WAIT for the child runs."""
    from storage import Ledger
    from tasks.config import load_config

    # One ledger file to start from: every run reads the same few fragments (the ledger's own compaction).
    cfg = load_config(cfg_path, overrides)
    Ledger(cfg.ledger_url, cfg.storage.storage_options).compact()
    t = time.monotonic()
    params = {"config_path": str(cfg_path), "overrides": overrides or None, "only": only,
              "lost_after_s": LOST_AFTER_S, "poll_s": 1}
    if wait:
        params["job_variables"] = {"env": {"AUDIOSCENIC_TEST_STAGE_WAIT": wait}}
    fr = start_fanout(client, params)
    say(f"{name}: fan-out run {fr.name} ({fr.id})")
    fr = wait_final(client, fr.id, RUN_TIMEOUT, during)
    kids = children_of(client, fr)
    took = {}
    for k in kids:
        for w in ("gpu-1", "gpu-2"):
            if f"/flow-run/{k.id}" in procs.logs[w].read_text(errors="replace"):  # the run's own log line
                took.setdefault(w, []).append(k.name)
    out = {"state": fr.state.type.value, "wall_s": round(time.monotonic() - t, 1),
           "run_s": round((fr.end_time - fr.start_time).total_seconds(), 1) if fr.end_time and fr.start_time else None,
           "children": {k.name: k.state.type.value for k in kids}, "workers": took}
    say(f"{name}: {out}")
    if out["state"] != "COMPLETED":
        raise CheckFailed(f"{name}: fan-out run ended {out['state']}: {fr.state.message}")
    return out


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("keep", nargs="?", help="keep logs and data in this folder")
    ap.add_argument("--only", default="timing,grid,kill")
    ap.add_argument("--hold", type=float, default=0, help="seconds to keep the services up at the end (debugging)")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    if args.keep:
        work, keep = Path(args.keep).resolve(), True
        work.mkdir(parents=True, exist_ok=True)
    else:
        work, keep = Path(tempfile.mkdtemp(prefix="audioscenic-pool-check-")), False
    BASE_ENV.update({k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")})
    BASE_ENV.update(PREFECT_HOME=str(work / "prefect-home"), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PREFECT_LOGGING_LEVEL="INFO", PREFECT_WORKER_QUERY_SECONDS="2", PYTHONPATH=str(REPO),
                    PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S))
    procs = Procs(work)
    pg = None
    result: dict = {"edit_wait_s": EDIT_WAIT_S, "claim_lease_s": CLAIM_LEASE_S, "lost_after_s": LOST_AFTER_S}
    rc = 0

    def on_signal(signum, frame):
        raise CheckFailed(f"stopped by signal {signum}" if signum != signal.SIGALRM else
                          f"the check ran past {CHECK_TIMEOUT:.0f}s")

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(s, on_signal)
    signal.alarm(int(CHECK_TIMEOUT))
    try:
        for exe in ("prefect", "python", "moto_server"):
            if not (BIN / exe).exists():
                raise CheckFailed(f"no {BIN / exe} (run make venv first)")
        # --- services -------------------------------------------------------------------
        pg = Postgres(procs)
        say(f"postgres {pg.bin} on 127.0.0.1:{pg.port}")
        s3_port, api_port = free_port(), free_port()
        moto = procs.start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)])
        data = work / "grid"
        sample = procs.start("sample-data", [str(BIN / "python"), "-m", "flows.cli", "sample-data", str(data / "data"),
                                             "--videos", "2", "--clips", "2", "--frames", "8"], cwd=REPO)
        pg.start()
        api = f"http://127.0.0.1:{api_port}/api"
        server = procs.start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                        str(api_port), "--no-ui", "--no-scheduler"],
                             env=procs.env(PREFECT_SERVER_DATABASE_CONNECTION_URL=pg.url,
                                           # less background work on a small machine; events (heartbeats) stay
                                           PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED="false",
                                           PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
                                           PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED="false"))
        BASE_ENV["PREFECT_API_URL"] = api
        wait_until("moto S3 server", lambda: http_ok(f"http://127.0.0.1:{s3_port}/"), 60, alive=lambda: moto.poll() is None)
        import s3fs

        s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=f"http://127.0.0.1:{s3_port}").mkdir(BUCKET)
        sys.path.insert(0, str(REPO))
        from flows.stages import stage_modules  # the checks' imports, while the services start

        stage_modules()
        import zarr  # noqa: F401

        if sample.wait(timeout=180) != 0:
            raise CheckFailed("sample-data failed: " + procs.logs["sample-data"].read_text()[-2000:])
        cfg_path = data / "grid.yaml"
        cfg_path.write_text(CONFIG.format(bucket=BUCKET, port=s3_port))
        wait_until("prefect server (PostgreSQL)", lambda: http_ok(f"{api}/health"), 180, 1,
                   alive=lambda: server.poll() is None)
        say(f"prefect server up at {api} on PostgreSQL; S3 (moto) on port {s3_port}")
        os.environ.update({k: v for k, v in BASE_ENV.items() if k.startswith("PREFECT_") or k == "DO_NOT_TRACK"})
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate

        with get_client(sync_client=True) as client:
            if client.read_flow_runs(limit=1) is None:
                raise CheckFailed("no answer from the API")
            for pool in (GPU_POOL, GRID_POOL):
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            # --- workers: the grid pool's, and two on the GPU pool, each its own host ----
            unshare = os.geteuid() == 0 and shutil.which("unshare") and subprocess.run(
                ["unshare", "-u", "true"], capture_output=True).returncode == 0

            def worker(name: str, pool: str, limit: int | None, **env: str):
                argv = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name]
                argv += ["--limit", str(limit)] if limit else []
                if unshare and pool == GPU_POOL:  # another host name: the claims see two machines
                    argv = ["unshare", "-u", "sh", "-c", 'hostname "$0" && exec "$@"', f"pool-{name}", *argv]
                return procs.start(name, argv, env=procs.env(AUDIOSCENIC_HOME=str(REPO), AUDIOSCENIC_POOL_WORKER=name,
                                                              **env))

            def ready(name: str) -> None:  # polling its pool
                p = procs.procs[name]
                wait_until(f"worker {name}", lambda: "started!" in procs.logs[name].read_text(errors="replace"), 120, 1,
                           alive=lambda: p.poll() is None)

            worker("grid-worker", GRID_POOL, None)
            worker("gpu-1", GPU_POOL, 1)
            worker("gpu-2", GPU_POOL, 1)
            procs.run("deploy", [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "fanout-grid", "--name",
                                 "video-stages"], timeout=240, cwd=REPO)
            for name in ("grid-worker", "gpu-1", "gpu-2"):
                ready(name)
            say(f"deployed; workers: grid-worker, gpu-1, gpu-2 ({'separate host names' if unshare else 'one host'})")
            result["separate_hosts"] = bool(unshare)

            # --- 1. timed: the frames of the grid (waiting FRAMES_WAIT_S each), two workers ---
            if "timing" in parts:
                ov = {"stages.video.start": 1}  # keys of their own
                two = grid_run(client, procs, "frames, two workers", cfg_path, ov, ["frames"], f"frames={FRAMES_WAIT_S}")
                check_exactly_once(cfg_path, ov, ["frames"])
                if set(two["workers"]) != {"gpu-1", "gpu-2"}:
                    raise CheckFailed(f"frames, two workers: child runs taken by {two['workers']}")
                result["timing"] = {"frames_wait_s": FRAMES_WAIT_S, "two_workers_s": two["run_s"], "two": two}

            # --- 2. the fresh grid, two workers; one of them SIGKILLed mid-grid -----------------
            if "grid" in parts:
                ov = {"execution.claim_lease_s": CLAIM_LEASE_S}
                killed: dict = {}
                offset = procs.logs["gpu-2"].stat().st_size  # this run's lines only

                def kill_after_first_edit(fr) -> None:
                    if killed or "kill" not in parts:
                        return
                    with open(procs.logs["gpu-2"], "rb") as f:
                        f.seek(offset)
                        log = f.read().decode(errors="replace")
                    done = [ln for ln in log.splitlines() if " - edit " in ln and ln.endswith(": computed")]
                    if not done:
                        return
                    time.sleep(1.0)  # into its next edit, whose claim it holds
                    victims = procs.marked("AUDIOSCENIC_POOL_WORKER=gpu-2")
                    for pid in victims:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    killed.update(at=time.time(), pids=victims, computed=[ln.split(" - edit ", 1)[1] for ln in done])
                    say(f"SIGKILLed gpu-2 and its flow run (pids {victims}) after it committed {killed['computed']}")

                r = grid_run(client, procs, "grid", cfg_path, ov, None, f"edit={EDIT_WAIT_S}", kill_after_first_edit)
                if set(r["workers"]) != {"gpu-1", "gpu-2"}:
                    raise CheckFailed(f"grid: child runs taken by {r['workers']}, not by both workers")
                commits = {}
                if "kill" in parts:
                    procs.procs.pop("gpu-2", None)
                    if not killed:
                        raise CheckFailed("kill: gpu-2 committed no edit before the grid ended; nothing was killed")
                    cfg, items = stage_items(cfg_path, ov, ["edit"])
                    by_id = {it.item_id: it.artifact for it in items["edit"]}
                    commits = {by_id[c.rsplit(":", 1)[0]]: killed["at"] for c in killed["computed"]}
                    crashed = [n for n, st in r["children"].items() if st == "CRASHED"]
                    if not crashed:
                        raise CheckFailed(f"kill: no child run was declared lost: {r['children']}")
                    r["killed"] = {"committed_before": killed["computed"], "lost_children": crashed,
                                   "after_kill_s": round(time.time() - killed["at"], 1)}
                r["exactly_once"] = check_exactly_once(cfg_path, ov, killed=commits)
                say(f"grid: every artifact computed once: {r['exactly_once']}")
                result["grid"] = r
            if "kill" not in parts or "grid" not in parts:
                procs.stop("gpu-2", signal.SIGINT)

            # --- 3. timed: the frames again (keys of their own), one worker --------------------
            if "timing" in parts:
                ov = {"stages.video.start": 2}
                one = grid_run(client, procs, "frames, one worker", cfg_path, ov, ["frames"], f"frames={FRAMES_WAIT_S}")
                check_exactly_once(cfg_path, ov, ["frames"])
                if set(one["workers"]) != {"gpu-1"}:
                    raise CheckFailed(f"frames, one worker: child runs taken by {one['workers']}")
                ratio = two["run_s"] / one["run_s"]
                result["timing"].update(one_worker_s=one["run_s"], ratio=round(ratio, 3), one=one)
                say(f"timing: two workers {two['run_s']}s, one worker {one['run_s']}s: ratio {ratio:.2f} "
                    f"(must be <= {MAX_RATIO})")
                if ratio > MAX_RATIO:
                    raise CheckFailed(f"two workers took {ratio:.2f}x the time of one (> {MAX_RATIO})")
        time.sleep(args.hold)
        say("OK")
    except CheckFailed as e:
        rc = 1
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
    except Exception as e:
        rc = 1
        import traceback

        traceback.print_exc()
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        signal.alarm(0)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # the cleanup runs to its end
        if rc:
            for name, log in procs.logs.items():
                if log.exists() and name in ("server", "grid-worker", "gpu-1", "gpu-2", "moto"):
                    print(f"----- last 40 lines of {log} -----\n" + "\n".join(
                        log.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
        for name in [n for n in procs.procs if n.startswith(("gpu", "grid"))]:
            procs.stop(name, signal.SIGINT)  # workers first: they stop polling and exit
        procs.stop("moto")
        procs.stop("server")
        if pg is not None:
            pg.stop()
        left = procs.sweep()
        if left:
            rc = 1
            print(f"FAILED: processes left running after shutdown: {left}", file=sys.stderr)
        else:
            say("shut down cleanly; no process left")
        (work / "result.json").write_text(json.dumps(result, indent=1, default=str))
        if rc == 0 and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif rc or keep:
            print(f"logs and data: {work}", file=sys.stderr)
        say(f"exit {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
