#!/usr/bin/env bash
# The optional Redis of supervisor.conf's single-VM install: a redis-server on loopback with AOF
# under .redis/. It steps aside (exit 0, and supervisord leaves it EXITED) when the fleet is
# configured for another Redis: REDIS_URL set, REDIS_HOST not local, or REDIS_PORT already taken.
# Values are read like the programs read them: the environment first, then .env; empty = unset.
set -euo pipefail
cd "$(dirname "$0")/.."

setting() {  # setting KEY DEFAULT
    local value="${!1:-}"
    if [[ -z "$value" && -f .env ]]; then
        value="$(sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*//p" .env | tail -n 1)"
        value="${value%\"}"; value="${value#\"}"; value="${value%\'}"; value="${value#\'}"
    fi
    printf '%s' "${value:-$2}"
}

url="$(setting REDIS_URL '')"
host="$(setting REDIS_HOST localhost)"
port="$(setting REDIS_PORT 6379)"
if [[ -n "$url" ]]; then
    echo "REDIS_URL is set: the fleet uses that Redis, no local one is started"
    exit 0
fi
case "$host" in
    localhost|127.0.0.1|::1) ;;
    *) echo "REDIS_HOST=$host is not local: no local Redis is started"; exit 0 ;;
esac
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "something already listens on 127.0.0.1:$port: the fleet uses it, no local Redis is started"
    exit 0
fi
binary="$(command -v redis-server || true)"
if [[ -z "$binary" ]]; then
    echo "redis-server is not installed (apt-get install redis-server), or set REDIS_URL" >&2
    exit 78
fi
mkdir -p .redis
args=(--bind 127.0.0.1 --port "$port" --dir "$PWD/.redis" --daemonize no
      --appendonly yes --appendfsync everysec --save "")
password="$(setting REDIS_PASSWORD '')"
if [[ -n "$password" ]]; then
    # Through stdin, not argv, so the password never shows in `ps`.
    exec "$binary" - "${args[@]}" <<<"requirepass \"$password\""
fi
echo "starting redis-server on 127.0.0.1:$port (AOF in .redis/)"
exec "$binary" "${args[@]}"
