#!/bin/sh
# One row of `cargo xtask kernels`: runs inside each booted kernel (vng, with
# the host's root filesystem shared read-only) and, for the host row, on the
# host itself. Usage: run-matrix.sh W
#
# W holds the plan written by xtask/src/kernels.rs:
#   W/plan.env  environment (SIGWAKE_BIN, SIGWAKE_PYTHON, SIGWAKE_FIXTURES,
#               SIGWAKE_TEST_TIME_SCALE, ...), sourced here
#   W/plan.txt  one line per test binary: NAME EXECUTABLE TEST...
# and receives everything this script learns, as files: vng's exit status
# means nothing (it is 255 even when this script succeeds, DESIGN §8), so the
# xtask judges the row only by these files.
#   W/uname                 uname -r
#   W/env.log               what was checked or mounted to make the tests runnable
#   W/check.json|.err|.status  `sigwake check --json`
#   W/tests/NAME.log|.status|.secs  each test binary's output, exit status, seconds
#   W/bench.json|.log|.status|.secs  with SIGWAKE_BENCH set: the bench's results
#   W/done                  written last: the script ran to the end
set -u
W=$1
. "$W/plan.env"
cd "$W" || exit 1
uname -r > "$W/uname"
: > "$W/env.log"
note() { echo "$*" >> "$W/env.log"; }

# --- What the tests need; mounted or fixed only where it is missing, so the
# --- host row changes nothing on the host.
for fs in proc:/proc sysfs:/sys; do
    type=${fs%%:*} dir=${fs#*:}
    if [ -r "$dir/self/stat" ] || [ -d "$dir/kernel" ]; then
        note "$dir: mounted"
    else
        mount -t "$type" "$type" "$dir" && note "$dir: mounted $type now" || note "$dir: mounting $type FAILED"
    fi
done
for dir in /tmp /run; do
    probe="$dir/.sigwake-matrix-probe.$$"
    if mkdir -p "$dir" 2>/dev/null && : > "$probe" 2>/dev/null; then
        rm -f "$probe"
        note "$dir: writable"
    else
        mount -t tmpfs tmpfs "$dir" && note "$dir: mounted a tmpfs (was not writable)" || note "$dir: not writable, tmpfs mount FAILED"
    fi
done
# The metrics and escalation tests talk HTTP on 127.0.0.1.
if ! "$SIGWAKE_PYTHON" - <<'EOF' 2>> "$W/env.log"
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
socket.create_connection(s.getsockname(), timeout=5).close()
EOF
then
    note "loopback: not usable, bringing lo up"
    ip link set lo up 2>> "$W/env.log"
    ip addr add 127.0.0.1/8 dev lo 2>> "$W/env.log"
fi
note "loopback: $(ip -o -4 addr show dev lo 2>/dev/null | awk '{print $4}' | tr '\n' ' ')"
note "root filesystem: $(awk '$2 == "/" { t = $3 } END { print t }' /proc/mounts)"

# --- `sigwake check`: loads and attaches the programs, self-tests, and says
# --- which hook each job uses.
"$SIGWAKE_BIN" check --json > "$W/check.json" 2> "$W/check.err" < /dev/null
echo $? > "$W/check.status"

# --- The named end-to-end subset, one binary at a time, one test at a time.
mkdir -p "$W/tests"
while read -r name exe tests; do
    [ -n "$name" ] || continue
    t0=$(date +%s)
    # shellcheck disable=SC2086 # $tests is a list of test names
    "$exe" --exact $tests --test-threads 1 > "$W/tests/$name.log" 2>&1 < /dev/null
    echo $? > "$W/tests/$name.status"
    echo $(($(date +%s) - t0)) > "$W/tests/$name.secs"
done < "$W/plan.txt"
# --- With `cargo xtask kernels --bench`: the hot-path bench in this kernel
# --- (plan.env's SIGWAKE_BENCH is its command line, without the paths).
if [ -n "${SIGWAKE_BENCH:-}" ]; then
    t0=$(date +%s)
    # shellcheck disable=SC2086 # $SIGWAKE_BENCH is a command line
    $SIGWAKE_BENCH --work-dir "$W/bench" --out "$W/bench.json" > "$W/bench.log" 2>&1 < /dev/null
    echo $? > "$W/bench.status"
    echo $(($(date +%s) - t0)) > "$W/bench.secs"
fi
echo done > "$W/done"
