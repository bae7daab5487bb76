#!/usr/bin/env bash
# The frontend-ceiling deployment: one router, two mocker workers that never sleep, one frontend,
# on loopback, in the background. Optionally from another source tree (an older commit extracted
# with `git archive`), so that two versions are measured in one load-generator run. That tree's
# lib/ and services/*/ go first on PYTHONPATH, so its processes import its own code (and its own
# generated stubs) rather than the installed checkout; each process's log names the files it runs
# from in its tracebacks, and `/proc/<pid>/environ` shows the PYTHONPATH it got.
#
#   bench/ceiling_deploy.sh up   BASE_PORT [SOURCE_TREE]   # frontend HTTP on BASE_PORT
#   bench/ceiling_deploy.sh down BASE_PORT
#
# FRONTEND_ARGS adds flags to the frontend (e.g. FRONTEND_ARGS='--worker-transport unary').
#
# Before/after in one run (A = an older commit extracted to /tmp/before):
#   mkdir -p /tmp/before && git archive <commit> | tar -x -C /tmp/before
#   python -m bench.loadgen --labels before,after --target http://127.0.0.1:18000 \
#       --target http://127.0.0.1:19000 \
#       --setup-a 'bench/ceiling_deploy.sh up 18000 /tmp/before' --teardown-a 'bench/ceiling_deploy.sh down 18000' \
#       --setup-b 'bench/ceiling_deploy.sh up 19000' --teardown-b 'bench/ceiling_deploy.sh down 19000' \
#       --concurrency 64 --num-requests 2560 --warmup 128 --prefix-len 0 --suffix-len 100 \
#       --output-len 64 --prompt-format tokens --measure-cpu-of 'tokenyard.cli (frontend|router|worker) .*ceiling'
set -euo pipefail

cmd=${1:?up or down}
base=${2:?base port}
state=${TMPDIR:-/tmp}/tokenyard-ceiling-$base
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}

case $cmd in
up)
    src=${3:-}
    rm -rf "$state" && mkdir -p "$state"
    if [[ -n $src ]]; then
        # Namespace portions found on PYTHONPATH come before the installed ones: that tree's
        # modules win.
        paths=("$src/lib")
        for svc in frontend router worker planner gms; do paths+=("$src/services/$svc"); done
        export PYTHONPATH
        PYTHONPATH=$(IFS=:; echo "${paths[*]}")
    fi
    disc="dir://$state/discovery"
    run() {
        local name=$1
        shift
        "$python" -m tokenyard.cli "$@" >"$state/$name.log" 2>&1 &
        echo $! >>"$state/pids"
    }
    run router router --port $((base + 100)) --metrics-port $((base + 101)) --discovery "$disc"
    for i in 0 1; do
        run "worker$i" worker --port $((base + 300 + i)) --metrics-port $((base + 400 + i)) \
            --discovery "$disc" --engine mocker --mocker-speedup-ratio 0
    done
    # shellcheck disable=SC2086
    run frontend frontend --http-port "$base" --port $((base + 1)) --discovery "$disc" ${FRONTEND_ARGS:-}
    ;;
down)
    if [[ -f $state/pids ]]; then
        # shellcheck disable=SC2046
        kill -TERM $(cat "$state/pids") 2>/dev/null || true
        for _ in $(seq 50); do
            alive=0
            for pid in $(cat "$state/pids"); do kill -0 "$pid" 2>/dev/null && alive=1; done
            [[ $alive == 0 ]] && break
            sleep 0.2
        done
        # shellcheck disable=SC2046
        kill -KILL $(cat "$state/pids") 2>/dev/null || true
        rm -f "$state/pids"
    fi
    ;;
*)
    echo "usage: $0 up|down BASE_PORT [SOURCE_TREE]" >&2
    exit 2
    ;;
esac
