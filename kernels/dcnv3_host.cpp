// Host build of the DCNv3 kernels: runs the per-element code of dcnv3_common.h (the code the
// CUDA and Metal kernels execute) in a sequential emulation of the GPU launch, for tests on
// machines without a GPU (tests/kernel_host.rs builds this file with the `cc` crate).
// Command line and file formats: see dcnv3_host_main.h.

#include "host_shim.h"
#include "dcnv3_common.h"

namespace {

const int kWarp = 32;
const int kMaxBwdLanes = kWarp;

// Emulates the CUDA forward launch: every thread index of the 1-D grid runs the kernel body.
template <int VEC>
void launch_fwd(const Dcnv3Params& p, const float* input, const float* offset, const float* mask, float* out) {
    const dcn_index_t total = dcn_total_threads(p);
    for (dcn_index_t idx = 0; idx < total; ++idx) {
        dcnv3_fwd_thread<float, VEC>(p, input, offset, mask, out, idx);
    }
}

// Emulates the CUDA backward launch warp by warp: the 32 threads compute their partials for a
// point, then the xor butterfly of __shfl_xor_sync (all lanes exchange simultaneously), then
// lane 0 of each item stores, exactly as dcnv3_bwd_kernel in dcnv3.cu does.
template <int VEC>
void launch_bwd(const Dcnv3Params& p, const float* input, const float* offset, const float* mask,
                const float* grad_out, float* grad_input, float* grad_offset, float* grad_mask) {
    const dcn_index_t total = dcn_total_threads(p);
    for (dcn_index_t base = 0; base < total; base += kWarp) {
        for (int pt = 0; pt < p.points; ++pt) {
            DcnGrad r[kWarp];
            for (int t = 0; t < kWarp; ++t) {
                const dcn_index_t idx = base + t;
                r[t].gx = 0.0f;
                r[t].gy = 0.0f;
                r[t].gm = 0.0f;
                if (idx < total) {
                    const dcn_index_t item = idx / p.lanes;
                    const int lane = (int)(idx - item * p.lanes);
                    r[t] = dcnv3_bwd_partial<float, VEC>(p, input, offset, mask, grad_out, grad_input, item,
                                                         lane, pt);
                }
            }
            for (int s = p.lanes >> 1; s > 0; s >>= 1) {
                DcnGrad next[kWarp];
                for (int t = 0; t < kWarp; ++t) {
                    next[t].gx = r[t].gx + r[t ^ s].gx;
                    next[t].gy = r[t].gy + r[t ^ s].gy;
                    next[t].gm = r[t].gm + r[t ^ s].gm;
                }
                for (int t = 0; t < kWarp; ++t) {
                    r[t] = next[t];
                }
            }
            for (int t = 0; t < kWarp; ++t) {
                const dcn_index_t idx = base + t;
                const dcn_index_t item = idx / p.lanes;
                const int lane = (int)(idx - item * p.lanes);
                if (idx < total && lane == 0) {
                    dcnv3_bwd_store<float>(p, grad_offset, grad_mask, item, pt, r[t]);
                }
            }
        }
    }
}

}  // namespace

#include "dcnv3_host_main.h"
