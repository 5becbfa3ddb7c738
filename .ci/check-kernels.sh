#!/usr/bin/env bash
# CI checks of the GPU kernels that need no GPU (called from .ci/run; runnable on its own on a
# clean Debian machine with python3.11 + venv/pip and rustup):
#   1. compile kernels/dcnv3.cu to PTX with a real nvcc (CUDA 13.0 from the PyPI wheels, pinned
#      together; the CUDA 12 wheels ship no nvcc). Only our kernel, not candle's (fast).
#   2. type-check the Metal path: cargo check --target aarch64-apple-darwin --features metal.
# The numerical check of the kernels' per-element code runs in `cargo test` (tests/kernel_host.rs).
#
# Environment knobs:
#   CUDA_VENV   where to create/reuse the nvcc virtualenv (default: .venv-cuda13 in the crate)
#   SKIP_NVCC=1 / SKIP_METAL=1   skip one of the two checks
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [[ "${SKIP_NVCC:-0}" != 1 ]]; then
    echo "== check-kernels: nvcc --ptx kernels/dcnv3.cu"
    VENV=${CUDA_VENV:-$PWD/.venv-cuda13}
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PY" -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
        "nvidia-cuda-runtime==13.0.88" "nvidia-cuda-cccl==13.0.85"
    PYVER=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    export CUDA_HOME="$VENV/lib/python$PYVER/site-packages/nvidia/cu13"
    export PATH="$CUDA_HOME/bin:$PATH"
    nvcc --version | tail -n 2
    OUT=$(mktemp -d)
    trap 'rm -rf "$OUT"' EXIT
    # sm_90 (H100/H200) as shipped builds use it; sm_80 to keep the bf16/f16 paths honest on Ampere.
    for arch in sm_90 sm_80; do
        nvcc --ptx -O3 -std=c++17 -arch="$arch" -Ikernels kernels/dcnv3.cu -o "$OUT/dcnv3_$arch.ptx"
        n=$(grep -c '^\.visible \.entry' "$OUT/dcnv3_$arch.ptx" || true)
        # 11 (dtype, vec) x (DCNv3, DCNv4) x (forward, backward) + 3 casts.
        if [[ "$n" -ne 47 ]]; then
            echo "check-kernels: expected 47 kernel entries in the $arch PTX, found $n" >&2
            exit 1
        fi
        echo "check-kernels: $arch PTX OK ($n kernels)"
    done
fi

if [[ "${SKIP_METAL:-0}" != 1 ]]; then
    echo "== check-kernels: cargo check --target aarch64-apple-darwin --features metal"
    rustup target add aarch64-apple-darwin
    CARGO_TARGET_DIR=${METAL_TARGET_DIR:-$PWD/target/metal-check} \
        cargo check --target aarch64-apple-darwin --no-default-features --features metal --lib
    echo "check-kernels: Metal path type-checks"
fi
echo "check-kernels: all OK"
