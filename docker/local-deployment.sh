#!/usr/bin/env bash
# Run FedDM with Flower's Deployment Engine on this machine: one SuperLink and N
# SuperNodes on 127.0.0.1, TLS and SuperNode authentication on by default.
#
#   docker/local-deployment.sh [--nodes N] [--insecure] [--device auto|cpu|cuda]
#                              [--data-root DIR] [--workdir DIR] [-- HYDRA_OVERRIDES...]
#
# It creates credentials (docker/generate_credentials.py), starts the SuperLink
# (all its APIs on 127.0.0.1) and the Fleet gateway (feddm-fleet-gateway: the only
# port SuperNodes use; it refuses the Control API), registers every SuperNode's
# public key, starts the SuperNodes (node config: partition-id, num-partitions,
# data-root, device) against the gateway, submits the run with
# `feddm-run superlink=feddm-local`, waits for it and prints the run folder.
# Every process it started is stopped on exit, failure or Ctrl-C (SIGTERM, then
# SIGKILL after STOP_GRACE_S seconds). Needs the project installed (pip install -e .).
set -euo pipefail

NODES=2
INSECURE=0
DEVICE=auto
DATA_ROOT=""
WORKDIR=""
OVERRIDES=()
STOP_GRACE_S=${STOP_GRACE_S:-10}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-90}

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --insecure) INSECURE=1; shift ;;
    --device) DEVICE="$2"; shift 2 ;;
    --data-root) DATA_ROOT="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$NODES" in ''|*[!0-9]*) echo "--nodes must be a positive integer, got '$NODES'" >&2; exit 2 ;; esac
[ "$NODES" -ge 1 ] || { echo "--nodes must be >= 1" >&2; exit 2; }
case "$DEVICE" in auto|cpu|cuda) ;; *) echo "--device must be auto, cpu or cuda" >&2; exit 2 ;; esac
for tool in flower-superlink flower-supernode flwr feddm-run python; do
  command -v "$tool" >/dev/null || { echo "$tool not found: install the project (pip install -e .)" >&2; exit 2; }
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
[ -n "$WORKDIR" ] || WORKDIR=$(mktemp -d -t feddm-deployment-XXXXXX)
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
export FLWR_HOME="$WORKDIR/flwr-home"
mkdir -p "$FLWR_HOME" "$WORKDIR/logs"
PIDS=()

stop_all() {
  local pid deadline
  [ ${#PIDS[@]} -eq 0 ] && return 0
  echo "stopping ${#PIDS[@]} Flower processes" >&2
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  deadline=$((SECONDS + STOP_GRACE_S))
  for pid in "${PIDS[@]}"; do
    while kill -0 -- "-$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  PIDS=()
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Start a command in its own session (process group), logging to logs/NAME.log.
start() {
  local name="$1"; shift
  setsid "$@" >"$WORKDIR/logs/$name.log" 2>&1 &
  PIDS+=($!)
}

# Wait until the process started last (NAME, logging to logs/NAME.log) listens on PORT.
wait_for_port() {
  local name="$1" port="$2" pid="${PIDS[${#PIDS[@]}-1]}" deadline=$((SECONDS + READY_TIMEOUT_S))
  until python -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $port)))" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "$name did not listen on $port within ${READY_TIMEOUT_S}s; see $WORKDIR/logs/$name.log" >&2; exit 1; }
    kill -0 "$pid" 2>/dev/null || { echo "$name exited; see $WORKDIR/logs/$name.log" >&2; tail -20 "$WORKDIR/logs/$name.log" >&2; exit 1; }
    sleep 0.5
  done
}

LINK_PORT=$(free_port)
CREDS="$WORKDIR/credentials"
if [ "$INSECURE" -eq 1 ]; then
  echo "WARNING: --insecure: no TLS and no SuperNode authentication" >&2
  LINK_SECURITY=(--insecure)
  GATEWAY_SECURITY=(--insecure)
  NODE_SECURITY=(--insecure)
  CONNECTION_SECURITY='insecure = true'
else
  # The launcher's credentials live and die with its run (a reused --workdir gets new ones, as its
  # SuperNodes are registered anew): --force, where an operator's credentials are kept by default.
  python "$REPO/docker/generate_credentials.py" --out "$CREDS" --nodes "$NODES" --force >/dev/null
  LINK_SECURITY=(--ssl-ca-certfile "$CREDS/certificates/ca.crt" --ssl-certfile "$CREDS/certificates/server.pem"
                 --ssl-keyfile "$CREDS/certificates/server.key" --enable-supernode-auth)
  GATEWAY_SECURITY=(--ssl-ca-certfile "$CREDS/certificates/ca.crt" --ssl-certfile "$CREDS/certificates/server.pem"
                    --ssl-keyfile "$CREDS/certificates/server.key")
  NODE_SECURITY=(--root-certificates "$CREDS/certificates/ca.crt")
  CONNECTION_SECURITY="root-certificates = \"$CREDS/certificates/ca.crt\""
fi

# The project is installed here already: no per-run dependency installation.
start superlink flower-superlink "${LINK_SECURITY[@]}" --isolation subprocess \
  --disable-runtime-dependency-installation --host 127.0.0.1 --port "$LINK_PORT" \
  --database "$WORKDIR/superlink.db"
wait_for_port superlink "$LINK_PORT"
# SuperNodes reach the SuperLink only through the gateway, which forwards the Fleet API and
# refuses the Control and Runtime APIs (on a real SuperLink host: --listen 0.0.0.0:PORT).
FLEET_PORT=$(free_port)
start fleet_gateway feddm-fleet-gateway "${GATEWAY_SECURITY[@]}" \
  --listen "127.0.0.1:$FLEET_PORT" --superlink "127.0.0.1:$LINK_PORT"
wait_for_port fleet_gateway "$FLEET_PORT"

cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "feddm-local"

[superlink.feddm-local]
address = "127.0.0.1:$LINK_PORT"
$CONNECTION_SECURITY
EOF

CORES=$(python -c 'import os; print(len(os.sched_getaffinity(0)))')
THREADS_PER_NODE=${OMP_NUM_THREADS:-$(( CORES / NODES > 0 ? CORES / NODES : 1 ))}
for i in $(seq 1 "$NODES"); do
  NODE_CONFIG="partition-id=$((i - 1)) num-partitions=$NODES device='$DEVICE'"
  [ -n "$DATA_ROOT" ] && NODE_CONFIG="$NODE_CONFIG data-root='$(cd "$DATA_ROOT" && pwd)'"
  AUTH=()
  if [ "$INSECURE" -eq 0 ]; then
    flwr supernode register "$CREDS/keys/supernode_$i.pub" feddm-local >"$WORKDIR/logs/register_$i.log" 2>&1 \
      || { cat "$WORKDIR/logs/register_$i.log" >&2; exit 1; }
    AUTH=(--auth-supernode-private-key "$CREDS/keys/supernode_$i")
  fi
  # Its SuperExec looks for the next message every 0.2 s instead of Flower's 1 s (a local call, cheap).
  # The nodes share this machine's cores: each ClientApp gets its share of torch threads, since N
  # processes that each spin one thread per core slow each other down many times over.
  start "supernode_$i" env FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}" \
    OMP_NUM_THREADS="$THREADS_PER_NODE" \
    flower-supernode "${NODE_SECURITY[@]}" "${AUTH[@]}" \
    --superlink "127.0.0.1:$FLEET_PORT" --port "$(free_port)" --isolation subprocess \
    --node-config "$NODE_CONFIG"
done
echo "SuperLink on 127.0.0.1:$LINK_PORT (Control API), Fleet gateway on 127.0.0.1:$FLEET_PORT, $NODES SuperNodes; logs in $WORKDIR/logs" >&2

feddm-run superlink=feddm-local num_clients="$NODES" "${OVERRIDES[@]}" 2>&1 | tee "$WORKDIR/logs/run.log"
RUN_DIR=$(sed -n 's/^FedDM run folder: //p' "$WORKDIR/logs/run.log" | tail -1)
[ -n "$RUN_DIR" ] || { echo "the run did not report its folder; see $WORKDIR/logs" >&2; exit 1; }
echo "Run folder: $RUN_DIR"
