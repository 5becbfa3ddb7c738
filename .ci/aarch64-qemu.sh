#!/usr/bin/env bash
# The aarch64 (NEON) check: cross-compiles the kernel tests for aarch64-unknown-linux-gnu and runs
# them under qemu-aarch64 (user mode), reading ../shared/fixtures as the x86 tests do:
#   * the library unit tests of the kernel layer and the ops (`cpu::`, `ops::`): GEMM, GELU, ISA
#     detection (NEON detected and the fastest set),
#   * tests/kernel_policy.rs: the DCNv3/DCNv4 operators, channels-last helpers (linear, MLP,
#     GELU, LayerNorm, softmax, depthwise conv) and FlashInternImage on every instruction set the
#     CPU supports (NEON and portable) against the goldens and the reference policy,
#   * tests/model_parity.rs, the tiny_b tests: InternImage against the official outputs.
# Installs what it needs when missing (Debian: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross,
# qemu-user; the rustup target). Cheap when cold: only these three test targets, without the
# `hub`/`image` features (the I/O stack none of them uses), in the `qemu` profile (dependencies at
# opt-level 1, no debug info: see Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu

if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
[[ -e $SYSROOT/lib/libc.so.6 ]] || missing+=(libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "aarch64-qemu: missing ${missing[*]} and no apt-get to install them" >&2
        exit 1
    fi
    echo "aarch64-qemu: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $SYSROOT"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# qemu-user reports the host's core count; keep the tests' thread pools to the CI's 2 cores.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"

cargo_test() {
    cargo test --target "$TARGET" --profile qemu --no-default-features "$@"
}

# One build of the three test targets (extra cargo arguments, e.g. --timings, in
# AARCH64_QEMU_CARGO_ARGS), then each run with its filter (no rebuild).
# shellcheck disable=SC2086
cargo_test --lib --test kernel_policy --test model_parity --no-run ${AARCH64_QEMU_CARGO_ARGS:-}
[[ ${AARCH64_QEMU_BUILD_ONLY:-0} == 1 ]] && exit 0
cargo_test --lib -- cpu:: ops::
cargo_test --test kernel_policy
cargo_test --test model_parity -- tiny_b
