//! Build script.
//!
//! * Always: exports the target triple as `INTERNIMAGE_TARGET` (and the host as
//!   `INTERNIMAGE_HOST`) so that `tests/kernel_host.rs` can compile the host build of the DCNv3
//!   kernels with the `cc` crate for the right target.
//! * With the `cuda` feature only: compiles `kernels/dcnv3.cu` to PTX with nvcc (through
//!   `cudaforge`, honouring `CUDA_COMPUTE_CAP`, `NVCC`, `CUDA_HOME`, `NVCC_CCBIN`) and writes
//!   `OUT_DIR/dcnv3_ptx.rs` (`pub const DCNV3: &str`), included by `src/ops/dcnv3/cuda.rs`.
//!   Without a GPU on the build machine `CUDA_COMPUTE_CAP` must be set (e.g. `90` for H100/H200).

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(target) = env::var("TARGET") {
        println!("cargo:rustc-env=INTERNIMAGE_TARGET={target}");
    }
    if let Ok(host) = env::var("HOST") {
        println!("cargo:rustc-env=INTERNIMAGE_HOST={host}");
    }
    #[cfg(feature = "cuda")]
    build_cuda();
}

#[cfg(feature = "cuda")]
fn build_cuda() {
    use std::path::PathBuf;
    println!("cargo:rerun-if-changed=kernels/dcnv3.cu");
    println!("cargo:rerun-if-changed=kernels/dcnv3_common.h");
    let out_dir = match env::var("OUT_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(e) => panic!("internimage build.rs: OUT_DIR is not set ({e})"),
    };
    let built = cudaforge::KernelBuilder::new()
        .source_files(["kernels/dcnv3.cu"])
        .watch(["kernels/dcnv3_common.h"])
        .out_dir(&out_dir)
        .arg("-std=c++17")
        .arg("-O3")
        .arg("-Ikernels")
        .build_ptx();
    let ptx = match built {
        Ok(p) => p,
        Err(e) => panic!(
            "internimage build.rs: compiling kernels/dcnv3.cu to PTX failed: {e:?}\n\
             The `cuda` feature needs nvcc (PATH, $NVCC or $CUDA_HOME/bin) and, on a machine \
             without a GPU, CUDA_COMPUTE_CAP (e.g. CUDA_COMPUTE_CAP=90)."
        ),
    };
    if let Err(e) = ptx.write(out_dir.join("dcnv3_ptx.rs")) {
        panic!("internimage build.rs: writing dcnv3_ptx.rs failed: {e:?}");
    }
}
