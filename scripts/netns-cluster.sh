#!/usr/bin/env bash
# A multi-host network on one machine: the coordinator and every worker in a network namespace
# of its own, with its own address, joined by veth pairs to a bridge that lives in a further
# namespace. No namespace has a route beyond that subnet and the bridge has no address, so the
# cluster's traffic never leaves these namespaces. Needs root (ip netns, tc).
#
# It shows, against the same plan on loopback (every process in one namespace on 127.0.0.1):
#   a) the same greedy text, at tp=2 and at tp=2 x pp=2;
#   b) decode ms/token and prefill tokens/s with tc netem delay on every link (0, 100 us, 1 ms)
#      and with a tbf rate limit (1 Gbit/s, 10 Gbit/s), as gemma-bench's table; the loopback
#      figure of the same plan is the reference;
#   c) healing: a worker's switch port taken down while requests run (they end with a 503 or
#      an error chunk, /ready turns 503 naming the shard), brought back up (/ready 200 again,
#      the same greedy text).
#
# Usage: scripts/netns-cluster.sh [--full] [--model PATH] [--bin DIR]
#   (default)     CI: the tiny servable model; text identity for both plans, one delay row and
#                 one rate row at tp=2, healing at tp=2
#   --full        every condition for both plans, three timed runs each
#   --model PATH  a model the coordinator can serve (e.g. "$(scripts/fetch-model.sh)")
#   --bin DIR     where gemma-worker and gemma-coordinator are (default
#                 ${CARGO_TARGET_DIR:-target}/debug)
# Every namespace (and with it every veth, bridge and qdisc) and every process it made is
# removed on exit, whatever ends it; names carry a random run id, so runs never collide.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=netns-cluster
log() { echo "$NAME: $*" >&2; }
die() { echo "$NAME: error: $*" >&2; exit 1; }

full=0
model=""
bin="${CARGO_TARGET_DIR:-target}/debug"
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=1 ;;
    --model) model=${2:?--model needs a path}; shift ;;
    --bin) bin=${2:?--bin needs a folder}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (allowed: --full, --model PATH, --bin DIR)" ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || die "needs root for ip netns and tc (run it as root, e.g. with sudo)"
for tool in ip tc python3; do
  command -v "$tool" >/dev/null || die "$tool is needed (apt-get install iproute2 python3)"
done
for b in gemma-worker gemma-coordinator; do
  [ -x "$bin/$b" ] || die "$bin/$b is missing: cargo build --workspace --bins (or give --bin DIR)"
done
bin=$(cd "$bin" && pwd)
client="$PWD/scripts/netns-client.py"

# --- Everything made here is recorded before it exists, and undone on exit. ----------------
run_id=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
prefix="gcn-$run_id"
work=$(mktemp -d "${TMPDIR:-/tmp}/gemma-netns.XXXXXX")
namespaces=()
pids=()

# Stops each process (SIGTERM, then SIGKILL past 5 s), then deletes the namespaces: a deleted
# namespace takes its veth ends, bridge and qdiscs with it.
stop_pids() {
  local pid deadline
  [ ${#pids[@]} -gt 0 ] || return 0
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  deadline=$((SECONDS + 5))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}
cleanup() {
  local rc=$? ns
  trap - EXIT INT TERM HUP
  stop_pids
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  if [ $rc != 0 ] && [ -d "$work" ]; then
    for f in "$work"/*.log; do
      [ -f "$f" ] || continue
      echo "--- last lines of $(basename "$f")" >&2
      # A panic's message comes before its backtrace, which alone fills the last lines.
      grep -m 3 -A 2 "panicked at" "$f" >&2 || true
      tail -n 15 "$f" >&2
    done
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

add_ns() { # name
  namespaces+=("$1")
  ip netns add "$1"
  ip -n "$1" link set lo up
}

# --- The network: a bridge in its own namespace, a port per node. -----------------------------
SUBNET=10.77.0
COORD_IP=$SUBNET.2
switch="$prefix-sw"
worker_ip() { echo "$SUBNET.$((10 + $1))"; }

add_ns "$switch"
ip -n "$switch" link add br0 type bridge
ip -n "$switch" link set br0 up
# node name, address: a namespace whose eth0 is the peer of the switch port p-NAME.
add_node() {
  local ns="$prefix-$1"
  add_ns "$ns"
  ip -n "$switch" link add "p-$1" type veth peer name eth0 netns "$ns"
  ip -n "$switch" link set "p-$1" master br0 up
  ip -n "$ns" addr add "$2/24" dev eth0
  ip -n "$ns" link set eth0 up
}
add_node c "$COORD_IP"
for i in 0 1 2 3; do add_node "w$i" "$(worker_ip $i)"; done
# The loopback reference: every process of a plan in one namespace, on 127.0.0.1.
loopback="$prefix-lo"
add_ns "$loopback"

# Traffic stays inside: nothing beyond the subnet is routable from any node.
for node in c w0 w1 w2 w3; do
  if ip -n "$prefix-$node" route get 1.1.1.1 >/dev/null 2>&1; then
    die "namespace $prefix-$node routes beyond $SUBNET.0/24"
  fi
done
log "run $run_id: bridge in $switch; coordinator $COORD_IP, workers $(worker_ip 0)..$(worker_ip 3)"

# --- The model. --------------------------------------------------------------------------------
if [ -z "$model" ]; then
  [ -x "$bin/gemma-tiny-model" ] || die "$bin/gemma-tiny-model is missing (cargo build --workspace --bins)"
  tokenizer=$(timeout 600 scripts/fetch-tokenizer.sh)
  timeout 120 "$bin/gemma-tiny-model" "$work/model" mqa 2>/dev/null
  cp "$tokenizer/tokenizer.json" "$tokenizer/tokenizer_config.json" "$work/model/"
  model="$work/model"
  sentences=8 decode_tokens=32 runs=1
else
  sentences=33 decode_tokens=128 runs=3 # about 500 prompt tokens: one prefill step (512)
fi
[ $full = 1 ] && runs=3
PROMPT="The capital of France is Paris. The capital of Germany is"

# --- Processes. ----------------------------------------------------------------------------------
start_bg() { # log, then the command: started in the background, its pid recorded
  local logf=$1
  shift
  RUST_LOG=${RUST_LOG:-info} "$@" </dev/null >"$logf" 2>&1 &
  pids+=($!)
}

wait_for_line() { # file pattern seconds pid
  local deadline=$((SECONDS + $3))
  until grep -q "$2" "$1" 2>/dev/null; do
    kill -0 "$4" 2>/dev/null || die "$(basename "$1" .log) exited before printing '$2'"
    [ $SECONDS -lt $deadline ] || die "$(basename "$1" .log) printed no '$2' within $3 s"
    sleep 0.1
  done
}

# Starts tp x pp workers and a coordinator with --workers in rank order; sets $url.
# where: netns (a namespace per process) or loopback (all in one namespace).
start_cluster() { # where tp pp tag
  local where=$1 tp=$2 pp=$3 tag=$4 i ns grpc data workers=() coord_ns listen
  for ((i = 0; i < tp * pp; i++)); do
    if [ "$where" = netns ]; then
      ns="$prefix-w$i" grpc="$(worker_ip "$i"):50051" data="$(worker_ip "$i"):50052"
    else
      ns=$loopback grpc="127.0.0.1:$((50051 + 2 * i))" data="127.0.0.1:$((50052 + 2 * i))"
    fi
    workers+=("$grpc")
    start_bg "$work/$tag-w$i.log" ip netns exec "$ns" "$bin/gemma-worker" \
      --listen "$grpc" --data-listen "$data" --threads 1
    wait_for_line "$work/$tag-w$i.log" "gemma-worker listening on" 30 "${pids[-1]}"
  done
  if [ "$where" = netns ]; then
    coord_ns="$prefix-c" listen="$COORD_IP:8080"
  else
    coord_ns=$loopback listen="127.0.0.1:8080"
  fi
  start_bg "$work/$tag-coordinator.log" ip netns exec "$coord_ns" "$bin/gemma-coordinator" \
    --model "$model" --tp "$tp" --pp "$pp" --workers "$(IFS=,; echo "${workers[*]}")" \
    --listen "$listen"
  wait_for_line "$work/$tag-coordinator.log" "gemma-coordinator listening on" 300 "${pids[-1]}"
  url="http://$listen"
  client_ns=$coord_ns
  client ready "$url" 200 60 >/dev/null
}

stop_cluster() { stop_pids; }

client() { timeout 600 ip netns exec "$client_ns" python3 "$client" "$@"; }

# --- tc on every node's link: one-way delay D on each node's egress (round trip 2D). -----------
# Probed on the loopback namespace's lo, so nothing outside this run is touched.
netem_ok=0
if tc -n "$loopback" qdisc add dev lo root netem delay 1us 2>/dev/null; then
  tc -n "$loopback" qdisc del dev lo root
  netem_ok=1
fi
node_links() { # the eth0 of the coordinator and of the first N workers
  echo "$prefix-c"
  for ((i = 0; i < $1; i++)); do echo "$prefix-w$i"; done
}
shape() { # condition nodes: "none", "delay:100us", "rate:1gbit"
  local cond=$1 ns burst
  for ns in $(node_links "$2"); do
    tc -n "$ns" qdisc del dev eth0 root 2>/dev/null || true
    case "$cond" in
      none) ;;
      delay:*) tc -n "$ns" qdisc add dev eth0 root netem delay "${cond#delay:}" limit 100000 ;;
      rate:*)
        # A millisecond of the rate as the bucket (at least 64 KiB, one GSO frame).
        case "${cond#rate:}" in 1gbit) burst=128kb ;; 10gbit) burst=1280kb ;; *) burst=1mb ;; esac
        tc -n "$ns" qdisc add dev eth0 root tbf rate "${cond#rate:}" burst "$burst" limit 64mb ;;
    esac
  done
}
cond_label() {
  case "$1" in
    none) echo "no shaping" ;;
    delay:*) echo "delay ${1#delay:}" ;;
    rate:*) echo "rate ${1#rate:}/s" ;;
  esac
}

# --- a) and b): each plan on loopback, then across the namespaces. ---------------------------
rows="$work/rows.tsv"
: >"$rows"
if [ $full = 1 ]; then
  conditions=(none delay:100us delay:1ms rate:1gbit rate:10gbit)
  plans=("2 1" "2 2")
else
  conditions=(none delay:1ms rate:1gbit)
  plans=("2 1" "2 2")
fi
[ $netem_ok = 1 ] || log "sch_netem is not in this kernel (tc: 'Specified qdisc kind is unknown'): the delay rows are skipped"

# Raw TCP from worker 0 to worker 1 over the shaped links: shows what the shaping leaves any
# flow (the cluster's figures are to be read against it). Sets $link_mib_s; runs in this
# shell, not a subshell, so the sink's pid is among those cleanup stops.
link_checks=0
link_check() {
  link_checks=$((link_checks + 1))
  local logf="$work/sink-$link_checks.log" # a fresh file: an old one already says "listening"
  start_bg "$logf" ip netns exec "$prefix-w1" python3 "$client" sink "$(worker_ip 1)" 5001
  wait_for_line "$logf" listening 30 "${pids[-1]}"
  link_mib_s=$(timeout 120 ip netns exec "$prefix-w0" python3 "$client" push "$(worker_ip 1)" 5001 256)
}

field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

for plan in "${plans[@]}"; do
  read -r tp pp <<<"$plan"
  n=$((tp * pp))
  name="tp=$tp"
  [ "$pp" = 1 ] || name="tp=$tp x pp=$pp"
  tag="tp${tp}pp${pp}"
  # Speeds of the whole matrix at tp=2 x pp=2 only with --full: CI keeps to text identity there.
  measure=1
  [ $full = 1 ] || [ "$pp" = 1 ] || measure=0

  log "$name on loopback"
  start_cluster loopback "$tp" "$pp" "$tag-lo"
  text_lo=$(client text "$url" "$PROMPT" 24)
  [ $measure = 1 ] && ref=$(client speed "$url" "$sentences" "$decode_tokens" "$runs")
  stop_cluster

  log "$name across namespaces"
  start_cluster netns "$tp" "$pp" "$tag-ns"
  text_ns=$(client text "$url" "$PROMPT" 24)
  [ "$text_lo" = "$text_ns" ] || die "$name: the namespaces' text $text_ns differs from loopback's $text_lo"
  echo "a) $name: the same greedy text across namespaces as on loopback: $text_ns"

  if [ $measure = 1 ]; then
    ptok=$(field prompt_tokens <<<"$ref")
    link_check
    link_ref=$link_mib_s
    for cond in "${conditions[@]}"; do
      label="$name, $(cond_label "$cond")"
      threads="${n}x1 | ${n}x1"
      if [ "${cond%%:*}" = delay ] && [ $netem_ok = 0 ]; then
        printf '%s\t-\tms/tok\tno sch_netem in this kernel\t-\t%s\n' "decode, $label" "$threads" >>"$rows"
        printf '%s\t-\ttok/s\tno sch_netem in this kernel\t-\t%s\n' "prefill $ptok, $label" "$threads" >>"$rows"
        continue
      fi
      log "$label"
      shape "$cond" "$n"
      if [ "$cond" != none ]; then
        link_check
        printf '%s\t%s\tMiB/s\t%s\t%s\t-\n' "raw TCP w0 -> w1, $label" "$link_mib_s" \
          "raw TCP, no shaping" "$link_ref" >>"$rows"
      fi
      got=$(client speed "$url" "$sentences" "$decode_tokens" "$runs")
      shape none "$n"
      printf '%s\t%s\tms/tok\tloopback, %s\t%s\t%s\n' "decode, $label" \
        "$(field decode_ms_per_token <<<"$got")" "$name" "$(field decode_ms_per_token <<<"$ref")" \
        "$threads" >>"$rows"
      printf '%s\t%s\ttok/s\tloopback, %s\t%s\t%s\n' "prefill $ptok, $label" \
        "$(field prefill_tok_s <<<"$got")" "$name" "$(field prefill_tok_s <<<"$ref")" \
        "$threads" >>"$rows"
    done
  fi
  stop_cluster
done
echo "b) decode and prefill across namespaces (median of $runs; 2 shared cores: noisy)"
python3 "$client" table "$rows"

# --- c) healing: worker 1's switch port down while requests run, then up. ---------------------
log "healing at tp=2: p-w1 down, then up"
start_cluster netns 2 1 heal
report=$(client heal "$url" "ip -n $switch link set p-w1 down" "ip -n $switch link set p-w1 up" "$PROMPT")
stop_cluster
echo "c) healing:"
echo "$report"
python3 - "$report" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
problems = []
if not r["same_text"]:
    problems.append(f"text after healing {r['text_after']!r} != before {r['text_before']!r}")
body = json.dumps(r["ready_503_body"])
if "stage 0, rank 1" not in body:
    problems.append(f"/ready's 503 does not name the shard: {body}")
for f in r["in_flight"]:
    if f["stream"] and "stream_error" not in f:
        problems.append(f"the in-flight stream did not end with an error chunk: {f}")
    if not f["stream"] and f.get("status") != 503:
        problems.append(f"the in-flight request did not end with 503: {f}")
if r["new_request_while_down"]["status"] != 503:
    problems.append(f"a new request while down got {r['new_request_while_down']}")
if problems:
    sys.exit("netns-cluster: error: healing: " + "; ".join(problems))
print(f"healed: link down -> /ready 503 in {r['down_to_ready_503_s']} s; in-flight ended "
      f"{', '.join(str(f['ended_after_down_s']) + ' s' for f in r['in_flight'])} after; "
      f"link up -> /ready 200 in {r['up_to_ready_200_s']} s; same text")
EOF
