#!/bin/sh
# Fetch the ONNX Runtime C/C++ headers from Debian trixie's libonnxruntime-dev and unpack them into DESTDIR
# (DESTDIR/include/onnxruntime/*.h). Bookworm has no such package. Pinned to ONNX Runtime 1.21 (C API version 21):
# the library then runs on any runtime from 1.21 on (the C API is versioned and backward compatible; the Python
# wheel's 1.31 is what the tests use) and refuses an older one at load with a clear error.
# Idempotent: exits at once when the headers are already there.
set -eu
DEST=${1:?usage: fetch_ort_headers.sh DESTDIR}
HDR="$DEST/include/onnxruntime/onnxruntime_cxx_api.h"
[ -f "$HDR" ] && exit 0
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK="$DEST/apt"
mkdir -p "$WORK/lists/partial" "$WORK/archives/partial"
# Use the mirror host the machine's own sources already use.
MIRROR=$(grep -rhv '^[[:space:]]*#' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
         | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
echo "deb ${MIRROR%/} trixie main" > "$WORK/sources.list"
APT="-oDir::Etc::SourceList=$WORK/sources.list -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists=$WORK/lists
     -oDir::Cache::Archives=$WORK/archives -oAPT::Architecture=$(dpkg --print-architecture) -oAPT::Sandbox::User=root"
# shellcheck disable=SC2086
apt-get $APT update >/dev/null
cd "$WORK"
# shellcheck disable=SC2086
apt-get $APT download libonnxruntime-dev >/dev/null
dpkg -x "$WORK"/libonnxruntime-dev_*.deb "$WORK/root"
INC=$(dirname "$(find "$WORK/root" -name onnxruntime_cxx_api.h | head -n1)")
[ -f "$INC/onnxruntime_cxx_api.h" ] || { echo "fetch_ort_headers.sh: no headers in libonnxruntime-dev" >&2; exit 1; }
grep -q '^#define ORT_API_VERSION 21$' "$INC/onnxruntime_c_api.h" || {
  echo "fetch_ort_headers.sh: expected the ONNX Runtime 1.21 headers (ORT_API_VERSION 21), trixie has:" \
       "$(grep '^#define ORT_API_VERSION' "$INC/onnxruntime_c_api.h")" >&2
  exit 1
}
mkdir -p "$DEST/include/onnxruntime"
cp "$INC"/*.h "$DEST/include/onnxruntime/"
rm -rf "$WORK"
echo "ONNX Runtime headers in $DEST/include/onnxruntime"
