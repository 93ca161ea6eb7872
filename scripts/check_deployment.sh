#!/usr/bin/env bash
# Scripted check of prefect.yaml (issue 7), run by CI through tests/test_deployment.py:
#   a throwaway Prefect server on loopback, the process work pool and one process worker,
#   `prefect deploy` from prefect.yaml, one triggered run of the grid deployment on sample
#   data, which must end Completed with every selected item done; then everything is shut
#   down and no process it started may be left.
# Usage: scripts/check_deployment.sh [KEEP_DIR]   (KEEP_DIR: keep logs and data there)
# Exit 0 on success; non-zero with a message (and the server/worker log tails) otherwise.
# Every step has a time limit; the whole check stays under CHECK_TIMEOUT seconds (default 600).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
BIN="$REPO/.venv/bin"
POOL=audioscenic-process
DEPLOYMENT=audioscenic-edit-grid/nightly-grid
START_TIMEOUT=${START_TIMEOUT:-120}     # server up and answering /api/health
RUN_TIMEOUT=${RUN_TIMEOUT:-300}         # triggered run from Scheduled to a final state
STOP_TIMEOUT=${STOP_TIMEOUT:-30}        # graceful stop of worker / server before SIGKILL
CHECK_TIMEOUT=${CHECK_TIMEOUT:-600}     # the whole check
T0=$SECONDS

say() { printf '[check_deployment %3ss] %s\n' "$((SECONDS - T0))" "$*"; }

# --- an isolated Prefect environment: nothing from the caller's profile, home or API ---------
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PREFECT_' || true)
WORK="${1:-}"
if [[ -n "$WORK" ]]; then mkdir -p "$WORK"; WORK="$(cd "$WORK" && pwd -P)"; KEEP=1
else WORK="$(mktemp -d "${TMPDIR:-/tmp}/audioscenic-deploy-check.XXXXXX")"; KEEP=0; fi
export PREFECT_HOME="$WORK/prefect-home"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_LEVEL=INFO
export PREFECT_WORKER_QUERY_SECONDS=2            # pick the run up quickly
# Marks every process this check starts (and their children): found again via /proc at the end.
MARK="AUDIOSCENIC_DEPLOY_CHECK=$$-$RANDOM"
SERVER_PID="" WORKER_PID="" WATCHDOG_PID="" STEP_PID="" FAILED_STEP=""
mkdir -p "$PREFECT_HOME"

marked_pids() {  # live processes (other than this shell) whose environment carries $MARK
  grep -lzxF "$MARK" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$" || true
}

stop_group() {  # stop_group NAME PID SIGNAL: signal the leader, wait, then SIGKILL its group
  local name="$1" pid="$2" sig="$3" i
  [[ -n "$pid" ]] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 5; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then say "$name (pid $pid) still up after ${STOP_TIMEOUT}s: SIGKILL"; fi
  fi
  kill -KILL -- "-$pid" 2>/dev/null || true   # the rest of its process group, if any
}

tails() {
  local f
  for f in "$WORK/server.log" "$WORK/worker.log"; do
    [[ -s "$f" ]] || continue
    echo "----- last 60 lines of $f -----"; tail -n 60 "$f"
  done
}

cleanup() {
  local rc=$? left pid i
  trap - EXIT INT TERM
  set +e
  [[ -n "$WATCHDOG_PID" ]] && kill "$WATCHDOG_PID" 2>/dev/null && wait "$WATCHDOG_PID" 2>/dev/null
  if ((rc != 0)); then
    echo "FAILED${FAILED_STEP:+ at: $FAILED_STEP} (exit $rc)" >&2
    tails >&2
  fi
  if [[ -n "$STEP_PID" ]]; then  # a step cut short by a signal: its `timeout` passes SIGTERM on
    kill -TERM "$STEP_PID" 2>/dev/null
    for ((i = 0; i < 50; i++)); do kill -0 "$STEP_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$STEP_PID" 2>/dev/null
  fi
  # The worker first (SIGINT: it stops polling and exits; its SIGTERM handling can hang), then the server.
  stop_group worker "$WORKER_PID" INT
  stop_group server "$SERVER_PID" TERM
  # Anything else this check started (flow-run processes run in sessions of their own).
  for ((i = 0; i < 25; i++)); do
    left="$(marked_pids)"; [[ -z "$left" ]] && break
    for pid in $left; do kill "$( ((i < 10)) && echo -TERM || echo -KILL)" "$pid" 2>/dev/null; done
    sleep 0.2
  done
  wait 2>/dev/null
  left="$(marked_pids)"
  if [[ -n "$left" ]]; then
    echo "FAILED: processes left running after shutdown:" >&2
    ps -o pid,pgid,etime,args -p "${left//$'\n'/,}" >&2
    rc=1
  elif ((rc == 0)); then
    say "shut down cleanly; no process left"
  fi
  ((KEEP == 0 && rc == 0)) && rm -rf "$WORK"
  ((rc != 0 || KEEP == 1)) && echo "logs and data: $WORK" >&2
  say "exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { FAILED_STEP="$1"; shift; echo "error: $*" >&2; exit 1; }
# bounded LIMIT LOG CMD...: CMD with a time limit, output to LOG. Run in the background and
# waited for, so that a signal to this script is handled at once (cleanup stops the step).
bounded() {
  local limit="$1" log="$2" rc=0; shift 2
  timeout -k 10 "$limit" "$@" > "$log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID" || rc=$?
  STEP_PID=""
  return "$rc"
}
step() { FAILED_STEP="$1"; say "$1"; }

# The whole check is bounded even if a step hangs in a way its own limit misses.
( trap 'kill $! 2>/dev/null; exit 0' TERM
  sleep "$CHECK_TIMEOUT" & wait $!
  echo "error: the check ran past ${CHECK_TIMEOUT}s" >&2; kill -TERM $$ ) &
WATCHDOG_PID=$!

[[ -x "$BIN/prefect" && -x "$BIN/audioscenic" ]] || fail setup "no $BIN/prefect or $BIN/audioscenic (run make venv first)"
[[ -f "$REPO/prefect.yaml" ]] || fail setup "no prefect.yaml in $REPO"
command -v setsid >/dev/null || fail setup "setsid not found (util-linux)"

# --- 1. server on loopback, free port ---------------------------------------------------------
step "start prefect server"
PORT="$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
# No scheduler: the nightly cron must not start runs of its own during the check (the
# schedule itself is still registered and checked below). No UI: nothing to serve.
env "$MARK" setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" --no-scheduler --no-ui \
  > "$WORK/server.log" 2>&1 < /dev/null &
SERVER_PID=$!
healthy() { "$BIN/python" - "$PREFECT_API_URL/health" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}
deadline=$((SECONDS + START_TIMEOUT))
until healthy; do
  kill -0 "$SERVER_PID" 2>/dev/null || fail "start prefect server" "the server exited (see its log)"
  ((SECONDS < deadline)) || fail "start prefect server" "no answer from $PREFECT_API_URL/health within ${START_TIMEOUT}s"
  sleep 1
done
say "server up at $PREFECT_API_URL (pid $SERVER_PID)"

# --- 2. work pool and one process worker -----------------------------------------------------
step "create work pool $POOL"
bounded 120 "$WORK/pool.log" "$BIN/prefect" work-pool create "$POOL" --type process \
  || { cat "$WORK/pool.log" >&2; fail "create work pool $POOL" "prefect work-pool create failed"; }

step "start process worker"
# Started from an unrelated folder: only AUDIOSCENIC_HOME leads the pull step to the checkout.
(cd "$WORK" && exec env "$MARK" AUDIOSCENIC_HOME="$REPO" setsid "$BIN/prefect" worker start \
  --pool "$POOL" --name "check-worker" --limit 1 > "$WORK/worker.log" 2>&1 < /dev/null) &
WORKER_PID=$!

# --- 3. sample data and a small config with a named grid subset ------------------------------
step "sample data and config"
DATA="$WORK/grid"
bounded 120 "$WORK/sample-data.log" "$BIN/audioscenic" sample-data "$DATA/data" --videos 1 --clips 2 --frames 8 \
  || { cat "$WORK/sample-data.log" >&2; fail "sample data and config" "audioscenic sample-data failed"; }
CONFIG="$DATA/grid.yaml"
cat > "$CONFIG" <<'EOF'
# Written by scripts/check_deployment.sh: sample data, tiny presets, everything beside this file.
workdir: .
catalogs:
  videos: [{kind: davis, root: data/davis}]
  audio: [{kind: esc50, root: data/esc50}]
models: {preset: tiny}
stages: {video: {resolution: 64}, inversion: {steps: 4}, finetune: {steps: 4}}  # every stage, fewest steps (CI time)
grid:
  subsets:
    nightly: {per_class: 1}
EOF

# --- 4. deploy from prefect.yaml, non-interactively ------------------------------------------
step "prefect deploy"
cd "$REPO"   # prefect deploy reads ./prefect.yaml and resolves the entrypoint from here
bounded 180 "$WORK/deploy.log" "$BIN/prefect" --no-prompt deploy --name nightly-grid \
  || { cat "$WORK/deploy.log" >&2; fail "prefect deploy" "prefect deploy failed"; }
"$BIN/python" - "$PREFECT_API_URL" "$DEPLOYMENT" "$POOL" <<'EOF' || fail "prefect deploy" "the deployment is not what prefect.yaml describes"
import json, sys, urllib.request
api, name, pool = sys.argv[1:]
flow, dep = name.split("/")
with urllib.request.urlopen(f"{api}/deployments/name/{flow}/{dep}", timeout=30) as r:
    d = json.load(r)
crons = [s["schedule"].get("cron") for s in d.get("schedules", [])]
steps = [next(iter(s)) for s in d.get("pull_steps") or []]
problems = []
if d.get("work_pool_name") != pool:
    problems.append(f"work pool {d.get('work_pool_name')!r}, expected {pool!r}")
if not any(crons):
    problems.append(f"no cron schedule (schedules: {d.get('schedules')})")
if steps[-1:] != ["prefect.deployments.steps.set_working_directory"]:
    problems.append(f"pull steps {steps}: the last must set the working directory")
if set(d.get("parameters") or {}) != {"config_path", "selection"}:
    problems.append(f"parameters {d.get('parameters')}: expected config_path and selection")
for p in problems:
    print("error:", p, file=sys.stderr)
print(f"deployment {name}: pool {d['work_pool_name']}, cron {crons}, pull {steps}")
sys.exit(1 if problems else 0)
EOF

# --- 5. trigger one run and watch it to a final state -----------------------------------------
step "run the deployment"
kill -0 "$WORKER_PID" 2>/dev/null || fail "run the deployment" "the worker exited (see its log)"
run_rc=0
bounded $((RUN_TIMEOUT + 30)) "$WORK/run.log" "$BIN/prefect" deployment run "$DEPLOYMENT" \
  --param config_path="$CONFIG" --param selection=nightly \
  --watch --watch-timeout "$RUN_TIMEOUT" || run_rc=$?
cat "$WORK/run.log"
RUN_ID="$(grep -oE 'UUID: [0-9a-f-]{36}' "$WORK/run.log" | head -n 1 | cut -d' ' -f2 || true)"
[[ -n "$RUN_ID" ]] || fail "run the deployment" "no flow run was created (exit $run_rc)"
STATE="$("$BIN/python" - "$PREFECT_API_URL" "$RUN_ID" <<'EOF'
import json, sys, urllib.request
with urllib.request.urlopen(f"{sys.argv[1]}/flow_runs/{sys.argv[2]}", timeout=30) as r:
    print((json.load(r).get("state") or {}).get("type", "UNKNOWN"))
EOF
)" || STATE=UNKNOWN
((run_rc == 0)) && [[ "$STATE" == COMPLETED ]] \
  || fail "run the deployment" "flow run $RUN_ID ended in state $STATE (prefect deployment run exit $run_rc)"
say "flow run $RUN_ID: $STATE"

# --- 6. the run did the real work: every stage of the selection done, nothing failed ----------
step "check the grid's status"
bounded 120 "$WORK/status.json" "$BIN/audioscenic" status "$CONFIG" --json --set grid.selection=nightly \
  || fail "check the grid's status" "audioscenic status failed"
"$BIN/python" - "$WORK/status.json" <<'EOF' || fail "check the grid's status" "the run left work undone"
import json, sys
stages = json.load(open(sys.argv[1]))["stages"]
bad = {k: v for k, v in stages.items() if v.get("missing") or v.get("stale") or v.get("failed")}
done = {k: v["done"] for k, v in stages.items()}
print("done per stage:", done)
if bad:
    print("error: not done:", json.dumps(bad, indent=1), file=sys.stderr)
if not sum(n for k, n in done.items() if k != "catalog"):
    print("error: no stage artifact was made", file=sys.stderr)
sys.exit(1 if bad or not sum(n for k, n in done.items() if k != "catalog") else 0)
EOF

FAILED_STEP=""
say "OK: deployed from prefect.yaml, run $RUN_ID Completed on worker check-worker"
