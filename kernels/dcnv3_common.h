// DCNv3 core operator: the per-element sampling and accumulation code, shared with DCNv4
// (FlashInternImage), which is the same computation on offsets and masks read from one packed,
// padded tensor (the point layout fields of Dcnv3Params say where; see below).
//
// This one file is compiled three ways:
//   * by nvcc, included from dcnv3.cu (CUDA kernels, PTX built by build.rs);
//   * by the Metal compiler at run time: src/ops/dcnv3/metal.rs pastes it in place of the
//     `#include "dcnv3_common.h"` line of dcnv3.metal;
//   * as plain C++ on the host through host_shim.h (kernels/dcnv3_host.cpp), which
//     tests/kernel_host.rs builds and compares with the fixtures and the CPU op.
// It must therefore stay inside the common subset of CUDA C++, C++17 and the Metal Shading
// Language: no lambdas, no recursion, no standard library, no `static` data, every pointer
// parameter spelled with DCN_GLOBAL / DCN_THREAD so Metal gets its address spaces.
//
// The including file defines first:
//   DCN_FN             qualifier of the helper functions (CUDA: __device__ __forceinline__)
//   DCN_GLOBAL         address space of tensor memory (Metal: device; else empty)
//   DCN_THREAD         address space of per-thread arrays (Metal: thread; else empty)
//   DCN_RESTRICT       restrict qualifier for tensor pointers (may be empty)
//   DCN_UNROLL         loop-unroll pragma for the small fixed loops (may be empty)
//   DCN_PARAMS         how a Dcnv3Params is passed (Metal: constant Dcnv3Params&)
//   dcn_index_t        64-bit signed integer type
//   float dcn_floor(float)
//   float dcn_ld(const DCN_GLOBAL T*)            one element of T -> f32
//   void  dcn_st(DCN_GLOBAL T*, float)           f32 -> one element of T
//   void  dcn_load_vec<T, VEC>(const DCN_GLOBAL T*, DCN_THREAD float*)   VEC contiguous elements
//   void  dcn_store_vec<T, VEC>(DCN_GLOBAL T*, const DCN_THREAD float*)
//   void  dcn_atomic_add(DCN_GLOBAL float*, float)
//
// Semantics (see ../shared/spec/internimage.md 3.2): tensors are channels-last and contiguous:
//   input  (N, H_in,  W_in,  G*Cg), channel g*Cg + c
//   offset pairs (x, y) of point p of group g of output pixel `pixel` at
//          pixel*off_pixel + g*off_group + 2*p + {0, 1}
//   mask   at pixel*mask_pixel + mask_first + g*mask_group + p
//   output (N, H_out, W_out, G*Cg)
// DCNv3: offset (N, H_out, W_out, G*P*2) and mask (N, H_out, W_out, G*P), i.e. off_pixel = 2GP,
// off_group = 2P, mask_pixel = GP, mask_group = P, mask_first = 0. DCNv4: offset and mask are the
// same (N, H_out, W_out, K_pad) buffer, off_pixel = mask_pixel = K_pad, off_group = mask_group =
// 3P, mask_first = 2P; the padding columns are neither read nor written (the launcher zeroes the
// gradient buffer).
// Point p walks the kernel x-major (column i outer, row j inner), skipping the centre when
// remove_center. Sampling position x = wo*sw - pw + hx + scale*(i*dw - hx + dx) (y alike),
// hx = dw*(kw-1)/2; bilinear with zeros outside the image, nothing at all unless
// -1 < y < H_in and -1 < x < W_in; weighted by the mask, summed over p; f32 arithmetic.
//
// Work decomposition shared by every backend: an "item" is one (n, ho, wo, g), flattened with
// g fastest; `lanes` threads
// cooperate on an item, lane l handling the channel chunks c0 = l*VEC, l*VEC + lanes*VEC, ...
// Thread index = item*lanes + lane.

#ifndef DCNV3_COMMON_H
#define DCNV3_COMMON_H

// Parameter block, passed by value (CUDA) or as constant bytes (Metal). 24 x 4 bytes; the Rust
// mirror is `Dcnv3Params` in src/ops/dcnv3/launch.rs (same field order, #[repr(C)]).
struct Dcnv3Params {
    int batch;
    int h_in;
    int w_in;
    int h_out;
    int w_out;
    int group;
    int group_channels;
    int points;
    int kernel_h;
    int kernel_w;
    int stride_h;
    int stride_w;
    int pad_h;
    int pad_w;
    int dilation_h;
    int dilation_w;
    int remove_center;
    int lanes;
    float offset_scale;
    // Point layout (see the top of the file).
    int off_pixel;
    int off_group;
    int mask_pixel;
    int mask_group;
    int mask_first;
};

// Index of the x offset of point 0 of group g of output pixel pix.
DCN_FN dcn_index_t dcn_off_base(DCN_PARAMS p, dcn_index_t pix, int g) {
    return pix * p.off_pixel + (dcn_index_t)g * p.off_group;
}

// Index of the mask of point 0 of group g of output pixel pix.
DCN_FN dcn_index_t dcn_mask_base(DCN_PARAMS p, dcn_index_t pix, int g) {
    return pix * p.mask_pixel + p.mask_first + (dcn_index_t)g * p.mask_group;
}

// The four bilinear corners of one sampling point.
// pos[k]: element offset of corner k inside its image ((y*W_in + x)*C), or -1 when that corner
// lies outside the image (it reads as zero). Corner order: (y0,x0), (y0,x0+1), (y0+1,x0),
// (y0+1,x0+1). w[k]: bilinear weight of corner k (without the mask). inside == 0 means the
// point contributes nothing.
struct DcnCorners {
    dcn_index_t pos[4];
    float w[4];
    float ly;
    float lx;
    int inside;
};

// Partial gradients of one point from some of a group's channels: d/d(offset x), d/d(offset y)
// (both already multiplied by mask and offset_scale) and d/d(mask).
struct DcnGrad {
    float gx;
    float gy;
    float gm;
};

// Total number of threads of a launch: items * lanes.
DCN_FN dcn_index_t dcn_total_threads(DCN_PARAMS p) {
    return (dcn_index_t)p.batch * p.h_out * p.w_out * p.group * p.lanes;
}

// Sampling corners of point `pt` of output pixel (ho, wo) for learned offsets (dx, dy).
DCN_FN DcnCorners dcn_corners(DCN_PARAMS p, int ho, int wo, int pt, float dx, float dy) {
    DcnCorners s;
    int q = pt;
    const int centre = (p.kernel_w / 2) * p.kernel_h + p.kernel_h / 2;
    if (p.remove_center != 0 && q >= centre) {
        q += 1;
    }
    const int i = q / p.kernel_h;  // kernel column (x)
    const int j = q - i * p.kernel_h;  // kernel row (y)
    const float hx = (float)((p.dilation_w * (p.kernel_w - 1)) / 2);
    const float hy = (float)((p.dilation_h * (p.kernel_h - 1)) / 2);
    const float x = (float)(wo * p.stride_w - p.pad_w) + hx +
                    p.offset_scale * ((float)(i * p.dilation_w) - hx + dx);
    const float y = (float)(ho * p.stride_h - p.pad_h) + hy +
                    p.offset_scale * ((float)(j * p.dilation_h) - hy + dy);
    s.inside = (y > -1.0f && x > -1.0f && y < (float)p.h_in && x < (float)p.w_in) ? 1 : 0;
    DCN_UNROLL
    for (int k = 0; k < 4; ++k) {
        s.pos[k] = -1;
        s.w[k] = 0.0f;
    }
    s.ly = 0.0f;
    s.lx = 0.0f;
    if (s.inside == 0) {
        return s;
    }
    const float yf = dcn_floor(y);
    const float xf = dcn_floor(x);
    const int y0 = (int)yf;
    const int x0 = (int)xf;
    const float ly = y - yf;
    const float lx = x - xf;
    const float hy1 = 1.0f - ly;
    const float hx1 = 1.0f - lx;
    s.ly = ly;
    s.lx = lx;
    s.w[0] = hy1 * hx1;
    s.w[1] = hy1 * lx;
    s.w[2] = ly * hx1;
    s.w[3] = ly * lx;
    const dcn_index_t c = (dcn_index_t)p.group * p.group_channels;
    const bool top = y0 >= 0;
    const bool bottom = y0 + 1 < p.h_in;
    const bool left = x0 >= 0;
    const bool right = x0 + 1 < p.w_in;
    if (top && left) {
        s.pos[0] = ((dcn_index_t)y0 * p.w_in + x0) * c;
    }
    if (top && right) {
        s.pos[1] = ((dcn_index_t)y0 * p.w_in + (x0 + 1)) * c;
    }
    if (bottom && left) {
        s.pos[2] = ((dcn_index_t)(y0 + 1) * p.w_in + x0) * c;
    }
    if (bottom && right) {
        s.pos[3] = ((dcn_index_t)(y0 + 1) * p.w_in + (x0 + 1)) * c;
    }
    return s;
}

// Forward, one thread: lane `idx % lanes` of item `idx / lanes`. Each thread loads the offsets
// and mask of its (pixel, group) once per point for its VEC channels, gathers VEC contiguous
// channels per corner with one vector load and writes VEC outputs with one vector store.
// Requires group_channels % VEC == 0 and VEC-aligned tensors (checked by the launcher).
template <typename T, int VEC>
DCN_FN void dcnv3_fwd_thread(DCN_PARAMS p, const DCN_GLOBAL T* DCN_RESTRICT input,
                             const DCN_GLOBAL T* DCN_RESTRICT offset,
                             const DCN_GLOBAL T* DCN_RESTRICT mask, DCN_GLOBAL T* DCN_RESTRICT output,
                             dcn_index_t idx) {
    const dcn_index_t item = idx / p.lanes;
    const int lane = (int)(idx - item * p.lanes);
    const int g = (int)(item % p.group);
    const dcn_index_t pix = item / p.group;
    const int wo = (int)(pix % p.w_out);
    const int ho = (int)((pix / p.w_out) % p.h_out);
    const dcn_index_t n = pix / ((dcn_index_t)p.w_out * p.h_out);
    const dcn_index_t c = (dcn_index_t)p.group * p.group_channels;
    const DCN_GLOBAL T* img = input + n * p.h_in * p.w_in * c + (dcn_index_t)g * p.group_channels;
    const DCN_GLOBAL T* off = offset + dcn_off_base(p, pix, g);
    const DCN_GLOBAL T* msk = mask + dcn_mask_base(p, pix, g);
    DCN_GLOBAL T* out = output + pix * c + (dcn_index_t)g * p.group_channels;
    for (int c0 = lane * VEC; c0 < p.group_channels; c0 += p.lanes * VEC) {
        float acc[VEC];
        DCN_UNROLL
        for (int k = 0; k < VEC; ++k) {
            acc[k] = 0.0f;
        }
        for (int pt = 0; pt < p.points; ++pt) {
            const DcnCorners s = dcn_corners(p, ho, wo, pt, dcn_ld(off + 2 * pt), dcn_ld(off + 2 * pt + 1));
            if (s.inside == 0) {
                continue;
            }
            const float m = dcn_ld(msk + pt);
            DCN_UNROLL
            for (int corner = 0; corner < 4; ++corner) {
                if (s.pos[corner] < 0) {
                    continue;
                }
                float v[VEC];
                dcn_load_vec<T, VEC>(img + s.pos[corner] + c0, v);
                const float w = m * s.w[corner];
                DCN_UNROLL
                for (int k = 0; k < VEC; ++k) {
                    acc[k] += w * v[k];
                }
            }
        }
        dcn_store_vec<T, VEC>(out + c0, acc);
    }
}

// Backward, one thread and one point: the gradient of sum(output * grad_out) for point `pt` of
// item `item`, restricted to lane `lane`'s channel chunks. Adds the input gradient with atomics
// into the f32 buffer `grad_input` (input layout, zero-initialised by the launcher) and returns
// this lane's partial offset/mask gradients; the caller sums the partials of all lanes of the
// item (warp shuffles on the GPU) and lane 0 stores them with dcnv3_bwd_store.
template <typename T, int VEC>
DCN_FN DcnGrad dcnv3_bwd_partial(DCN_PARAMS p, const DCN_GLOBAL T* DCN_RESTRICT input,
                                 const DCN_GLOBAL T* DCN_RESTRICT offset,
                                 const DCN_GLOBAL T* DCN_RESTRICT mask,
                                 const DCN_GLOBAL T* DCN_RESTRICT grad_out,
                                 DCN_GLOBAL float* DCN_RESTRICT grad_input, dcn_index_t item, int lane,
                                 int pt) {
    DcnGrad r;
    r.gx = 0.0f;
    r.gy = 0.0f;
    r.gm = 0.0f;
    const int g = (int)(item % p.group);
    const dcn_index_t pix = item / p.group;
    const int wo = (int)(pix % p.w_out);
    const int ho = (int)((pix / p.w_out) % p.h_out);
    const dcn_index_t n = pix / ((dcn_index_t)p.w_out * p.h_out);
    const dcn_index_t c = (dcn_index_t)p.group * p.group_channels;
    const dcn_index_t off_idx = dcn_off_base(p, pix, g) + 2 * pt;
    const DcnCorners s = dcn_corners(p, ho, wo, pt, dcn_ld(offset + off_idx), dcn_ld(offset + off_idx + 1));
    if (s.inside == 0) {
        return r;
    }
    const float m = dcn_ld(mask + dcn_mask_base(p, pix, g) + pt);
    const dcn_index_t img_base = n * p.h_in * p.w_in * c + (dcn_index_t)g * p.group_channels;
    const DCN_GLOBAL T* img = input + img_base;
    DCN_GLOBAL float* gimg = grad_input + img_base;
    const DCN_GLOBAL T* gout = grad_out + pix * c + (dcn_index_t)g * p.group_channels;
    const float hy1 = 1.0f - s.ly;
    const float hx1 = 1.0f - s.lx;
    for (int c0 = lane * VEC; c0 < p.group_channels; c0 += p.lanes * VEC) {
        float go[VEC];
        dcn_load_vec<T, VEC>(gout + c0, go);
        float v[4][VEC];
        DCN_UNROLL
        for (int corner = 0; corner < 4; ++corner) {
            if (s.pos[corner] >= 0) {
                dcn_load_vec<T, VEC>(img + s.pos[corner] + c0, v[corner]);
                DCN_UNROLL
                for (int k = 0; k < VEC; ++k) {
                    dcn_atomic_add(gimg + s.pos[corner] + c0 + k, m * s.w[corner] * go[k]);
                }
            } else {
                DCN_UNROLL
                for (int k = 0; k < VEC; ++k) {
                    v[corner][k] = 0.0f;
                }
            }
        }
        DCN_UNROLL
        for (int k = 0; k < VEC; ++k) {
            const float val = s.w[0] * v[0][k] + s.w[1] * v[1][k] + s.w[2] * v[2][k] + s.w[3] * v[3][k];
            r.gm += go[k] * val;
            r.gx += go[k] * (hy1 * (v[1][k] - v[0][k]) + s.ly * (v[3][k] - v[2][k]));
            r.gy += go[k] * (hx1 * (v[2][k] - v[0][k]) + s.lx * (v[3][k] - v[1][k]));
        }
    }
    const float scale = m * p.offset_scale;
    r.gx *= scale;
    r.gy *= scale;
    return r;
}

// Backward: store the summed gradients of point `pt` of item `item` (every used entry is
// written exactly once, so with the DCNv3 layout grad_offset and grad_mask need no
// initialisation; with DCNv4's they are one buffer whose padding columns the launcher zeroes).
template <typename T>
DCN_FN void dcnv3_bwd_store(DCN_PARAMS p, DCN_GLOBAL T* DCN_RESTRICT grad_offset,
                            DCN_GLOBAL T* DCN_RESTRICT grad_mask, dcn_index_t item, int pt, DcnGrad r) {
    const int g = (int)(item % p.group);
    const dcn_index_t pix = item / p.group;
    const dcn_index_t k = dcn_off_base(p, pix, g) + 2 * pt;
    dcn_st(grad_offset + k, r.gx);
    dcn_st(grad_offset + k + 1, r.gy);
    dcn_st(grad_mask + dcn_mask_base(p, pix, g) + pt, r.gm);
}

#endif  // DCNV3_COMMON_H
