#!/usr/bin/env bash
# Builds, on the CPU machine (no GPU needed), everything scripts/gpu_check.sh runs on a GPU
# machine, and packs it into ONE archive small enough for the device tool's carry (<= 64 MiB):
#   target/gpu-carry.tar.xz = stripped binaries of tests/gpu_cuda.rs and benches/dcnv3_gpu.rs
#   (--features cuda, dev profile: dependencies at opt-level 3 as Cargo.toml sets, the GPU work
#   is in PTX anyway; one profile means candle's kernels are compiled by nvcc only once),
#   our PTX (kernels/dcnv3.cu, sm_90) for the CuPy gate,
#   and the fixtures the GPU tests read (dcnv3 cases, tiny_b/tiny_h weights and goldens).
#
# Needs: python3 with venv/pip (PyPI reachable), rustup/cargo, a C compiler.
# Time: the first build compiles candle's CUDA kernels with nvcc (10-15 min on 2 cores).
#
# How it links without CUDA libraries: nvcc 13.0 comes from the PyPI wheels (as in
# .ci/check-kernels.sh); scripts/cuda_link_stubs.py writes link-time stand-ins for libcuda,
# libcublas, libcublasLt, libcurand and libnvrtc (right sonames, every symbol cudarc declares) and
# an unversioned libcudart.so symlink to the wheel's real libcudart.so.13. The binaries then run on
# the GPU machine against its own driver and CUDA 13 libraries (LD_LIBRARY_PATH set by
# gpu_check.sh from the Python wheels there).
#
# Then, from the session that has a GPU:
#   run(command="bash scripts/gpu_check.sh target/gpu-carry.tar.xz", carry=["target/gpu-carry.tar.xz"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FIXTURES=${INTERNIMAGE_FIXTURES:-$ROOT/../shared/fixtures}
VENV=${CUDA_VENV:-$ROOT/.venv-cuda13}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

echo "== 1/4 nvcc 13.0 from PyPI into $VENV"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-runtime==13.0.88" "nvidia-cuda-cccl==13.0.85"
PYVER=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
export CUDA_HOME="$VENV/lib/python$PYVER/site-packages/nvidia/cu13"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
export CARGO_TARGET_DIR=${GPU_TARGET_DIR:-$ROOT/target/gpu}

echo "== 2/4 link stand-ins for the CUDA libraries"
cargo fetch --quiet
CUDARC=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-0.19.*' | sort | tail -n 1)
[[ -n "$CUDARC" ]] || { echo "cudarc sources not found in the cargo registry" >&2; exit 1; }
"$VENV/bin/python" scripts/cuda_link_stubs.py "$CUDA_HOME" "$CUDARC"

echo "== 3/4 builds with --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR)"
JSON=$(mktemp)
cargo test --no-default-features --features cuda --no-run --test gpu_cuda --bench dcnv3_gpu \
    --message-format=json-render-diagnostics >"$JSON"
exe() {
    "$VENV/bin/python" - "$JSON" "$1" <<'EOF'
import json, sys
path, name = sys.argv[1], sys.argv[2]
exes = []
for line in open(path):
    try:
        m = json.loads(line)
    except json.JSONDecodeError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == name and m.get("executable"):
        exes.append(m["executable"])
if not exes:
    sys.exit(f"no executable for {name}")
print(exes[-1])
EOF
}
TEST_EXE=$(exe gpu_cuda)
BENCH_EXE=$(exe dcnv3_gpu)

echo "== 4/4 packing target/gpu-carry.tar.xz"
STAGE=$ROOT/target/gpu-carry
rm -rf "$STAGE"
mkdir -p "$STAGE/fixtures/weights" "$STAGE/fixtures/expected"
cp "$TEST_EXE" "$STAGE/gpu_cuda"
cp "$BENCH_EXE" "$STAGE/dcnv3_gpu"
strip "$STAGE/gpu_cuda" "$STAGE/dcnv3_gpu"
nvcc --ptx -O3 -std=c++17 -arch=sm_90 -Ikernels kernels/dcnv3.cu -o "$STAGE/dcnv3.ptx"
cp "$FIXTURES"/{dcnv3_ops.json,dcnv3_ops.safetensors,manifest.json,inputs.safetensors} "$STAGE/fixtures/"
cp "$FIXTURES"/weights/tiny_{b,h}.{json,safetensors} "$STAGE/fixtures/weights/"
cp "$FIXTURES"/expected/tiny_{b,h}.safetensors "$STAGE/fixtures/expected/"
tar -C "$STAGE" -cf - . | xz -9 >"$ROOT/target/gpu-carry.tar.xz"
ls -la "$STAGE" "$ROOT/target/gpu-carry.tar.xz"
SIZE=$(stat -c %s "$ROOT/target/gpu-carry.tar.xz")
if ((SIZE > 64 * 1024 * 1024)); then
    echo "gpu-carry.tar.xz is $SIZE bytes, over the 64 MiB carry limit" >&2
    exit 1
fi
echo "ready: run scripts/gpu_check.sh target/gpu-carry.tar.xz on the GPU machine (carry target/gpu-carry.tar.xz)"
