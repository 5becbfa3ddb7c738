#!/usr/bin/env bash
# ONE short GPU run (< 10 min) on an NVIDIA H100/H200 machine that has nvcc, PyTorch,
# torchvision and CuPy but no Rust toolchain and no network. Prepare on the CPU machine first:
#   bash scripts/gpu_build.sh            # -> target/gpu-carry.tar.xz (binaries, PTX, fixtures)
# then run this from the repository root on the GPU machine, e.g. with the device tool:
#   run(command="bash scripts/gpu_check.sh target/gpu-carry.tar.xz",
#       carry=["target/gpu-carry.tar.xz"], timeout_s=600)
#
# Stages (each with its own timeout; a failing stage does not stop the later ones):
#   1. CuPy gate: our kernels/dcnv3.cu compiled by the machine's nvcc (else the carried PTX),
#      loaded with CuPy, forward + backward in f32/f16/bf16 vs a PyTorch float64 reference.
#      Works even when the Rust binaries cannot run.
#   2. Rust GPU tests (tests/gpu_cuda.rs): CUDA op vs fixtures and CPU op (all dtypes, fwd+bwd),
#      autograd, bad input, tiny_b/tiny_h logits.
#   3. Rust bench (benches/dcnv3_gpu.rs): our op at InternImage-T shapes and detection size
#      (batch 1 and 16), T/B images/s at 224 in f32/bf16.
#   4. PyTorch baselines at the same shapes: torchvision.ops.deform_conv2d and grid_sample.
#   5. Summary (scripts/gpu_summary.py), printed last.
# Logs go to $OUT (returned by the device tool) or ./gpu-logs.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${1:-target/gpu-carry.tar.xz}
LOG=${OUT:-$PWD/gpu-logs}
mkdir -p "$LOG"
QUICK=${QUICK:-}

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee "$LOG/gpu.txt"
python3 -c 'import torch, torchvision, cupy; print("torch", torch.__version__, "cuda", torch.version.cuda, "| torchvision", torchvision.__version__, "| cupy", cupy.__version__)' 2>&1 | tee -a "$LOG/gpu.txt"
nvcc --version 2>&1 | tail -n 1 | tee -a "$LOG/gpu.txt"

WORK=$(mktemp -d)
if [[ -f "$CARRY" ]]; then
    tar -xJf "$CARRY" -C "$WORK" && ls -la "$WORK"
else
    echo "no carry archive at $CARRY: only the CuPy gate and the PyTorch baselines can run"
fi

# CUDA 13 libraries for the Rust binaries: the Python wheels' lib folders (torch depends on them).
LIBDIRS=$(python3 - <<'EOF'
import glob, os, site
dirs = []
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for pat in ("nvidia/cu13/lib", "nvidia/*/lib", "torch/lib"):
        for d in sorted(glob.glob(os.path.join(root, pat))):
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [[ -x "$WORK/gpu_cuda" ]]; then
    echo "== shared libraries of the test binary"
    ldd "$WORK/gpu_cuda" | grep -E "cuda|cublas|curand|nvrtc|not found" | tee "$LOG/ldd.txt"
fi

echo "== 1/4 CuPy gate"
PTX="$WORK/dcnv3_device.ptx"
if ! nvcc --ptx -O3 -std=c++17 -arch=sm_90 -Ikernels kernels/dcnv3.cu -o "$PTX" 2>"$LOG/nvcc.log"; then
    echo "device nvcc failed (see nvcc.log); using the carried PTX"
    PTX="$WORK/dcnv3.ptx"
fi
timeout 120 python3 scripts/gpu_torch.py gate "$PTX" 2>&1 | tee "$LOG/gate.log"

if [[ -x "$WORK/gpu_cuda" ]]; then
    echo "== 2/4 Rust GPU tests"
    INTERNIMAGE_FIXTURES="$WORK/fixtures" timeout 200 "$WORK/gpu_cuda" --test-threads=1 --nocapture 2>&1 | tee "$LOG/tests.log"
    echo "== 3/4 Rust bench"
    timeout 120 "$WORK/dcnv3_gpu" ${QUICK:+--quick} 2>&1 | tee "$LOG/bench.log"
fi

echo "== 4/4 PyTorch baselines"
timeout 130 python3 scripts/gpu_torch.py bench ${QUICK:+--quick} 2>&1 | tee "$LOG/torch.log"

python3 scripts/gpu_summary.py "$LOG" 2>&1 | tee "$LOG/summary.txt"
