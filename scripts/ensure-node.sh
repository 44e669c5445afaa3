#!/usr/bin/env bash
# The JavaScript client's tests (tests/test_js_client.py) run under Node's test runner: make
# sure a Node with a WebSocket (20 or newer) is here, installing Debian's nodejs package when we
# can. Without one the run goes on and those tests skip, saying why (in CI they fail instead).
set -euo pipefail
has_node() {
  command -v node >/dev/null 2>&1 \
    && node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'
}
if has_node; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "node (20 or newer) not found: installing Debian's nodejs package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq nodejs >/dev/null
  has_node && exit 0
fi
cat >&2 <<'MSG'
note: the JavaScript client's tests need Node 20 or newer, and will skip.
Install it, e.g.:  sudo apt-get install nodejs   (Debian 12: Node 18 is too old, use
NodeSource or nvm: https://nodejs.org/en/download)   or: brew install node
MSG
