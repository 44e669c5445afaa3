#!/usr/bin/env bash
# The Redis tests start their own redis-server (so they can kill and restart it): make sure
# the binary is here, installing Debian's package when we can, or say clearly why not.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's redis-server package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq redis-server >/dev/null
  # The package may start a service on 6379; the tests use their own ports either way.
  command -v redis-server >/dev/null 2>&1 && exit 0
fi
cat >&2 <<'MSG'
make test needs the redis-server binary (the tests start their own on free ports).
Install it, e.g.:  sudo apt-get install redis-server   (or: brew install redis)
MSG
exit 1
