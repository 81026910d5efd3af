#!/usr/bin/env bash
# kiln's CUDA backend on a real GPU: parity, then benchmarks against PyTorch,
# writing everything under $OUT. For a machine lent with an NVIDIA GPU (the
# `device` tool): it builds nothing. Build the release binary on the build
# machine (`cargo build --release`) and carry `target/release/kiln`; the
# GPU machine's Python needs torch, transformers and safetensors, and NVRTC
# (the nvidia-cuda-nvrtc wheel) in its site-packages.
#
#   OUT=/tmp/gpu bash benches/cuda/run.sh [--quick]
#
# 1. parity.py: every test family (tests/data/hf/*) run with --backend cuda
#    against the interpreter and the CPU backend (logits within 1e-4
#    relative, f32), and greedy generation identical, with and without the cache;
# 2. the benchmark models (LLaMA-shaped 124.7M, GPT-2-small-shaped) made
#    with transformers, then prefill B=8 x T=512 and greedy decode of 128
#    tokens at B=1: kiln, PyTorch eager and torch.compile(reduce-overhead),
#    interleaved; bench.py writes the table (RESULTS.md rows) to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/kiln-gpu}
mkdir -p "$OUT"
KILN=${KILN:-$PWD/target/release/kiln}
PY=${PYTHON:-python3}
QUICK=${1:-}

# NVRTC and cuBLAS from the Python's nvidia wheels, on the library path.
libs=$($PY - <<'PY'
import glob, os, site
dirs = set()
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for pat in ("nvidia/*/lib", "nvidia/cu*/lib"):
        for lib in glob.glob(os.path.join(base, pat)):
            if glob.glob(os.path.join(lib, "libnvrtc.so*")) or glob.glob(os.path.join(lib, "libcublas*.so*")):
                dirs.add(lib)
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  $KILN --version 2>&1
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

timeout 240 $KILN demo --backend cuda > "$OUT/demo.txt" 2>&1
echo "demo: exit $?"; tail -4 "$OUT/demo.txt"

timeout 300 $PY benches/cuda/parity.py --kiln "$KILN" --out "$OUT/parity.json" 2>&1 | tee "$OUT/parity.txt"

if [ "$QUICK" != "--quick" ]; then
  timeout 600 $PY benches/cuda/bench.py --kiln "$KILN" --models "$OUT/models" --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
fi
