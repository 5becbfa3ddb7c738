// DCNv3 CUDA kernels (forward, backward, f32 -> T cast) for f32, f16 and bf16, f32 arithmetic.
// Built to PTX by build.rs (cudaforge) when the `cuda` feature is on; launched from
// src/ops/dcnv3/cuda.rs on candle's stream. The per-element code lives in dcnv3_common.h and is
// shared with the Metal kernels and the host build that the tests compare with the fixtures.
//
// Kernel names: dcnv3_fwd_<dtype>_v<VEC>, dcnv3_bwd_<dtype>_v<VEC>, dcnv4_fwd_<dtype>_v<VEC>,
// dcnv4_bwd_<dtype>_v<VEC>, dcnv3_cast_f32_<dtype>, dtype in {f32, f16, bf16}; VEC (channels per
// vector access) in {1, 2, 4} for f32 and {1, 2, 4, 8} for f16/bf16 (at most 16 bytes).
// The DCNv4 entries run the same code with one packed offset_mask buffer standing for both the
// offsets and the masks (the point layout of the parameters says where each lives; the
// backward's gradient buffer must be zeroed by the launcher for its padding columns).
// Launch shape: 1-D grid of ceil(total/256) blocks of 256 threads, total = items * lanes.
// Backward needs lanes to be a power of two <= 32 (lanes of one item share a warp).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define DCN_FN __device__ __forceinline__
#define DCN_GLOBAL
#define DCN_THREAD
#define DCN_RESTRICT __restrict__
#define DCN_PARAMS const Dcnv3Params&
#define DCN_UNROLL _Pragma("unroll")
typedef long long dcn_index_t;

DCN_FN float dcn_floor(float x) { return floorf(x); }

DCN_FN float dcn_ld(const float* p) { return __ldg(p); }
DCN_FN float dcn_ld(const __half* p) { return __half2float(__ldg(p)); }
DCN_FN float dcn_ld(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }
DCN_FN void dcn_st(float* p, float v) { *p = v; }
DCN_FN void dcn_st(__half* p, float v) { *p = __float2half_rn(v); }
DCN_FN void dcn_st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

DCN_FN void dcn_from_f32(float v, float* out) { *out = v; }
DCN_FN void dcn_from_f32(float v, __half* out) { *out = __float2half_rn(v); }
DCN_FN void dcn_from_f32(float v, __nv_bfloat16* out) { *out = __float2bfloat16_rn(v); }

// Bit patterns of the 16-bit types (the tag pointer only selects the overload).
DCN_FN float dcn_bits_to_f32(unsigned int b, const __half*) { return __half2float(__ushort_as_half((unsigned short)b)); }
DCN_FN float dcn_bits_to_f32(unsigned int b, const __nv_bfloat16*) { return __uint_as_float(b << 16); }
DCN_FN unsigned int dcn_f32_to_bits(float v, const __half*) { return __half_as_ushort(__float2half_rn(v)); }
DCN_FN unsigned int dcn_f32_to_bits(float v, const __nv_bfloat16*) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// VEC contiguous elements with one memory access of sizeof(T)*VEC <= 16 bytes (the launcher
// guarantees that alignment). Values travel in registers only (no address-taken locals).
template <typename T, int VEC>
DCN_FN void dcn_load_vec(const T* src, float* dst) {
    if constexpr (VEC == 1) {
        dst[0] = dcn_ld(src);
    } else if constexpr (sizeof(T) == 4) {
        if constexpr (VEC == 2) {
            const float2 r = __ldg(reinterpret_cast<const float2*>(src));
            dst[0] = r.x;
            dst[1] = r.y;
        } else {
            static_assert(VEC == 4, "f32 vectors are 1, 2 or 4 wide");
            const float4 r = __ldg(reinterpret_cast<const float4*>(src));
            dst[0] = r.x;
            dst[1] = r.y;
            dst[2] = r.z;
            dst[3] = r.w;
        }
    } else {
        static_assert(sizeof(T) == 2, "16-bit element expected");
        unsigned int w[VEC / 2];
        if constexpr (VEC == 2) {
            w[0] = __ldg(reinterpret_cast<const unsigned int*>(src));
        } else if constexpr (VEC == 4) {
            const uint2 r = __ldg(reinterpret_cast<const uint2*>(src));
            w[0] = r.x;
            w[1] = r.y;
        } else {
            static_assert(VEC == 8, "16-bit vectors are 1, 2, 4 or 8 wide");
            const uint4 r = __ldg(reinterpret_cast<const uint4*>(src));
            w[0] = r.x;
            w[1] = r.y;
            w[2] = r.z;
            w[3] = r.w;
        }
#pragma unroll
        for (int i = 0; i < VEC / 2; ++i) {
            dst[2 * i] = dcn_bits_to_f32(w[i] & 0xffffu, src);
            dst[2 * i + 1] = dcn_bits_to_f32(w[i] >> 16, src);
        }
    }
}

template <typename T, int VEC>
DCN_FN void dcn_store_vec(T* dst, const float* src) {
    if constexpr (VEC == 1) {
        dcn_st(dst, src[0]);
    } else if constexpr (sizeof(T) == 4) {
        if constexpr (VEC == 2) {
            *reinterpret_cast<float2*>(dst) = make_float2(src[0], src[1]);
        } else {
            static_assert(VEC == 4, "f32 vectors are 1, 2 or 4 wide");
            *reinterpret_cast<float4*>(dst) = make_float4(src[0], src[1], src[2], src[3]);
        }
    } else {
        static_assert(sizeof(T) == 2, "16-bit element expected");
        unsigned int w[VEC / 2];
#pragma unroll
        for (int i = 0; i < VEC / 2; ++i) {
            w[i] = dcn_f32_to_bits(src[2 * i], dst) | (dcn_f32_to_bits(src[2 * i + 1], dst) << 16);
        }
        if constexpr (VEC == 2) {
            *reinterpret_cast<unsigned int*>(dst) = w[0];
        } else if constexpr (VEC == 4) {
            *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
        } else {
            static_assert(VEC == 8, "16-bit vectors are 1, 2, 4 or 8 wide");
            *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
}

DCN_FN void dcn_atomic_add(float* dst, float v) { atomicAdd(dst, v); }

#include "dcnv3_common.h"

#define DCN_BLOCK 256

template <typename T, int VEC>
__device__ __forceinline__ void dcnv3_fwd_kernel(const Dcnv3Params& p, const T* __restrict__ input,
                                                 const T* __restrict__ offset, const T* __restrict__ mask,
                                                 T* __restrict__ output) {
    const dcn_index_t idx = (dcn_index_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= dcn_total_threads(p)) {
        return;
    }
    dcnv3_fwd_thread<T, VEC>(p, input, offset, mask, output, idx);
}

// All threads of a warp run the point loop (inactive ones with zero partials) so that the
// shuffles see the whole warp; lanes (a power of two <= 32) divides the warp, so the xor
// butterfly stays inside one item.
template <typename T, int VEC>
__device__ __forceinline__ void dcnv3_bwd_kernel(const Dcnv3Params& p, const T* __restrict__ input,
                                                 const T* __restrict__ offset, const T* __restrict__ mask,
                                                 const T* __restrict__ grad_out, float* __restrict__ grad_input,
                                                 T* __restrict__ grad_offset, T* __restrict__ grad_mask) {
    const dcn_index_t idx = (dcn_index_t)blockIdx.x * blockDim.x + threadIdx.x;
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
            r.gx += __shfl_xor_sync(0xffffffffu, r.gx, s);
            r.gy += __shfl_xor_sync(0xffffffffu, r.gy, s);
            r.gm += __shfl_xor_sync(0xffffffffu, r.gm, s);
        }
        if (active && lane == 0) {
            dcnv3_bwd_store<T>(p, grad_offset, grad_mask, item, pt, r);
        }
    }
}

#define DCN_KERNELS(NAME, T, VEC)                                                                       \
    extern "C" __global__ void                                           \
        dcnv3_fwd_##NAME##_v##VEC(const Dcnv3Params p, const T* __restrict__ input,                    \
                                  const T* __restrict__ offset, const T* __restrict__ mask,             \
                                  T* __restrict__ output) {                                             \
        dcnv3_fwd_kernel<T, VEC>(p, input, offset, mask, output);                                       \
    }                                                                                                   \
    extern "C" __global__ void dcnv3_bwd_##NAME##_v##VEC(                  \
        const Dcnv3Params p, const T* __restrict__ input, const T* __restrict__ offset,                 \
        const T* __restrict__ mask, const T* __restrict__ grad_out, float* __restrict__ grad_input,     \
        T* __restrict__ grad_offset, T* __restrict__ grad_mask) {                                       \
        dcnv3_bwd_kernel<T, VEC>(p, input, offset, mask, grad_out, grad_input, grad_offset, grad_mask); \
    }                                                                                                   \
    extern "C" __global__ void dcnv4_fwd_##NAME##_v##VEC(const Dcnv3Params p, const T* __restrict__ input, \
                                                         const T* offset_mask, T* __restrict__ output) { \
        dcnv3_fwd_kernel<T, VEC>(p, input, offset_mask, offset_mask, output);                          \
    }                                                                                                   \
    extern "C" __global__ void dcnv4_bwd_##NAME##_v##VEC(                                              \
        const Dcnv3Params p, const T* __restrict__ input, const T* offset_mask,                         \
        const T* __restrict__ grad_out, float* __restrict__ grad_input, T* grad_offset_mask) {          \
        dcnv3_bwd_kernel<T, VEC>(p, input, offset_mask, offset_mask, grad_out, grad_input,              \
                                 grad_offset_mask, grad_offset_mask);                                   \
    }

DCN_KERNELS(f32, float, 1)
DCN_KERNELS(f32, float, 2)
DCN_KERNELS(f32, float, 4)
DCN_KERNELS(f16, __half, 1)
DCN_KERNELS(f16, __half, 2)
DCN_KERNELS(f16, __half, 4)
DCN_KERNELS(f16, __half, 8)
DCN_KERNELS(bf16, __nv_bfloat16, 1)
DCN_KERNELS(bf16, __nv_bfloat16, 2)
DCN_KERNELS(bf16, __nv_bfloat16, 4)
DCN_KERNELS(bf16, __nv_bfloat16, 8)

// The backward accumulates the input gradient in f32; this writes it out in the tensor dtype.
#define DCN_CAST(NAME, T)                                                                          \
    extern "C" __global__ void dcnv3_cast_f32_##NAME(const float* __restrict__ src, T* __restrict__ dst, \
                                                     const long long n) {                            \
        const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                      \
        if (i < n) {                                                                               \
            dcn_from_f32(src[i], dst + i);                                                         \
        }                                                                                          \
    }

DCN_CAST(f32, float)
DCN_CAST(f16, __half)
DCN_CAST(bf16, __nv_bfloat16)
