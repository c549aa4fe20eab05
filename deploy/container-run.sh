#!/bin/sh
# Entrypoint of the image: runs the program and passes SIGTERM/SIGINT on to it. Docker cannot
# exempt exit codes from a restart policy, so the two exits that must not be retried, 77 (session
# revoked) and 78 (configuration error), leave the container stopped with exit 0 under
# `restart: on-failure`, after one line saying why; every other failure is restarted.
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
trap 'kill -INT "$child" 2>/dev/null' INT
while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break  # still running: wait was interrupted by a signal
done
case "$rc" in
    77|78)
        echo "exit $rc ($( [ "$rc" = 77 ] && echo 'session revoked' || echo 'configuration error' )): not restarted; fix it, then docker compose up -d again" >&2
        exit 0 ;;
esac
exit "$rc"
