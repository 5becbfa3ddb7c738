#!/usr/bin/env python3
"""Link-time stand-ins for the CUDA libraries a `--features cuda` binary links against, so that
the GPU test and bench binaries can be *linked* on a machine without the CUDA libraries (they
run on the GPU machine against its real libraries, found through LD_LIBRARY_PATH).

candle-core uses cudarc's `dynamic-linking`: the binary gets DT_NEEDED entries for libcuda.so.1,
libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and libnvrtc.so.13. For each, this writes a
shared library with that soname defining every function cudarc declares for it (parsed from
cudarc's sys bindings), as an empty function: the symbol only has to exist at link time.
libcudart comes from the real PyPI wheel (nvidia-cuda-runtime), only an unversioned symlink is
added.

Usage: cuda_link_stubs.py <CUDA_HOME (the pip cu13 root)> <cudarc source dir>
Writes <CUDA_HOME>/lib/stubs/lib{cuda,cublas,cublasLt,curand,nvrtc}.so and
<CUDA_HOME>/lib/libcudart.so -> libcudart.so.13 (both on cudarc's link search path).
"""
import os
import re
import subprocess
import sys

LIBS = [
    # (cudarc module, library name, soname)
    ("driver", "cuda", "libcuda.so.1"),
    ("cublas", "cublas", "libcublas.so.13"),
    ("cublaslt", "cublasLt", "libcublasLt.so.13"),
    ("curand", "curand", "libcurand.so.10"),
    ("nvrtc", "nvrtc", "libnvrtc.so.13"),
]


def main(cuda_home, cudarc):
    stubs = os.path.join(cuda_home, "lib", "stubs")
    os.makedirs(stubs, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    for module, name, soname in LIBS:
        src = os.path.join(cudarc, "src", module, "sys", "mod.rs")
        with open(src, encoding="utf-8") as f:
            names = sorted(set(re.findall(r"^pub unsafe fn (\w+)\(", f.read(), re.M)))
        if not names:
            sys.exit(f"no functions found in {src}")
        c_file = os.path.join(stubs, f"{name}_stub.c")
        with open(c_file, "w", encoding="utf-8") as f:
            f.write(f"/* link-time stand-in for {soname}: never called */\n")
            for n in names:
                f.write(f"void {n}(void) {{}}\n")
        out = os.path.join(stubs, f"lib{name}.so")
        subprocess.run([cc, "-shared", "-fPIC", "-w", f"-Wl,-soname,{soname}", "-o", out, c_file], check=True)
        print(f"{out}: {len(names)} symbols, soname {soname}")
    lib = os.path.join(cuda_home, "lib")
    link = os.path.join(lib, "libcudart.so")
    if not os.path.exists(link):
        os.symlink("libcudart.so.13", link)
    print(f"{link} -> libcudart.so.13")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
