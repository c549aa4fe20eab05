#!/usr/bin/env bash
# Installs the servers and tools the tests and the demo use, when they are missing (Debian 12):
# redis-server 7.0, prometheus-pushgateway 1.5, and prometheus 2.42 for `promtool` (the alert
# unit tests). Their system services are not used: tests start their own on loopback ports.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus-pushgateway >/dev/null 2>&1 || need+=(prometheus-pushgateway)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing ${need[*]} with apt-get" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
