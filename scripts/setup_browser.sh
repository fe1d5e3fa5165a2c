#!/usr/bin/env bash
# Make sure the dashboard's browser tests have a browser: Debian's chromium, driven by the
# Playwright Python package from requirements-dev.txt. Never `playwright install`: it
# downloads a browser build of its own. Installs chromium with apt-get when it is missing
# and this runs as root (CI); otherwise says so, and the browser tests skip with a reason.
# Usage: scripts/setup_browser.sh   (./test.sh runs it; CHROMIUM=/path overrides the binary)
set -uo pipefail
chromium=${CHROMIUM:-/usr/bin/chromium}
if [[ -x $chromium ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: no $chromium and no apt-get as root to install it: the dashboard's browser tests will be skipped" >&2
  exit 0
fi
echo "setup: installing Debian's chromium for the dashboard's browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >&2; then
  echo "setup: apt-get could not install chromium: the dashboard's browser tests will be skipped" >&2
fi
exit 0
