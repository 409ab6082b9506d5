#!/bin/sh
# What the page's tests and `ddpm web --headless` need: onnxruntime-web (and playwright-core, which drives the page in
# the tests) from web/package-lock.json, and a Chromium (Debian's chromium package, installed when missing, as root).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd -P)
if [ ! -f "$HERE/node_modules/.installed" ] || [ "$HERE/package-lock.json" -nt "$HERE/node_modules/.installed" ]; then
  command -v npm >/dev/null 2>&1 || { echo "web/install.sh: npm is missing (Debian: apt-get install npm)" >&2; exit 1; }
  npm ci --prefix "$HERE" --no-audit --no-fund --loglevel=error
  touch "$HERE/node_modules/.installed"
fi
for browser in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$browser" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
else
  echo "web/install.sh: no Chromium found (Debian: apt-get install chromium)" >&2
  exit 1
fi
