#!/usr/bin/env bash
# Screenshots of the dashboard's key queries, rendered by Prometheus's own
# graph page in headless chromium, written to dashboards/screenshots/*.png.
#
#   sudo dashboards/screenshot.sh
#       starts its own agent (target/debug/sigwake), a Prometheus server
#       (scrape every 1 s, the rules loaded) on free loopback ports, and
#       reproduces the seed incident three times: a trio loop starved by a
#       GIL hog gets 10 SIGINTs 20 ms apart. Needs root, `cargo xtask setup`
#       done (prometheus, .venv) and chromium (apt-get install chromium).
#
#   PROMETHEUS_URL=http://prom:9090 dashboards/screenshot.sh
#       only takes the screenshots, from an existing Prometheus that
#       scrapes sigwake agents (no root needed).
#
# Queries are the dashboard's own panel targets (dashboards/sigwake.json),
# with $job/$instance set to "All", $actor to SCREENSHOT_ACTOR (a regex;
# default: all, or the three incident actors when the script starts its own
# agent) and $__rate_interval to 15s.
# Environment: SCREENSHOT_DIR (default dashboards/screenshots),
# SCREENSHOT_RANGE (graph range, default 3m), SCREENSHOT_ACTOR, SIGWAKE_BIN,
# SIGWAKE_PYTHON.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=${SCREENSHOT_DIR:-$here/screenshots}
range=${SCREENSHOT_RANGE:-3m}
actor=${SCREENSHOT_ACTOR:-}
prom_url=${PROMETHEUS_URL:-}

say() { echo "screenshot.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

command -v chromium >/dev/null || die "chromium not found: apt-get install chromium"
command -v python3 >/dev/null || die "python3 not found"

# --- cleanup: only what this script started ---------------------------------
tmp=$(mktemp -d /tmp/sigwake-screenshot.XXXXXX)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -INT "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds.
wait_for() {
    local what=$1 secs=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
        sleep 0.2
    done
}

prom_query_nonempty() { # PROMQL
    curl -sf --get --data-urlencode "query=$1" "$prom_url/api/v1/query" |
        python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'
}

alert_firing() { # ALERTNAME
    curl -sf "$prom_url/api/v1/alerts" |
        python3 -c 'import json,sys; a=json.load(sys.stdin)["data"]["alerts"]; sys.exit(0 if any(x["labels"]["alertname"]==sys.argv[1] and x["state"]=="firing" for x in a) else 1)' "$1"
}

exited() { # PID of our child: gone, or a zombie not yet waited for
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 0
    [[ $st == Z* ]]
}

# One starved trio loop, registered as NAME, gets 10 SIGINTs 20 ms apart.
incident() { # NAME
    local name=$1 log="$tmp/fixture-$1.log"
    # A script's background jobs start with SIGINT ignored (no job control),
    # and Python then never handles it: restore the default before exec.
    SIGWAKE_SOCKET="$tmp/registry.sock" "$python" -c \
        'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])' \
        "$python" "$root/tests/fixtures/trio_actor.py" --hog-seconds 4 --register "$name" >"$log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    wait_for "$name to start its GIL hog" 30 grep -q '"hogging": true' "$log"
    for _ in $(seq 10); do kill -INT "$pid" 2>/dev/null || true; sleep 0.02; done
    # It exits on the KeyboardInterrupt once the hog ends (or escalation ends it).
    wait_for "$name to exit" 60 exited "$pid"
    wait "$pid" 2>/dev/null || true
    say "incident $name: $(grep -c . "$log") fixture line(s), last: $(tail -1 "$log")"
}

if [[ -z "$prom_url" ]]; then
    [[ $(id -u) == 0 ]] || die "starting an agent needs root (or set PROMETHEUS_URL to use an existing Prometheus)"
    command -v prometheus >/dev/null || die "prometheus not found: run cargo xtask setup (installs Debian's prometheus)"
    bin=${SIGWAKE_BIN:-$root/target/debug/sigwake}
    python=${SIGWAKE_PYTHON:-$root/.venv/bin/python}
    [[ -x "$bin" ]] || (cd "$root" && cargo build -p sigwake) || die "cannot build the agent"
    [[ -x "$python" ]] || die "$python missing: run cargo xtask setup"

    agent_addr=127.0.0.1:$(free_port)
    say "agent on $agent_addr"
    RUST_LOG=warn "$bin" run --listen "$agent_addr" --socket "$tmp/registry.sock" --state-dir "$tmp/state" \
        >"$tmp/agent.log" 2>&1 &
    pids+=("$!")
    wait_for "the agent's /readyz" 60 curl -sf "http://$agent_addr/readyz"

    prom_addr=127.0.0.1:$(free_port)
    prom_url=http://$prom_addr
    cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $here/prometheus/sigwake-rules.yml
scrape_configs:
  - job_name: sigwake
    static_configs:
      - targets: ['$agent_addr']
EOF
    say "prometheus on $prom_addr"
    prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/prometheus-data" \
        --web.listen-address="$prom_addr" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
    pids+=("$!")
    wait_for "prometheus /-/ready" 60 curl -sf "$prom_url/-/ready"
    wait_for "the first scrape" 30 prom_query_nonempty 'up{job="sigwake"} == 1'

    # Three incidents 20 s apart, so the graphs have something to show.
    actor=${actor:-fetcher|indexer|crawler}
    for name in fetcher indexer crawler; do
        incident "$name"
        sleep 20 # pacing for the graphs, not synchronisation
    done
    wait_for "the drops in Prometheus" 30 prom_query_nonempty sigwake_wakeup_writes_dropped_total
    wait_for "SigwakeSigintDropsRising to fire" 60 alert_firing SigwakeSigintDropsRising
fi

# --- screenshots ---------------------------------------------------------------
mkdir -p "$out"

# graph_url TITLE...: Prometheus's graph page with one graph per target of the named panels.
graph_url() {
    python3 - "$here/sigwake.json" "$prom_url" "$range" "${actor:-.*}" "$@" <<'EOF'
import json, re, sys, urllib.parse
path, base, rng, actor, titles = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
d = json.load(open(path))
panels = {}
def walk(ps):
    for p in ps:
        panels[p.get("title")] = p
        walk(p.get("panels", []))
walk(d["panels"])
subst = {"__rate_interval": "15s", "__interval": "15s", "__range": rng, "actor": actor}
params, i = [], 0
for t in titles:
    if t not in panels:
        sys.exit(f"no panel titled {t!r} in {path}")
    for target in panels[t]["targets"]:
        expr = re.sub(r"\$\{?(\w+)\}?", lambda m: subst.get(m.group(1), ".*"), target["expr"])
        stacked = panels[t].get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("stacking", {}).get("mode") == "normal"
        params += [(f"g{i}.expr", expr), (f"g{i}.tab", "0"), (f"g{i}.range_input", rng), (f"g{i}.stacked", "1" if stacked else "0")]
        i += 1
print(f"{base}/graph?{urllib.parse.urlencode(params)}")
EOF
}

shoot() { # NAME URL [HEIGHT]: the height defaults to what the page's graphs need
    local name=$1 url=$2 height=${3:-} profile
    [[ -n "$height" ]] || height=$((120 + 640 * $(grep -o '\.expr=' <<<"$url" | wc -l)))
    profile=$(mktemp -d "$tmp/chromium.XXXXXX")
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --hide-scrollbars --user-data-dir="$profile" --window-size="1400,$height" \
        --virtual-time-budget=8000 --screenshot="$out/$name.png" "$url" >"$tmp/chromium-$name.log" 2>&1 ||
        { cat "$tmp/chromium-$name.log" >&2; die "chromium failed for $name"; }
    [[ -s "$out/$name.png" ]] || die "chromium wrote no $out/$name.png"
    say "wrote $out/$name.png ($(stat -c %s "$out/$name.png") bytes)"
}

shoot 01-dropped-wakeups "$(graph_url 'Dropped wakeups, total since agent start' 'Dropped wakeups per minute by actor')"
shoot 02-signals-and-actors "$(graph_url 'Signals generated by result' 'Actors by state over time')"
shoot 03-incidents-and-escalation "$(graph_url 'Starvation incidents' 'Escalation actions per minute by tier and outcome')"
shoot 04-detection-latency "$(graph_url 'Detection latency p50 / p99 by stage')"
shoot 05-agent-health "$(graph_url 'Agent resident memory' 'Agent CPU')"
# The alerts page: /alerts upstream, /classic/alerts in Debian's build.
alerts=$prom_url/alerts
curl -sf -o /dev/null "$alerts" || alerts=$prom_url/classic/alerts
shoot 06-alerts "$alerts" 700
