#!/usr/bin/env bash
# System packages the tests start for real on 127.0.0.1: Debian's chromium (driven by
# Playwright with executable_path=/usr/bin/chromium, never a browser download), PostgreSQL,
# Redis and nginx, and iproute2 (`ip netns`: the Celery test puts each worker on a host of its
# own). Installed with apt when missing (root, or sudo without a password);
# otherwise the missing ones are named and the command fails.
set -euo pipefail
declare -A need=(
  [/usr/bin/chromium]=chromium
  [/usr/bin/redis-server]=redis-server
  [/usr/sbin/nginx]=nginx
  [/usr/sbin/ip]=iproute2
)
missing=()
for bin in "${!need[@]}"; do
  [ -x "$bin" ] || missing+=("${need[$bin]}")
done
# PostgreSQL: any server binary (Debian's versioned folder or one on PATH)
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && ! command -v postgres >/dev/null; then
  missing+=(postgresql)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing system packages: ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "error: missing ${missing[*]}: install them with apt-get (needs root)" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
# The packages' own services are not needed: the tests start their servers on 127.0.0.1.
for svc in nginx redis-server postgresql; do
  $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
