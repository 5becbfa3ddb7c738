// Host build of the Metal kernels: compiles kernels/dcnv3.metal itself as C++17 (its
// `#include "dcnv3_common.h"` resolves to the shared per-element code, <metal_stdlib> to the
// stand-in host_metal/metal_stdlib) and calls its f32 kernel entry points once per thread
// position, as a 1-D Metal dispatch would. The backward runs with lanes == 1 only (a sequential
// host cannot emulate simd_shuffle_xor inside the kernel body); the CUDA-side host build covers
// the shuffle reduction. Command line: see dcnv3_host_main.h.

#include "dcnv3.metal"

namespace {

const int kMaxBwdLanes = 1;

template <int VEC>
void launch_fwd(const Dcnv3Params& p, const float* input, const float* offset, const float* mask, float* out) {
    const dcn_index_t total = dcn_total_threads(p);
    for (dcn_index_t idx = 0; idx < total; ++idx) {
        const uint tid = (uint)idx;
        switch (VEC) {
            case 1: dcnv3_fwd_f32_v1(p, input, offset, mask, out, tid); break;
            case 2: dcnv3_fwd_f32_v2(p, input, offset, mask, out, tid); break;
            case 4: dcnv3_fwd_f32_v4(p, input, offset, mask, out, tid); break;
            default: std::abort();
        }
    }
}

template <int VEC>
void launch_bwd(const Dcnv3Params& p, const float* input, const float* offset, const float* mask,
                const float* grad_out, float* grad_input, float* grad_offset, float* grad_mask) {
    const dcn_index_t total = dcn_total_threads(p);
    for (dcn_index_t idx = 0; idx < total; ++idx) {
        const uint tid = (uint)idx;
        switch (VEC) {
            case 1: dcnv3_bwd_f32_v1(p, input, offset, mask, grad_out, grad_input, grad_offset, grad_mask, tid); break;
            case 2: dcnv3_bwd_f32_v2(p, input, offset, mask, grad_out, grad_input, grad_offset, grad_mask, tid); break;
            case 4: dcnv3_bwd_f32_v4(p, input, offset, mask, grad_out, grad_input, grad_offset, grad_mask, tid); break;
            default: std::abort();
        }
    }
}

}  // namespace

#include "dcnv3_host_main.h"
