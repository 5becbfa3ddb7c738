#!/usr/bin/env python3
"""Link-time stand-ins for the CUDA libraries a `--features cuda` binary links against, so that
the GPU test and bench binaries can be *linked* on a machine without the CUDA libraries (they
run on the GPU machine against its real libraries, found through LD_LIBRARY_PATH).

candle-core uses cudarc's `dynamic-linking`: the binary gets DT_NEEDED entries for libcuda.so.1,
libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and libnvrtc.so.13. For each, this writes a
shared library with that soname defining every function cudarc declares for it (parsed from
cudarc's sys bindings) as a function returning error 999 (CUDA_ERROR_UNKNOWN): the symbol only
has to exist at link time, and a binary run against the stand-ins (no GPU) gets clean errors,
so its GPU tests skip instead of crashing.
libcudart comes from the real PyPI wheel (nvidia-cuda-runtime), only an unversioned symlink is
added.

Usage: cuda_link_stubs.py <CUDA_HOME (the pip cu13 root)> <cudarc source dir>
Writes <CUDA_HOME>/lib/lib{cuda,cublas,cublasLt,curand,nvrtc}.so (C sources in lib/link-stubs/) and
<CUDA_HOME>/lib/libcudart.so -> libcudart.so.13. <CUDA_HOME>/lib is on cudarc's link search path
(cudarc's build script only lists folders that existed when it ran, so a new lib/stubs folder
would not be seen by an already-built cudarc).
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
    lib = os.path.join(cuda_home, "lib")
    srcdir = os.path.join(lib, "link-stubs")
    os.makedirs(srcdir, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    for module, name, soname in LIBS:
        src = os.path.join(cudarc, "src", module, "sys", "mod.rs")
        with open(src, encoding="utf-8") as f:
            names = sorted(set(re.findall(r"^pub unsafe fn (\w+)\(", f.read(), re.M)))
        if not names:
            sys.exit(f"no functions found in {src}")
        c_file = os.path.join(srcdir, f"{name}_stub.c")
        with open(c_file, "w", encoding="utf-8") as f:
            f.write(f"/* link-time stand-in for {soname}: every call fails with error 999 */\n")
            for n in names:
                f.write(f"int {n}(void) {{ return 999; }}\n")
        out = os.path.join(lib, f"lib{name}.so")
        subprocess.run([cc, "-shared", "-fPIC", "-w", f"-Wl,-soname,{soname}", "-o", out, c_file], check=True)
        # The soname file too, so that a binary can run against the stand-ins (its GPU tests skip).
        so_link = os.path.join(lib, soname)
        if os.path.lexists(so_link):
            os.remove(so_link)
        os.symlink(f"lib{name}.so", so_link)
        print(f"{out}: {len(names)} symbols, soname {soname}")
    link = os.path.join(lib, "libcudart.so")
    if not os.path.exists(link):
        os.symlink("libcudart.so.13", link)
    print(f"{link} -> libcudart.so.13")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
