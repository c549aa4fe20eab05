#!/usr/bin/env bash
# Scale the supervisord fleet to N workers (0..8): starts worker_00..N-1, stops the others.
# supervisor.conf defines worker_00..02 (started by default) and spares worker_03..07.
# Each worker needs a session of its own; one without a free session waits and logs why.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
n="${1:?usage: deploy/scale.sh N   (0..8 workers)}"
if ! [[ "$n" =~ ^[0-8]$ ]]; then
    echo "N must be a number from 0 to 8 (supervisor.conf has 8 worker slots)" >&2
    exit 64
fi
ctl=("$here/.venv/bin/supervisorctl" -c "$here/supervisor.conf")
start=() stop=()
for i in 0 1 2 3 4 5 6 7; do
    name="$( ((i < 3)) && echo worker || echo spare ):worker_0$i"
    if ((i < n)); then start+=("$name"); else stop+=("$name"); fi
done
# "already started" / "not running" are fine here: the end state is what counts.
((${#stop[@]})) && "${ctl[@]}" stop "${stop[@]}" | grep -v "not running" || true
((${#start[@]})) && "${ctl[@]}" start "${start[@]}" | grep -v "already started" || true
"${ctl[@]}" status | grep -E '^(worker|spare):' | grep -v STOPPED || true
