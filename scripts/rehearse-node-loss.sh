#!/usr/bin/env bash
# Rehearse losing a worker node, on this machine, with the real Ray CLI:
#
#   1. `ray start --head` (no CPUs: the training workers must live on worker nodes) and two worker nodes
#      (`ray start --address`, 1 CPU each, their own temp dir and ports), token auth on (RAY_AUTH_MODE=token)
#   2. `ray job submit -- styleray train` (2 workers, the cpu-tiny preset, a checkpoint every few ticks)
#   3. once a checkpoint exists, kill every process of worker node 2 (SIGKILL: a node that vanishes)
#   4. `ray start --address` a replacement node
#   5. wait for the job: it must succeed, resumed from the checkpoint; prints the resumed kimg
#
# Cleanup (on any exit, Ctrl-C included) stops exactly this cluster's processes, found by its temp dir, by PID.
# It does not run `ray stop`: that stops every Ray cluster of this user on the machine, other people's too.
#
# Usage: scripts/rehearse-node-loss.sh [KIMG]     (default 1.0; VENV=path overrides ./.venv)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
KIMG="${1:-1.0}"
[[ -x "$VENV/bin/styleray" && -x "$VENV/bin/ray" ]] || { echo "no styleray/ray in $VENV: run 'make venv' first" >&2; exit 2; }
[[ "$KIMG" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "KIMG '$KIMG' must be a number, e.g. 1.0" >&2; exit 2; }

# The job's entrypoint runs with the PATH of the shell that ran `ray start`: put the venv first.
export PATH="$VENV/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS RAY_AUTH_TOKEN
PY="$VENV/bin/python"
WORK="$(mktemp -d /tmp/srnl.XXXXXX)"  # short: Ray's socket paths must stay under 108 characters
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/token"
"$PY" -c 'import secrets, sys; open(sys.argv[1], "w").write(secrets.token_hex(32))' "$RAY_AUTH_TOKEN_PATH"
chmod 600 "$RAY_AUTH_TOKEN_PATH"

t0=$(date +%s)
say() { printf '[%4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# PIDs of the processes whose command line names $1 (a node's temp dir), and all their descendants.
pids_of() {
  "$PY" - "$1" <<'EOF'
import os, sys
mark, procs = sys.argv[1], {}
for name in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{name}/cmdline", "rb").read().decode(errors="replace")
        ppid = int(open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        continue
    procs[int(name)] = (ppid, argv)
me, ancestors = os.getpid(), set()
while me in procs and me not in ancestors:
    ancestors.add(me)
    me = procs[me][0]
ours = {p for p, (_, argv) in procs.items() if mark in argv} - ancestors
while children := {p for p, (pp, _) in procs.items() if pp in ours} - ours - ancestors:
    ours |= children
print(" ".join(map(str, sorted(ours))))
EOF
}

kill_pids() {  # SIGTERM (or $2), then SIGKILL what is left after 10 s
  local pids="$1" sig="${2:-TERM}"
  [[ -n "$pids" ]] || return 0
  kill "-$sig" $pids 2>/dev/null || true
  for _ in $(seq 50); do
    local alive=""
    for p in $pids; do [[ -e /proc/$p ]] && [[ "$(awk '{print $3}' /proc/$p/stat 2>/dev/null)" != Z ]] && alive="$alive $p"; done
    [[ -z "$alive" ]] && return 0
    sleep 0.2  # poll until they are gone
  done
  kill -KILL $alive 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if (( rc != 0 )) && [[ -n "${JOB:-}" ]]; then  # say why before the evidence goes
    say "the rehearsal failed (exit $rc); job $JOB: $(job_status || true); the end of its log:"
    ray job logs --address "$JOBS" "$JOB" 2>&1 | tail -25 | sed 's/^/    /' || true
  fi
  say "cleaning up: stopping this cluster's processes (temp dir $WORK)"
  kill_pids "$(pids_of "$WORK")"
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

GCS=$(port); DASH=$(port)
ADDRESS="127.0.0.1:$GCS"
JOBS="http://127.0.0.1:$DASH"

start_worker() {  # start_worker NAME: a 1-CPU worker node with its own temp dir and ports
  local name="$1"
  ray start --address "$ADDRESS" --node-ip-address 127.0.0.1 --num-cpus 1 --temp-dir "$WORK/$name" \
    --node-manager-port "$(port)" --object-manager-port "$(port)" --dashboard-agent-listen-port "$(port)" \
    --dashboard-agent-grpc-port "$(port)" --metrics-export-port "$(port)" --runtime-env-agent-port "$(port)" \
    --disable-usage-stats >"$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log" >&2; return 1; }
}

api() {  # api PATH: GET the dashboard/Jobs REST API with the token; prints the JSON ('' when unreachable)
  "$PY" - "$JOBS$1" "$RAY_AUTH_TOKEN_PATH" <<'EOF'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1])
req.add_header("Authorization", "Bearer " + open(sys.argv[2]).read().strip())
try:
    print(urllib.request.urlopen(req, timeout=10).read().decode())
except Exception:
    print("")
EOF
}

alive_nodes() {  # the number of alive nodes (-1: the API did not answer)
  api "/api/v0/nodes?detail=false&limit=100" | "$PY" -c '
import json, sys
try:
    print(sum(n.get("state") == "ALIVE" for n in json.load(sys.stdin)["data"]["result"]["result"]))
except (ValueError, KeyError, TypeError):
    print(-1)'
}

job_status() {  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED ('' when unknown)
  api "/api/jobs/$JOB" | "$PY" -c '
import json, sys
try:
    print(json.load(sys.stdin).get("status", ""))
except (ValueError, AttributeError):
    print("")'
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local limit="$1" what="$2"; shift 2
  local deadline=$(( $(date +%s) + limit ))
  until "$@"; do
    (( $(date +%s) < deadline )) || { say "timed out after ${limit}s waiting for $what" >&2; return 1; }
    sleep 1  # poll interval
  done
}

nodes_are() { [[ "$(alive_nodes)" == "$1" ]]; }

say "starting the head (0 CPUs, dashboard and Jobs API on $JOBS, token auth) in $WORK"
mkdir -p "$WORK/head"
ray start --head --node-ip-address 127.0.0.1 --port "$GCS" --num-cpus 0 \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
  --ray-client-server-port "$(port)" --node-manager-port "$(port)" --object-manager-port "$(port)" \
  --dashboard-agent-listen-port "$(port)" --dashboard-agent-grpc-port "$(port)" --metrics-export-port "$(port)" \
  --runtime-env-agent-port "$(port)" --temp-dir "$WORK/head" --disable-usage-stats >"$WORK/head.log" 2>&1 \
  || { cat "$WORK/head.log" >&2; exit 1; }
say "starting worker nodes w1 and w2 (1 CPU each)"
start_worker w1
start_worker w2
wait_for 120 "3 alive nodes" nodes_are 3
say "cluster up: $(alive_nodes) nodes"

DATA="$WORK/data"
OUT="$WORK/run"
"$PY" -c 'import sys; from styleray.datasets.synthetic import make_clean_training_set as m; m(sys.argv[1], n=64, resolution=16)' "$DATA"
JOB="rehearse-$(date +%s)"
say "submitting job $JOB: styleray train --workers 2 --preset cpu-tiny --kimg $KIMG (checkpoint every 0.128 kimg)"
(cd "$REPO" && ray job submit --address "$JOBS" --submission-id "$JOB" --working-dir . --no-wait -- \
  styleray train --data "$DATA" --out "$OUT" --workers 2 --preset cpu-tiny --resolution 16 --batch 8 \
  --kimg "$KIMG" --tick 0.064 --snap 2 --resume none --max-failures 3 --placement-timeout 180) >"$WORK/submit.log" 2>&1 \
  || { cat "$WORK/submit.log" >&2; exit 1; }

has_checkpoint() {
  ls "$OUT/checkpoints"/ckpt-*/meta.json >/dev/null 2>&1 && return 0
  case "$(job_status)" in SUCCEEDED|FAILED|STOPPED) say "the job ended before a checkpoint: $(job_status)" >&2; exit 1;; esac
  return 1
}
wait_for 300 "the first checkpoint" has_checkpoint
CKPT="$(ls -d "$OUT/checkpoints"/ckpt-* | tail -1)"
say "checkpoint $(basename "$CKPT") is written; the job is $(job_status)"

VICTIM="$(pids_of "$WORK/w2")"
say "killing worker node w2: SIGKILL to its $(wc -w <<<"$VICTIM") processes (raylet, agents, the training worker)"
kill_pids "$VICTIM" KILL
wait_for 120 "the head to notice the lost node" nodes_are 2
say "w2 is gone ($(alive_nodes) nodes alive); starting the replacement node w3"
start_worker w3
wait_for 120 "3 alive nodes" nodes_are 3

job_done() { case "$(job_status)" in SUCCEEDED|FAILED|STOPPED) return 0;; *) return 1;; esac; }
say "w3 is up; waiting for the job to restart its workers and finish"
wait_for 600 "the job to finish" job_done
STATUS="$(job_status)"
ray job logs --address "$JOBS" "$JOB" >"$WORK/job.log" 2>&1 || true
grep -E "resumed from|done:|fault|Worker.*(died|failed)|restart" "$WORK/job.log" | sed 's/^/    job log: /' | tail -12 || true
"$PY" - "$OUT" <<'EOF'
import json, sys
records = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if l.strip()]
last = records[-1]
print(f"    metrics: {len(records)} ticks, final kimg {last['kimg']:.3f}, resumed_kimg {last['resumed_kimg']:.3f}")
EOF
if [[ "$STATUS" != SUCCEEDED ]]; then
  say "the job ended $STATUS; its log: $WORK/job.log (kept until exit)"; tail -40 "$WORK/job.log"; exit 1
fi
say "the job SUCCEEDED after losing node w2 and resumed from the checkpoint (see resumed_kimg above)"
