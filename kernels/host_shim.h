// Host (plain C++17) definitions for dcnv3_common.h, so that the per-element kernel code can be
// compiled and run on a machine without a GPU (kernels/dcnv3_host.cpp, tests/kernel_host.rs).
// Device qualifiers and address spaces are empty, vector accesses are element loops, and the
// atomics are plain additions because the host "launch" runs the threads one after another.
// Only f32 tensors are used on the host (the fixtures are f32).

#ifndef DCNV3_HOST_SHIM_H
#define DCNV3_HOST_SHIM_H

#include <cmath>

#define DCN_FN inline
#define DCN_GLOBAL
#define DCN_THREAD
#define DCN_RESTRICT
#define DCN_UNROLL
#define DCN_PARAMS const Dcnv3Params&
typedef long long dcn_index_t;

inline float dcn_floor(float x) { return std::floor(x); }
inline float dcn_ld(const float* p) { return *p; }
inline void dcn_st(float* p, float v) { *p = v; }

template <typename T, int VEC>
inline void dcn_load_vec(const T* src, float* dst) {
    for (int k = 0; k < VEC; ++k) {
        dst[k] = dcn_ld(src + k);
    }
}

template <typename T, int VEC>
inline void dcn_store_vec(T* dst, const float* src) {
    for (int k = 0; k < VEC; ++k) {
        dcn_st(dst + k, src[k]);
    }
}

// Sequential host loop: an atomic add is an add.
inline void dcn_atomic_add(float* dst, float v) { *dst += v; }

#endif  // DCNV3_HOST_SHIM_H
