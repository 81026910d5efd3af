#!/usr/bin/env bash
# Sets up the llama.cpp and candle peers of benches/compare.py (PyTorch and
# ONNX Runtime need only `pip install torch transformers safetensors
# onnxruntime onnx` in the same venv).
#
#   benches/setup_peers.sh [llamacpp] [gguf] [candle]     (default: all three)
#
# Environment (all optional):
#   VENV               the Python venv with torch + transformers (default: V, as
#                      in benches/RESULTS.md); llama-cpp-python goes into it
#   MODELS             the model folders of benches/make_models.py
#                      (default: target/bench-models)
#   PEER_SRC           where the llama-cpp-python sdist is kept and unpacked
#                      (default: target/peer-src)
#   CARGO_TARGET_DIR   candle's target folder (default: target/peer-candle; a
#                      folder of its own, so the build never waits on kiln's
#                      cargo lock); the binary is $CARGO_TARGET_DIR/release/peer_candle
#   JOBS               parallel compile jobs (default: nproc)
#
# Steps:
#   llamacpp  downloads the llama-cpp-python sdist (pinned below) and builds
#             and installs it from source into $VENV with -DGGML_NATIVE=ON
#             (-march=native: AVX-512 where the CPU has it), CPU only, without
#             the multimodal (mtmd/llava) library the benchmark does not use.
#             About 7 minutes on 2 cores.
#   gguf      converts $MODELS/llama_768 to an f32 GGUF,
#             $MODELS/gguf/llama_768-f32.gguf, with the convert_hf_to_gguf.py
#             and gguf-py that the same sdist vendors (vendor/llama.cpp/),
#             through benches/gguf_convert.py, which writes a "no_vocab" GGUF
#             when the folder has no tokenizer (the bench folders have none:
#             llama.cpp then loads it with LLAMA_VOCAB_TYPE_NONE and 32000 dummy
#             tokens, and the peer feeds token ids). Skipped while the GGUF is
#             newer than model.safetensors.
#   candle    builds benches/peer_candle (a standalone crate with its own
#             [workspace] and Cargo.lock; candle 0.11.1 from crates.io) in
#             release mode with RUSTFLAGS="-C target-cpu=native" (unless
#             RUSTFLAGS is set). About 7 minutes on 2 cores.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36   # vendors llama.cpp with gguf-py 0.19.0
# The build backend and tools pip fetches into llama-cpp-python's isolated build
# environment, and gguf-py's dependencies, pinned through a constraints file.
PINS=(scikit-build-core==1.1.2 cmake==4.4.5 ninja==1.13.2 tqdm==4.70.1 pyyaml==6.0.4 requests==2.34.2)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
VENV="${VENV:-V}"
MODELS="${MODELS:-target/bench-models}"
PEER_SRC="${PEER_SRC:-target/peer-src}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/peer-candle}"
JOBS="${JOBS:-$(nproc)}"
PY="$VENV/bin/python"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(llamacpp gguf candle)

sdist_dir="$PEER_SRC/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
mkdir -p "$PEER_SRC"
printf '%s\n' "${PINS[@]}" > "$PEER_SRC/constraints.txt"
export PIP_CONSTRAINT="$(cd "$PEER_SRC" && pwd)/constraints.txt"   # also read by the isolated build's pip

fetch_sdist() {
    if [ ! -f "$sdist_dir/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
        mkdir -p "$PEER_SRC"
        local tarball="$PEER_SRC/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
        if [ ! -f "$tarball" ]; then
            "$PY" -m pip download --no-deps --no-binary llama-cpp-python \
                "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$PEER_SRC"
        fi
        tar -xzf "$tarball" -C "$PEER_SRC"
    fi
}

step_llamacpp() {
    if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
        echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: already installed in $VENV"
        return
    fi
    fetch_sdist
    # Built from the sdist fetched above (pip would otherwise take a prebuilt
    # wheel where one exists, or build without -march=native).
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "$PY" -m pip install --no-cache-dir --no-binary llama-cpp-python \
            "$PEER_SRC/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    "$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
}

step_gguf() {
    fetch_sdist
    local src="$MODELS/llama_768" out="$MODELS/gguf/llama_768-f32.gguf"
    if [ -f "$out" ] && [ "$out" -nt "$src/model.safetensors" ]; then
        echo "$out: already there"
        return
    fi
    mkdir -p "$(dirname "$out")"
    # gguf-py's own dependencies (numpy, tqdm, pyyaml, requests) and the
    # converter's (torch) come with the venv; sentencepiece is only needed for
    # folders with a tokenizer.model.
    "$PY" -m pip install --quiet tqdm pyyaml requests
    LLAMA_CPP_SRC="$sdist_dir/vendor/llama.cpp" \
        "$PY" benches/gguf_convert.py "$src" --outtype f32 --outfile "$out.tmp"
    mv "$out.tmp" "$out"
    echo "$out: $(du -m "$out" | cut -f1) MB"
}

step_candle() {
    # -C target-cpu=native as candle's own repository builds (its .cargo/config.toml):
    # candle's element-wise and reduction kernels pick AVX paths at compile time.
    RUSTFLAGS="${RUSTFLAGS:--C target-cpu=native}" \
        cargo build --release --locked -j "$JOBS" --manifest-path benches/peer_candle/Cargo.toml
    echo "candle peer: $CARGO_TARGET_DIR/release/peer_candle"
}

for s in "${steps[@]}"; do
    case "$s" in
        llamacpp) step_llamacpp ;;
        gguf) step_gguf ;;
        candle) step_candle ;;
        *) echo "unknown step $s (known: llamacpp gguf candle)" >&2; exit 2 ;;
    esac
done
