// DCNv3 Metal kernels (forward, backward, f32 -> T cast) for f32 and f16, and bf16 where the
// compiler has __HAVE_BFLOAT__ (Apple GPUs, macOS 14+). f32 arithmetic.
//
// Compiled at run time by src/ops/dcnv3/metal.rs, which replaces the include of dcnv3_common.h
// line below by that file's text (the per-element code shared with the CUDA kernels and with the
// host build that the tests check), so the kernels here are thin wrappers mirroring dcnv3.cu:
// same names (dcnv3_fwd_<dtype>_v<VEC>, dcnv3_bwd_<dtype>_v<VEC>, dcnv3_cast_f32_<dtype>), same
// buffers in the same order, same work decomposition. Dispatch: 1-D, whole threadgroups whose
// size is a multiple of the SIMD width; the backward's lanes must divide the SIMD width.

#include <metal_stdlib>
using namespace metal;

#define DCN_FN inline
#define DCN_GLOBAL device
#define DCN_THREAD thread
#define DCN_RESTRICT
#define DCN_UNROLL
#define DCN_PARAMS constant Dcnv3Params&
typedef long dcn_index_t;

DCN_FN float dcn_floor(float x) { return floor(x); }

template <typename T>
DCN_FN float dcn_ld(const device T* p) {
    return float(*p);
}

template <typename T>
DCN_FN void dcn_st(device T* p, float v) {
    *p = T(v);
}

template <typename T, int VEC>
DCN_FN void dcn_load_vec(const device T* src, thread float* dst) {
    for (int k = 0; k < VEC; ++k) {
        dst[k] = float(src[k]);
    }
}

template <typename T, int VEC>
DCN_FN void dcn_store_vec(device T* dst, const thread float* src) {
    for (int k = 0; k < VEC; ++k) {
        dst[k] = T(src[k]);
    }
}

DCN_FN void dcn_atomic_add(device float* dst, float v) {
    atomic_fetch_add_explicit((device atomic_float*)dst, v, memory_order_relaxed);
}

#include "dcnv3_common.h"

template <typename T, int VEC>
DCN_FN void dcnv3_fwd_kernel(constant Dcnv3Params& p, const device T* input, const device T* offset,
                             const device T* mask, device T* output, uint tid) {
    const dcn_index_t idx = (dcn_index_t)tid;
    if (idx >= dcn_total_threads(p)) {
        return;
    }
    dcnv3_fwd_thread<T, VEC>(p, input, offset, mask, output, idx);
}

// Every thread of a SIMD-group runs the point loop (inactive ones with zero partials) so that the
// shuffles see the whole group; lanes (a power of two dividing the SIMD width) keeps the xor
// butterfly inside one item.
template <typename T, int VEC>
DCN_FN void dcnv3_bwd_kernel(constant Dcnv3Params& p, const device T* input, const device T* offset,
                             const device T* mask, const device T* grad_out, device float* grad_input,
                             device T* grad_offset, device T* grad_mask, uint tid) {
    const dcn_index_t idx = (dcn_index_t)tid;
    const bool active = idx < dcn_total_threads(p);
    const dcn_index_t item = idx / p.lanes;
    const int lane = (int)(idx - item * p.lanes);
    for (int pt = 0; pt < p.points; ++pt) {
        DcnGrad r;
        r.gx = 0.0f;
        r.gy = 0.0f;
        r.gm = 0.0f;
        if (active) {
            r = dcnv3_bwd_partial<T, VEC>(p, input, offset, mask, grad_out, grad_input, item, lane, pt);
        }
        for (int s = p.lanes >> 1; s > 0; s >>= 1) {
            r.gx += simd_shuffle_xor(r.gx, ushort(s));
            r.gy += simd_shuffle_xor(r.gy, ushort(s));
            r.gm += simd_shuffle_xor(r.gm, ushort(s));
        }
        if (active && lane == 0) {
            dcnv3_bwd_store<T>(p, grad_offset, grad_mask, item, pt, r);
        }
    }
}

#define DCN_KERNELS(NAME, T, VEC)                                                                      \
    kernel void dcnv3_fwd_##NAME##_v##VEC(                                                             \
        constant Dcnv3Params& p [[buffer(0)]], const device T* input [[buffer(1)]],                    \
        const device T* offset [[buffer(2)]], const device T* mask [[buffer(3)]],                      \
        device T* output [[buffer(4)]], uint tid [[thread_position_in_grid]]) {                        \
        dcnv3_fwd_kernel<T, VEC>(p, input, offset, mask, output, tid);                                 \
    }                                                                                                  \
    kernel void dcnv3_bwd_##NAME##_v##VEC(                                                             \
        constant Dcnv3Params& p [[buffer(0)]], const device T* input [[buffer(1)]],                    \
        const device T* offset [[buffer(2)]], const device T* mask [[buffer(3)]],                      \
        const device T* grad_out [[buffer(4)]], device float* grad_input [[buffer(5)]],                \
        device T* grad_offset [[buffer(6)]], device T* grad_mask [[buffer(7)]],                        \
        uint tid [[thread_position_in_grid]]) {                                                        \
        dcnv3_bwd_kernel<T, VEC>(p, input, offset, mask, grad_out, grad_input, grad_offset, grad_mask, \
                                 tid);                                                                 \
    }                                                                                                  \
    kernel void dcnv4_fwd_##NAME##_v##VEC(                                                             \
        constant Dcnv3Params& p [[buffer(0)]], const device T* input [[buffer(1)]],                    \
        const device T* offset_mask [[buffer(2)]], device T* output [[buffer(3)]],                     \
        uint tid [[thread_position_in_grid]]) {                                                        \
        dcnv3_fwd_kernel<T, VEC>(p, input, offset_mask, offset_mask, output, tid);                     \
    }                                                                                                  \
    kernel void dcnv4_bwd_##NAME##_v##VEC(                                                             \
        constant Dcnv3Params& p [[buffer(0)]], const device T* input [[buffer(1)]],                    \
        const device T* offset_mask [[buffer(2)]], const device T* grad_out [[buffer(3)]],             \
        device float* grad_input [[buffer(4)]], device T* grad_offset_mask [[buffer(5)]],              \
        uint tid [[thread_position_in_grid]]) {                                                        \
        dcnv3_bwd_kernel<T, VEC>(p, input, offset_mask, offset_mask, grad_out, grad_input,             \
                                 grad_offset_mask, grad_offset_mask, tid);                             \
    }

#define DCN_CAST(NAME, T)                                                                   \
    kernel void dcnv3_cast_f32_##NAME(const device float* src [[buffer(0)]],                \
                                      device T* dst [[buffer(1)]], constant uint& n [[buffer(2)]], \
                                      uint tid [[thread_position_in_grid]]) {                 \
        if (tid < n) {                                                                      \
            dst[tid] = T(src[tid]);                                                         \
        }                                                                                   \
    }

DCN_KERNELS(f32, float, 1)
DCN_KERNELS(f32, float, 2)
DCN_KERNELS(f32, float, 4)
DCN_KERNELS(f16, half, 1)
DCN_KERNELS(f16, half, 2)
DCN_KERNELS(f16, half, 4)
DCN_KERNELS(f16, half, 8)
DCN_CAST(f32, float)
DCN_CAST(f16, half)

#if defined(__HAVE_BFLOAT__)
DCN_KERNELS(bf16, bfloat, 1)
DCN_KERNELS(bf16, bfloat, 2)
DCN_KERNELS(bf16, bfloat, 4)
DCN_KERNELS(bf16, bfloat, 8)
DCN_CAST(bf16, bfloat)
#endif
