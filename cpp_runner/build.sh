#!/bin/sh
# Build ddpm_runner and libddpm_sampler into cpp_runner/build (or $BUILD_DIR). Installs the Debian build tools
# when missing (as root), fetches the ONNX Runtime headers when neither ONNXRUNTIME_ROOT, ORT_HEADERS_DIR nor
# system headers exist, and links against the libonnxruntime of the onnxruntime wheel in $PYTHON (default: the
# project's .venv), with the OpenVINO engine when that Python's openvino wheel provides it. Extra cmake arguments:
# $CMAKE_ARGS (e.g. -DDDPM_SANITIZE=address,undefined).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd -P)  # the physical folder: a link to cpp_runner/ keeps its build cache valid
BUILD=${BUILD_DIR:-$HERE/build}
PYTHON=${PYTHON:-$HERE/../.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3 || true)

missing=""
command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
command -v g++ >/dev/null 2>&1 || missing="$missing g++"
[ -f /usr/include/zlib.h ] || missing="$missing zlib1g-dev"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  else
    echo "build.sh: missing:$missing (Debian: apt-get install$missing)" >&2
    exit 1
  fi
fi

set -- -DCMAKE_BUILD_TYPE=Release
[ -n "$PYTHON" ] && set -- "$@" -DORT_PYTHON="$PYTHON"
if [ -n "${ORT_HEADERS_DIR:-}" ]; then
  set -- "$@" -DORT_HEADERS_DIR="$ORT_HEADERS_DIR"
elif [ -z "${ONNXRUNTIME_ROOT:-}" ] && [ ! -f /usr/include/onnxruntime/onnxruntime_cxx_api.h ]; then
  "$HERE/fetch_ort_headers.sh" "$BUILD/ort-headers"
  set -- "$@" -DORT_HEADERS_DIR="$BUILD/ort-headers/include"
fi
# The OpenVINO engine, when the openvino wheel in $PYTHON ships its CMake package (DDPM_WITH_OPENVINO=OFF: never).
OV_CMAKE=""
if [ "${DDPM_WITH_OPENVINO:-auto}" != OFF ] && [ -n "$PYTHON" ]; then
  OV_CMAKE=$("$PYTHON" -c "import importlib.util as u, os; s = u.find_spec('openvino'); \
print(os.path.join(s.submodule_search_locations[0], 'cmake') if s else '')" 2>/dev/null || true)
fi
if [ -n "$OV_CMAKE" ] && [ -f "$OV_CMAKE/OpenVINOConfig.cmake" ]; then
  set -- "$@" -DDDPM_WITH_OPENVINO=ON -DOpenVINO_DIR="$OV_CMAKE"
else
  set -- "$@" -DDDPM_WITH_OPENVINO=OFF
fi
# shellcheck disable=SC2086
cmake -S "$HERE" -B "$BUILD" "$@" ${CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD" -j "$(nproc 2>/dev/null || echo 2)"
echo "built $BUILD/ddpm_runner"
